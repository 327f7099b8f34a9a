"""Calling a compiled fused step directly, without going back through Dynamo on every call.

Why: for small models torch.compile's per-call machinery costs as much as the graph itself.
Measured on the 2-core CPU VM (tiny MLP 32-64-10, Adam, batch 64): a fused step took ~460 µs
through ``torch.compile``'s wrapper, of which the compiled graph (AOTAutograd runtime wrapper
plus inductor's code) was ~205 µs; the rest is the frame hook, the guard tree over the ~20
tensor inputs and the bytecode Dynamo wraps around the graph.

How: ``CountingBackend`` wraps each graph it compiles in a :class:`CompiledGraph` that keeps
where Dynamo found each input (its source, e.g. ``L['grads'][0]``) and the outputs of its last
call. After a call through Dynamo, :meth:`DirectCall.build` turns the sources into accessors
over the step's arguments and matches the leaves of the value the step returned to the graph's
outputs by identity. Later calls are served by ``CompiledGraph.fn(*inputs)`` directly, as long
as their key matches the one the graph was built for:

* the persistent inputs (parameters, gradients, optimizer state, scalar table) are the same
  tensor objects (a ``load_state_dict`` or ``zero_grad(set_to_none=True)`` that replaced one
  sends the next call through Dynamo, which re-checks and may recompile);
* the batch has the same structure and the same shape/stride/dtype/device per tensor, and
  equal non-tensor leaves;
* the module's ``training`` flag is unchanged.

What the direct path does not re-check: other Python values the step read while it was traced
(a hyperparameter kept as a Python float and changed later). The same contract holds for a
replayed CUDA graph. The builder keeps ``training_step`` functions that read ``current_epoch``,
``global_step`` or ``trainer`` on the guarded path (see ``step.build``), and
``CompileConfig(direct_call=False)`` turns the direct path off altogether.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Hashable, List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["CallKey", "CompiledGraph", "DirectCall", "graph_input_sources"]

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

    def __init__(self, fn: Callable, sources: Optional[List[str]], on_call: Callable[["CompiledGraph"], None]):
        self.fn = fn
        self.sources = sources
        self.last_outputs: Any = None
        self._on_call = on_call

    def __call__(self, *args: Any) -> Any:
        out = self.fn(*args)
        self.last_outputs = out
        self._on_call(self)
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
        return (kind, tuple(_structure(x) for x in obj))
    if kind is dict:
        return (kind, tuple((k, _structure(v)) for k, v in obj.items()))
    leaves, spec = tree_flatten(obj)
    if len(leaves) == 1 and leaves[0] is obj:  # a plain value (int, str, None, ...)
        return (kind, obj)
    return (str(spec), tuple(_structure(x) for x in leaves))


class CallKey:
    """What a direct call must match besides its persistent tensors: the module's mode and
    the batch's structure, tensor metadata and other leaves."""

    __slots__ = ("hashable",)

    def __init__(self, module: torch.nn.Module, batch: Any) -> None:
        self.hashable: Hashable = (module.training, _structure(batch))


class DirectCall:
    """Calls one compiled graph with inputs taken from the fused step's arguments."""

    def __init__(self, graph: CompiledGraph, accessors: List[Callable[[dict], Any]], persistent: List[int],
                 out_spec: Any, out_leaves: List[Tuple[bool, Any]]) -> None:
        self.graph = graph
        self._fn = graph.fn
        self._accessors = accessors
        self._persistent_idx = persistent
        self._out_spec = out_spec
        self._out_leaves = out_leaves
        self._persistent: Tuple[Tensor, ...] = ()

    @classmethod
    def build(cls, graph: CompiledGraph, names: Dict[str, Any], output: Any
              ) -> Tuple[Optional["DirectCall"], str]:
        """A direct call for ``graph``, which just ran on the arguments ``names`` and made the
        step return ``output``; or ``(None, reason)``."""
        if graph.sources is None:
            return None, "a graph input has no source Dynamo could name"
        accessors: List[Callable[[dict], Any]] = []
        persistent: List[int] = []
        for i, source in enumerate(graph.sources):
            if not source.startswith("L["):
                return None, f"graph input {source} is not reached from the step's arguments"
            try:
                accessor = eval(f"lambda L: {source}", {})  # noqa: S307 - Dynamo's own source text
                value = accessor(names)
            except Exception as exc:  # an unfamiliar source syntax: keep the guarded path
                return None, f"graph input {source} could not be read back ({type(exc).__name__})"
            if not isinstance(value, Tensor):
                return None, f"graph input {source} is a {type(value).__name__}, not a tensor"
            accessors.append(accessor)
            if not source.startswith(_VARYING_ROOTS):
                persistent.append(i)
        graph_outputs = graph.last_outputs
        if not isinstance(graph_outputs, (list, tuple)):
            return None, "the graph did not return a sequence"
        leaves, spec = tree_flatten(output)
        out_leaves: List[Tuple[bool, Any]] = []
        for leaf in leaves:
            if not isinstance(leaf, Tensor):
                out_leaves.append((False, leaf))
                continue
            index = next((j for j, g in enumerate(graph_outputs) if g is leaf), None)
            if index is None:
                return None, "a returned tensor is not one of the graph's outputs"
            out_leaves.append((True, index))
        direct = cls(graph, accessors, persistent, spec, out_leaves)
        direct._persistent = tuple(accessors[i](names) for i in persistent)
        return direct, ""

    def __call__(self, names: Dict[str, Any]) -> Optional[Any]:
        """Run the graph on ``names``, whose ``CallKey`` the caller matched already;
        None (nothing ran) when a persistent input was replaced."""
        try:
            inputs = [get(names) for get in self._accessors]
        except (KeyError, IndexError, TypeError, AttributeError):
            return None  # a batch the key did not tell apart: Dynamo decides
        for then, i in zip(self._persistent, self._persistent_idx):
            if inputs[i] is not then:
                return None
        outputs = self._fn(*inputs)
        return tree_unflatten([outputs[v] if is_out else v for is_out, v in self._out_leaves], self._out_spec)
