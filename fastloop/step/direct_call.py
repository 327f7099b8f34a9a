"""Calling a compiled fused step directly, without going back through Dynamo on every call.

Why: for small models torch.compile's per-call machinery costs as much as the graph itself.
Measured on the 2-core CPU VM (tiny MLP 32-64-10, Adam, batch 64): a fused step took ~460 µs
through ``torch.compile``'s wrapper, of which the compiled graph (AOTAutograd runtime wrapper
plus inductor's code) was ~205 µs; the rest is the frame hook, the guard tree over the ~20
tensor inputs and the bytecode Dynamo wraps around the graph. ``benchmarks/fused_step_speed.py``
compares both ways of calling.

How: ``CountingBackend`` wraps each graph it compiles in a :class:`CompiledGraph` that keeps
where Dynamo found each input (its source, e.g. ``L['grads'][0]``, or a chain through the step's
closure for a module's plain tensor attribute) and, while a direct call is being built, the
outputs of its last call. After a call through Dynamo, :meth:`DirectCall.build` turns the
sources into one generated expression over the step's arguments and free variables, and the
value the step returned into another that rebuilds it from the graph's outputs (matched by
identity). Later calls are served by ``CompiledGraph.fn(*inputs)`` directly, as long as their
key matches the one the graph was built for:

* the persistent inputs (parameters, gradients, optimizer state, scalar table, tensors reached
  through the closure) are the same tensor objects (a ``load_state_dict`` or ``zero_grad(set_to_none=True)`` that replaced one
  sends the next call through Dynamo, which re-checks and may recompile);
* the batch has the same structure and the same shape/stride/dtype/device per tensor, and
  equal non-tensor leaves;
* the module's ``training`` flag is unchanged.

What the direct path does not do: re-check other Python values the step read while it was
traced (a hyperparameter kept as a Python float and changed later), or repeat the step's Python
side effects, which Dynamo replays after every guarded call. The same contract holds for a
replayed CUDA graph. The builder keeps a ``training_step`` that reads ``current_epoch``,
``global_step`` or ``trainer``, or visibly changes Python state (attribute or global
assignments, ``.append``/``.update``... on an attribute), on the guarded path
(``step.build.direct_call_blocker``), and ``CompileConfig(direct_call=False)`` turns the
direct path off altogether.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

__all__ = ["CompiledGraph", "DirectCall", "call_key", "graph_input_sources"]

# Roots of the argument sources that change from call to call; everything else is persistent.
_VARYING_ROOTS = ("L['batch']", "L['new_window']")


def graph_input_sources(gm: torch.fx.GraphModule) -> Optional[List[str]]:
    """Dynamo's source name of each placeholder of ``gm``, or None when one has none."""
    names = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        grapharg = node.meta.get("grapharg")
        source = getattr(grapharg, "source", None)
        name = getattr(source, "name", None)
        name = name() if callable(name) else name  # a method in older torch versions
        if not isinstance(name, str) or getattr(grapharg, "pass_arg_as_tensor", False):
            return None
        names.append(name)
    return names


class CompiledGraph:
    """A graph compiled by the backend, with what a direct call needs to know about it."""

    def __init__(self, fn: Callable, sources: Optional[List[str]],
                 on_call: Callable[["CompiledGraph", Any], None]) -> None:
        self.fn = fn
        self.sources = sources
        self.last_outputs: Any = None  # set by the backend when asked to (see CountingBackend)
        self._on_call = on_call

    def __call__(self, *args: Any) -> Any:
        out = self.fn(*args)
        self._on_call(self, out)
        return out


def _structure(obj: Any) -> Hashable:
    """A hashable description of a batch: containers, tensor metadata, other values.

    Tuples, lists and dicts are walked here (much faster than a pytree flatten); any other
    container is described through ``tree_flatten``'s spec.
    """
    kind = type(obj)
    if kind is Tensor or isinstance(obj, Tensor):
        return (obj.shape, obj.stride(), obj.dtype, obj.device)
    if kind is tuple or kind is list:
        return (kind, tuple([_structure(x) for x in obj]))  # a list comprehension: no generator frames
    if kind is dict:
        return (kind, tuple((k, _structure(v)) for k, v in obj.items()))
    leaves, spec = tree_flatten(obj)
    if len(leaves) == 1 and leaves[0] is obj:  # a plain value (int, str, None, ...)
        return (kind, obj)
    return (str(spec), tuple(_structure(x) for x in leaves))


def call_key(module: torch.nn.Module, batch: Any) -> Hashable:
    """What a direct call must match besides its persistent tensors: the module's mode and the
    batch's structure, tensor metadata and other leaves. Not hashable when a leaf is not (a
    numpy array): the caller then takes the guarded path."""
    return module.training, _structure(batch)


class DirectCall:
    """Calls one compiled graph with inputs taken from the fused step's arguments.

    The input list and the returned structure are each built by one generated expression
    (from Dynamo's source names and from the first output), so a call costs a few µs of Python.
    """

    def __init__(self, graph: CompiledGraph, gather: Callable[[dict], List[Tensor]], persistent: List[int],
                 rebuild: Callable[[Any], Any]) -> None:
        self._fn = graph.fn
        self._gather = gather
        self._persistent_idx = persistent
        self._rebuild = rebuild
        self._persistent: List[Tensor] = []

    @classmethod
    def build(cls, graph: CompiledGraph, names: Dict[str, Any], output: Any
              ) -> Tuple[Optional["DirectCall"], str]:
        """A direct call for ``graph``, which just ran on the arguments ``names`` and made the
        step return ``output``; or ``(None, reason)``."""
        if graph.sources is None:
            return None, "a graph input has no source Dynamo could name"
        persistent: List[int] = []
        for i, source in enumerate(graph.sources):
            if not source.startswith("L["):
                return None, f"graph input {source} is not reached from the step's arguments"
            if not source.startswith(_VARYING_ROOTS):
                persistent.append(i)
        try:
            gather = eval(f"lambda L: [{', '.join(graph.sources)}]", {})  # noqa: S307 - Dynamo's source text
            inputs = gather(names)
        except Exception:  # an unfamiliar source syntax: keep the guarded path
            return None, f"graph input {_first_unreadable(graph.sources, names)} is not read from the step's arguments"
        bad = next((s for s, v in zip(graph.sources, inputs) if not isinstance(v, Tensor)), None)
        if bad is not None:
            return None, f"graph input {bad} is not a tensor"
        graph_outputs = graph.last_outputs
        if not isinstance(graph_outputs, (list, tuple)):
            return None, "the graph did not return a sequence"
        constants: List[Any] = []
        try:
            expression = _rebuild_expression(output, graph_outputs, constants)
        except _NotRebuildable as exc:
            return None, str(exc)
        rebuild = eval(f"lambda o: {expression}", {"C": constants})  # noqa: S307 - generated above
        direct = cls(graph, gather, persistent, rebuild)
        direct._persistent = [inputs[i] for i in persistent]
        return direct, ""

    def __call__(self, names: Dict[str, Any]) -> Optional[Any]:
        """Run the graph on ``names``, whose ``call_key`` the caller matched already;
        None (nothing ran) when a persistent input was replaced."""
        try:
            inputs = self._gather(names)
        except (KeyError, IndexError, TypeError, AttributeError):
            return None  # a batch the key did not tell apart: Dynamo decides
        for then, i in zip(self._persistent, self._persistent_idx):
            if inputs[i] is not then:
                return None
        return self._rebuild(self._fn(*inputs))


def _first_unreadable(sources: List[str], names: Dict[str, Any]) -> str:
    for source in sources:
        try:
            eval(f"lambda L: {source}", {})(names)  # noqa: S307 - Dynamo's source text
        except Exception:
            return source
    return "?"


class _NotRebuildable(Exception):
    pass


def _rebuild_expression(obj: Any, graph_outputs: Sequence[Any], constants: List[Any]) -> str:
    """Python source that rebuilds ``obj`` from the graph outputs ``o`` and constants ``C``."""
    kind = type(obj)
    if isinstance(obj, Tensor):
        index = next((j for j, g in enumerate(graph_outputs) if g is obj), None)
        if index is None:
            raise _NotRebuildable("a returned tensor is not one of the graph's outputs")
        return f"o[{index}]"
    if kind is tuple or kind is list:
        items = "".join(_rebuild_expression(x, graph_outputs, constants) + ", " for x in obj)
        return f"({items})" if kind is tuple else f"[{items}]"
    if kind is dict:
        constants.append(list(obj))
        keys = len(constants) - 1
        values = ", ".join(_rebuild_expression(v, graph_outputs, constants) for v in obj.values())
        return f"dict(zip(C[{keys}], ({values}{',' if obj else ''})))"
    if obj is None or kind in (int, float, bool, str):
        constants.append(obj)
        return f"C[{len(constants) - 1}]"
    raise _NotRebuildable(f"the step returned a {kind.__name__}, which a direct call does not rebuild")
