"""Questions about user functions, answered once before the first step."""
from __future__ import annotations

import dis
import inspect
from typing import Any, Callable, Iterator, List, Tuple


def _code_of(fn: Callable[..., Any]) -> Any:
    """The code object behind ``fn`` (bound methods and wrappers unwrapped), or None."""
    return getattr(inspect.unwrap(getattr(fn, "__func__", fn)), "__code__", None)


def _code_objects(code: Any) -> Iterator[Any]:
    """``code`` and the code of every function nested in it."""
    yield code
    for const in code.co_consts:
        if inspect.iscode(const):
            yield from _code_objects(const)


def reads_argument(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn``'s body reads its argument ``name`` (bytecode scan; nested functions too)."""
    code = _code_of(fn)
    if code is None:
        return True  # not plain Python: assume it does
    for nested in _code_objects(code):
        for instruction in dis.get_instructions(nested):
            if instruction.opname.startswith("LOAD_FAST") or instruction.opname in ("LOAD_DEREF", "LOAD_CLOSURE"):
                value = instruction.argval
                if value == name or (isinstance(value, tuple) and name in value):
                    return True
    return False


def reads_attributes(fn: Callable[..., Any], names: Tuple[str, ...]) -> List[str]:
    """Which of the attribute ``names`` ``fn``'s body reads (bytecode scan; nested functions too)."""
    code = _code_of(fn)
    if code is None:
        return list(names)  # not plain Python: assume it does
    read = {instruction.argval for nested in _code_objects(code) for instruction in dis.get_instructions(nested)
            if instruction.opname in ("LOAD_ATTR", "LOAD_METHOD")}
    return [name for name in names if name in read]


# Methods that mutate the object they are called on (lists, dicts, sets, deques).
_MUTATORS = frozenset({"append", "extend", "insert", "pop", "remove", "clear", "update", "setdefault",
                       "add", "discard", "appendleft", "popleft"})


def python_side_effects(fn: Callable[..., Any]) -> List[str]:
    """Python state ``fn``'s body changes, as readable phrases (bytecode scan; nested functions
    too): attribute and global assignments, and mutating methods (``append``, ``update``...)
    called on an attribute or a global. Mutations of the function's own local containers are
    not reported."""
    code = _code_of(fn)
    if code is None:
        return ["(not plain Python)"]
    found: List[str] = []
    for nested in _code_objects(code):
        previous = None
        for instruction in dis.get_instructions(nested):
            name = instruction.opname
            if name in ("STORE_ATTR", "DELETE_ATTR"):
                found.append(f"assigns .{instruction.argval}")
            elif name in ("STORE_GLOBAL", "DELETE_GLOBAL"):
                found.append(f"assigns the global {instruction.argval}")
            elif (name in ("LOAD_METHOD", "LOAD_ATTR") and instruction.argval in _MUTATORS and previous is not None
                  and previous.opname in ("LOAD_ATTR", "LOAD_GLOBAL")):
                found.append(f"calls .{previous.argval}.{instruction.argval}()")
            previous = instruction
    return list(dict.fromkeys(found))


def is_generator_function(fn: Callable[..., Any]) -> bool:
    return inspect.isgeneratorfunction(inspect.unwrap(getattr(fn, "__func__", fn)))
