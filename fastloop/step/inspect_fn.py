"""Questions about user functions, answered once before the first step."""
from __future__ import annotations

import dis
import inspect
from typing import Any, Callable, List, Tuple


def reads_argument(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn``'s body reads its argument ``name`` (bytecode scan; nested functions too)."""
    fn = inspect.unwrap(getattr(fn, "__func__", fn))
    code = getattr(fn, "__code__", None)
    if code is None:
        return True  # not plain Python: assume it does
    return _code_reads(code, name)


def _code_reads(code: Any, name: str) -> bool:
    for instruction in dis.get_instructions(code):
        if instruction.opname.startswith("LOAD_FAST") or instruction.opname in ("LOAD_DEREF", "LOAD_CLOSURE"):
            value = instruction.argval
            if value == name or (isinstance(value, tuple) and name in value):
                return True
    return any(_code_reads(const, name) for const in code.co_consts if inspect.iscode(const))


def reads_attributes(fn: Callable[..., Any], names: Tuple[str, ...]) -> List[str]:
    """Which of the attribute ``names`` ``fn``'s body reads (bytecode scan; nested functions too)."""
    fn = inspect.unwrap(getattr(fn, "__func__", fn))
    code = getattr(fn, "__code__", None)
    if code is None:
        return list(names)  # not plain Python: assume it does
    return [name for name in names if _code_reads_attribute(code, name)]


def _code_reads_attribute(code: Any, name: str) -> bool:
    for instruction in dis.get_instructions(code):
        if instruction.opname in ("LOAD_ATTR", "LOAD_METHOD") and instruction.argval == name:
            return True
    return any(_code_reads_attribute(const, name) for const in code.co_consts if inspect.iscode(const))


# Methods that mutate the object they are called on (lists, dicts, sets, deques).
_MUTATORS = frozenset({"append", "extend", "insert", "pop", "remove", "clear", "update", "setdefault",
                       "add", "discard", "appendleft", "popleft"})


def python_side_effects(fn: Callable[..., Any]) -> List[str]:
    """Python state ``fn``'s body changes, as readable phrases (bytecode scan; nested functions
    too): attribute and global assignments, and mutating methods (``append``, ``update``...)
    called on an attribute or a global. Mutations of the function's own local containers are
    not reported."""
    fn = inspect.unwrap(getattr(fn, "__func__", fn))
    code = getattr(fn, "__code__", None)
    if code is None:
        return ["(not plain Python)"]
    found: List[str] = []
    _collect_side_effects(code, found)
    return list(dict.fromkeys(found))


def _collect_side_effects(code: Any, found: List[str]) -> None:
    previous = None
    for instruction in dis.get_instructions(code):
        name = instruction.opname
        if name in ("STORE_ATTR", "DELETE_ATTR"):
            found.append(f"assigns .{instruction.argval}")
        elif name in ("STORE_GLOBAL", "DELETE_GLOBAL"):
            found.append(f"assigns the global {instruction.argval}")
        elif (name in ("LOAD_METHOD", "LOAD_ATTR") and instruction.argval in _MUTATORS and previous is not None
              and previous.opname in ("LOAD_ATTR", "LOAD_GLOBAL")):
            found.append(f"calls .{previous.argval}.{instruction.argval}()")
        previous = instruction
    for const in code.co_consts:
        if inspect.iscode(const):
            _collect_side_effects(const, found)


def is_generator_function(fn: Callable[..., Any]) -> bool:
    return inspect.isgeneratorfunction(inspect.unwrap(getattr(fn, "__func__", fn)))
