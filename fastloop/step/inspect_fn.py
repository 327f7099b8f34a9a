"""Questions about user functions, answered once before the first step.

Two kinds of scan: the bytecode of a function (and of the functions nested in it), and, to follow
an argument that a step only hands on, the source of the step and of the methods of the same
object it passes the argument to (``self._common_step(batch, batch_idx, "train")``, Lightning's
own examples do this). Where the source cannot be read the answer is the conservative one.
"""
from __future__ import annotations

import ast
import dis
import inspect
import textwrap
import types
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

# How many calls deep an argument is followed into methods of self.
FOLLOW_DEPTH = 2
# How many calls deep the scans for run state and side effects follow methods of self (deeper:
# they keep a step guarded, the safe side).
SCAN_DEPTH = 4
# Classes defined in these packages are the framework's: their methods are not scanned (``self.log``
# is made to be called from a step).
_FRAMEWORK_PACKAGES = ("fastloop.", "torch.")


def _function_of(fn: Callable[..., Any]) -> Any:
    """The plain function behind ``fn`` (bound methods and wrappers unwrapped)."""
    return inspect.unwrap(getattr(fn, "__func__", fn))


def _code_of(fn: Callable[..., Any]) -> Any:
    """The code object behind ``fn`` (bound methods and wrappers unwrapped), or None."""
    return getattr(_function_of(fn), "__code__", None)


def _code_objects(code: Any) -> Iterator[Any]:
    """``code`` and the code of every function nested in it."""
    yield code
    for const in code.co_consts:
        if inspect.iscode(const):
            yield from _code_objects(const)


def _bytecode_reads(code: Any, name: str) -> bool:
    for nested in _code_objects(code):
        for instruction in dis.get_instructions(nested):
            if instruction.opname.startswith("LOAD_FAST") or instruction.opname in ("LOAD_DEREF", "LOAD_CLOSURE"):
                value = instruction.argval
                if value == name or (isinstance(value, tuple) and name in value):
                    return True
    return False


def reads_argument(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn``'s body reads its argument ``name`` (bytecode scan; nested functions too)."""
    code = _code_of(fn)
    if code is None:
        return True  # not plain Python: assume it does
    return _bytecode_reads(code, name)


# ----------------------------------------------------------------- following an argument
def positional_argument_use(fn: Callable[..., Any], index: int, depth: int = FOLLOW_DEPTH) -> str:
    """Where the bound callable ``fn`` uses its positional argument ``index`` ('' if nowhere).

    An argument only passed on to a method of the same object (``self.helper(x, idx)``, or
    ``super().helper(x, idx)``) is followed into that method, up to ``depth`` calls deep: it counts as used only where some
    method reads it otherwise. The answer names the function and line, e.g.
    ``"LitModel._common_step, line 74: if batch_idx % 2:"``.
    """
    function = _function_of(fn)
    code = getattr(function, "__code__", None)
    if code is None:
        return f"{_name(fn)} (not plain Python)"
    owner = getattr(fn, "__self__", None)
    skip = 1 if owner is not None else 0
    positional = code.co_varnames[:code.co_argcount]
    if skip + index < len(positional):
        return _argument_use(function, owner, positional[skip + index], depth)
    if code.co_flags & inspect.CO_VARARGS:  # lands in *args
        name = code.co_varnames[code.co_argcount + code.co_kwonlyargcount]
        return f"{_name(function)} (through *{name})" if _bytecode_reads(code, name) else ""
    return ""  # no such parameter: calling it fails the same way in every mode


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _argument_use(function: Any, owner: Any, name: str, depth: int) -> str:
    tree = _function_node(function)
    if tree is None:  # no source: the bytecode says whether it is read at all
        return f"{_name(function)} (source not available)" if _bytecode_reads(function.__code__, name) else ""
    self_name = tree.args.args[0].arg if owner is not None and tree.args.args else None
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    loads = [node for node in ast.walk(tree)
             if isinstance(node, ast.Name) and node.id == name and isinstance(node.ctx, ast.Load)]
    for node in sorted(loads, key=lambda n: (n.lineno, n.col_offset)):  # report the first in source order
        passed = _passed_to_method(node, parents, self_name) if depth > 0 else None
        target = None
        if passed is not None:
            target = (_user_method(owner, passed[1]) if passed[0] == "self"
                      else _super_method(owner, function, passed[1]))
        parameter = _parameter_for(target, passed[2]) if target is not None else None
        if parameter is None:
            return _where(function, tree, node)
        inner = _argument_use(target, owner, parameter, depth - 1)
        if inner:
            return inner
    return ""


def _function_node(function: Any) -> Optional[Union[ast.FunctionDef, ast.AsyncFunctionDef]]:
    """The parsed definition of ``function``, or None where its source cannot be read."""
    try:
        source = textwrap.dedent(inspect.getsource(function))
        module = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return None
    node = module.body[0] if module.body else None
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == function.__name__:
        return node
    return None  # a lambda, or source that is not this function's


def _passed_to_method(node: ast.Name, parents: Dict[ast.AST, ast.AST],
                      self_name: Optional[str]) -> Optional[Tuple[str, str, Union[int, str]]]:
    """``("self" or "super", method, position or keyword)`` when ``node`` is an argument of
    ``self.method(...)`` or ``super().method(...)``."""
    parent = parents.get(node)
    if isinstance(parent, ast.keyword) and parent.arg is not None:
        call, slot = parents.get(parent), parent.arg
    elif isinstance(parent, ast.Call) and node in parent.args:
        call, slot = parent, parent.args.index(node)
        if any(isinstance(arg, ast.Starred) for arg in parent.args[:slot]):
            return None
    else:
        return None
    func = getattr(call, "func", None)
    if self_name is None or not isinstance(func, ast.Attribute):
        return None
    receiver = func.value
    if isinstance(receiver, ast.Name) and receiver.id == self_name:
        return "self", func.attr, slot
    if (isinstance(receiver, ast.Call) and isinstance(receiver.func, ast.Name) and receiver.func.id == "super"
            and not receiver.args):
        return "super", func.attr, slot
    return None


def _user_method(owner: Any, name: str) -> Any:
    """The plain function ``owner.name`` calls when it is a method of ``owner``'s class (not an
    instance attribute, a property or a submodule); None otherwise."""
    if owner is None or name in getattr(owner, "__dict__", {}):
        return None
    try:
        attr = inspect.getattr_static(owner, name)
    except AttributeError:
        return None
    return attr if isinstance(attr, types.FunctionType) else None


def _super_method(owner: Any, function: Any, name: str) -> Any:
    """The plain function ``super().name`` calls from ``function``, a method of ``owner``'s class."""
    mro = type(owner).__mro__
    defining = next((i for i, klass in enumerate(mro)
                     if any(inspect.unwrap(v) is function for v in vars(klass).values() if callable(v))), None)
    if defining is None:
        return None
    for klass in mro[defining + 1:]:
        if name in vars(klass):
            attr = vars(klass)[name]
            return attr if isinstance(attr, types.FunctionType) else None
    return None


def _parameter_for(function: Any, slot: Union[int, str]) -> Optional[str]:
    """The parameter of the method ``function`` (``self`` first) that receives ``slot``."""
    code = function.__code__
    named = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
    if isinstance(slot, int):
        index = slot + 1
        return named[index] if index < code.co_argcount else None  # else *args: not followed
    posonly = code.co_posonlyargcount
    return slot if slot in named[posonly:] else None  # else **kwargs: not followed


def _where(function: Any, tree: ast.AST, node: ast.AST) -> str:
    lines, first = inspect.getsourcelines(function)
    offset = node.lineno - 1  # the tree's lines count from the definition's first line
    text = lines[offset].strip() if offset < len(lines) else ""
    return f"{_name(function)}, line {first + offset}: {text}"


# -------------------------------------------------------- bytecode scans, following self
def _reachable_code(fn: Callable[..., Any], depth: int = SCAN_DEPTH) -> Iterator[Tuple[str, Any]]:
    """``('', code)`` of ``fn`` and its nested functions, then ``('self.m', code)`` for every
    method ``m`` of ``fn``'s object that it names (user classes only), ``depth`` calls deep."""
    owner = getattr(fn, "__self__", None)
    seen = set()
    frontier = [("", _code_of(fn))]
    for level in range(depth + 1):
        following = []
        for label, code in frontier:
            if code is None or code in seen:
                continue
            seen.add(code)
            for nested in _code_objects(code):
                yield label, nested
                if level == depth or owner is None:
                    continue
                for instruction in dis.get_instructions(nested):
                    if instruction.opname in ("LOAD_ATTR", "LOAD_METHOD"):
                        method = _user_method(owner, instruction.argval)
                        if method is not None and not _defined_by_framework(owner, instruction.argval):
                            following.append((f"self.{instruction.argval}", method.__code__))
        frontier = following


def _defined_by_framework(owner: Any, name: str) -> bool:
    for klass in type(owner).__mro__:
        if name in vars(klass):
            return klass.__module__.startswith(_FRAMEWORK_PACKAGES)
    return True


def reads_attributes(fn: Callable[..., Any], names: Tuple[str, ...]) -> List[str]:
    """Which of the attribute ``names`` ``fn``'s body reads (bytecode scan; nested functions and
    methods of ``fn``'s object that it calls too)."""
    if _code_of(fn) is None:
        return list(names)  # not plain Python: assume it does
    read = {instruction.argval for _, code in _reachable_code(fn) for instruction in dis.get_instructions(code)
            if instruction.opname in ("LOAD_ATTR", "LOAD_METHOD")}
    return [name for name in names if name in read]


# Methods that mutate the object they are called on (lists, dicts, sets, deques).
_MUTATORS = frozenset({"append", "extend", "insert", "pop", "remove", "clear", "update", "setdefault",
                       "add", "discard", "appendleft", "popleft"})


def python_side_effects(fn: Callable[..., Any]) -> List[str]:
    """Python state ``fn``'s body changes, as readable phrases (bytecode scan; nested functions
    and methods of ``fn``'s object that it calls too): attribute and global assignments, and
    mutating methods (``append``, ``update``...) called on an attribute or a global. Mutations of
    the function's own local containers are not reported."""
    if _code_of(fn) is None:
        return ["(not plain Python)"]
    found: List[str] = []
    for label, code in _reachable_code(fn):
        where = f" (in {label})" if label else ""
        previous = None
        for instruction in dis.get_instructions(code):
            name = instruction.opname
            if name in ("STORE_ATTR", "DELETE_ATTR"):
                found.append(f"assigns .{instruction.argval}{where}")
            elif name in ("STORE_GLOBAL", "DELETE_GLOBAL"):
                found.append(f"assigns the global {instruction.argval}{where}")
            elif (name in ("LOAD_METHOD", "LOAD_ATTR") and instruction.argval in _MUTATORS and previous is not None
                  and previous.opname in ("LOAD_ATTR", "LOAD_GLOBAL")):
                found.append(f"calls .{previous.argval}.{instruction.argval}(){where}")
            previous = instruction
    return list(dict.fromkeys(found))


def is_generator_function(fn: Callable[..., Any]) -> bool:
    return inspect.isgeneratorfunction(_function_of(fn))
