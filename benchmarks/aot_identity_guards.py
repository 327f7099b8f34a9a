"""Identity guards that survive a saved compiled step (``torch.compile(...).aot_compile``).

An experiment of ``benchmarks/aot_warm_start.py`` (a warm start that skips Dynamo), kept with its
tests in ``tests/test_compile_time.py``: fastloop does not load saved steps (see RESULTS.md).

Why: a step saved with ``save_compiled_function`` keeps only Dynamo's portable guards. Guards
on object identity (``ID_MATCH``, ``FUNCTION_MATCH``, ``CLOSURE_MATCH``, ``CLASS_MATCH``,
``MODULE_MATCH``...) and all guards on globals are dropped, because an ``id()`` means nothing in
another process. Without them a saved step is served to a model whose loss function or
activation function changed, silently (measured: ``benchmarks/aot_warm_start.py``, a
cross-entropy step run for a multi-margin-loss model).

How: the guard filter given to Dynamo while the step is traced drops those guards as torch
would, but records for each one its source expression (``L['loss_fn'].__closure__[0]...``) and
a description of the object that is the same in every process: module and qualified name plus
a hash of the byte code for a function, module and qualified name for a class, the name for a
module, the type (and value for plain constants) for anything else. ``check`` evaluates the
expressions on the arguments of the call that is about to use the loaded step and compares.
"""
from __future__ import annotations

import builtins
import hashlib
import importlib
import inspect
import re
import types
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["IdentityGuards"]

# The guard kinds torch cannot serialize (torch._dynamo.guards.CheckFunctionManager).
_DROPPED = ("DICT_VERSION", "NN_MODULE", "ID_MATCH", "FUNCTION_MATCH", "CLASS_MATCH", "MODULE_MATCH",
            "CLOSURE_MATCH", "WEAKREF_ALIVE")

_BUILTINS_DICT = re.compile(r"G\['(__builtins_dict___\d+)'\]")
_IMPORT_ALIAS = re.compile(r"G\['(__import_\w+)'\]")


def _code_hash(code: types.CodeType) -> str:
    """The byte code, constants (nested code included) and names of ``code``."""
    h = hashlib.sha256()

    def feed(c: types.CodeType) -> None:
        h.update(c.co_code)
        h.update(repr(c.co_names).encode())
        for const in c.co_consts:
            if isinstance(const, types.CodeType):
                feed(const)
            else:
                h.update(repr(const).encode())

    feed(code)
    return h.hexdigest()[:16]


def describe(obj: Any) -> Tuple[str, ...]:
    """What ``obj`` is, in terms that mean the same in another process."""
    if isinstance(obj, types.MethodType):
        return ("method",) + describe(obj.__func__) + (type(obj.__self__).__qualname__,)
    if isinstance(obj, types.FunctionType):
        return ("function", obj.__module__ or "", obj.__qualname__, _code_hash(obj.__code__))
    if isinstance(obj, types.CellType):
        return ("cell",) + describe(obj.cell_contents)
    if isinstance(obj, types.ModuleType):
        return ("module", obj.__name__)
    if inspect.isclass(obj):
        return ("class", obj.__module__, obj.__qualname__)
    if callable(obj) and hasattr(obj, "__qualname__"):  # builtins, torch ops
        return ("callable", getattr(obj, "__module__", "") or "", obj.__qualname__)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return ("constant", repr(obj))
    return ("object", type(obj).__module__, type(obj).__qualname__)


class IdentityGuards:
    """Records the identity guards torch drops when a step is saved; checks them after loading.

    Give ``filter`` to ``torch.compile(..., options={"guard_filter_fn": guards.filter})``; save
    ``guards.entries`` with the step; ``IdentityGuards(entries).check(f_locals, f_globals)``.
    """

    def __init__(self, entries: Optional[List[Tuple[str, Tuple[str, ...]]]] = None) -> None:
        self.entries: List[Tuple[str, Tuple[str, ...]]] = list(entries or [])

    def filter(self, guards: Sequence[Any]) -> List[bool]:
        keep = []
        for g in guards:
            dropped = g.is_global or g.guard_type in _DROPPED or any(t in _DROPPED for t in g.derived_guard_types)
            if dropped and g.has_value:
                self.entries.append((g.name, describe(g.value)))
            keep.append(not dropped)
        return keep

    def check(self, f_locals: Dict[str, Any], f_globals: Dict[str, Any]) -> str:
        """'' when every recorded object is the same kind of thing again, else the first difference."""
        from torch._dynamo.guards import _get_closure_vars

        # Dynamo reads builtins through a dict it installs in the step's globals while tracing
        # (G['__builtins_dict___0']['int']); a process that only loaded the step has none.
        f_globals = dict(f_globals)
        # Likewise the modules it imported under mangled names (G['__import_torch_dot_nn']).
        for name, _ in self.entries:
            for key in _BUILTINS_DICT.findall(name):
                f_globals.setdefault(key, builtins.__dict__)
            for key in _IMPORT_ALIAS.findall(name):
                if key not in f_globals:
                    try:
                        f_globals[key] = importlib.import_module(key[len("__import_"):].replace("_dot_", "."))
                    except ImportError:
                        pass  # then the expression fails below, and the step is rejected
        # A closure variable's guard is named by the bare variable name; arguments as L['x'].
        scope = {**_get_closure_vars(), **f_locals, "L": f_locals, "G": f_globals, "__builtins__": __builtins__}
        for name, expected in self.entries:
            try:
                value = eval(name, scope)  # noqa: S307 - Dynamo's own source expression
            except Exception as exc:  # the object is not there any more
                return f"{name}: {type(exc).__name__}"
            found = describe(value)
            if found != expected:
                return f"{name} is {found}, was {expected}"
        return ""
