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


def is_generator_function(fn: Callable[..., Any]) -> bool:
    return inspect.isgeneratorfunction(inspect.unwrap(getattr(fn, "__func__", fn)))
