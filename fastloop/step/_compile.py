"""torch.compile plumbing for the fused step: a graph-counting backend and fresh code objects."""
from __future__ import annotations

import itertools
import types
from typing import Any, Callable, Optional

import torch

from .direct_call import CompiledGraph, graph_input_sources
from .errors import quietly

__all__ = ["CountingBackend", "compile_fullgraph", "with_fresh_code"]

_ids = itertools.count()


def with_fresh_code(fn: Callable) -> Callable:
    """Return a copy of ``fn`` with its own code object.

    Dynamo keys its cache (and its recompile limit, 8 by default) on the code
    object. Every fused step is built from the same inner function, so without
    this all optimizers and all models of a process would share one cache and
    the ninth distinct step would silently run eagerly (or fail with fullgraph).
    """
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{next(_ids)}")
    clone = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    clone.__kwdefaults__ = fn.__kwdefaults__
    return clone


class CountingBackend:
    """Inductor backend that counts the graphs it compiles.

    ``inductor_config`` (e.g. ``{"fallback_random": True}``) is applied while
    each graph compiles, so recompiles (a smaller last batch) get it too.
    """

    def __init__(self, inductor_config: Optional[dict[str, Any]] = None) -> None:
        self.graphs = 0
        self.inductor_config = dict(inductor_config or {})
        # The graph that ran last (set by CompiledGraph on each call through Dynamo), and
        # whether it keeps its outputs for DirectCall.build (off: nothing is retained).
        self.last_invoked: Optional[CompiledGraph] = None
        self.record_outputs = False

    def _invoked(self, graph: CompiledGraph, outputs: Any) -> None:
        self.last_invoked = graph
        if self.record_outputs:
            graph.last_outputs = outputs

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx

        # Dynamo's guards or the direct call's key (see direct_call) already pin every input's
        # shape and stride; inductor's own per-call asserts would check them again.
        with inductor_config.patch({"size_asserts": False, **self.inductor_config}):
            compiled = compile_fx(gm, example_inputs)
        # Counted after success: dynamo may abandon an attempt (e.g. a
        # TensorifyScalarRestartAnalysis on a cold cache) and compile it again.
        self.graphs += 1
        return CompiledGraph(compiled, graph_input_sources(gm), self._invoked)


def compile_fullgraph(fn: Callable, backend: CountingBackend) -> Callable:
    """One graph or an error: ``fullgraph=True``, static shapes, own cache. Calls through it
    (the guarded ones, which may trace) keep the compiler's ERROR logs out of the user's
    console (see ``errors.quiet_compiler_errors``)."""
    return quietly(torch.compile(with_fresh_code(fn), backend=backend, fullgraph=True, dynamic=False))
