"""The CUDA-graph step: the fused step of each optimizer captured once per shape and replayed.

Design
------
The fused step (``fused_step.FusedStep``) is already one ``torch.compile(fullgraph=True)``
function whose inputs are all tensors: parameters, buffers, gradients, optimizer state,
hyperparameter tensors, the loss scale, a "new accumulation window" flag and the batch. It
allocates nothing that outlives it and never reads a device value on the host, which is
what a CUDA graph needs. This module wraps the *compiled* function in
``torch.cuda.CUDAGraph`` captures, following PyTorch's documented recipe:

* **Keys.** One graph per ``(optimizer index, stepping or accumulating, batch signature)``
  (``cudagraph_plan.batch_signature``: pytree structure plus shape/stride/dtype of every
  tensor). At most ``CompileConfig.max_graphs_per_step`` distinct signatures are admitted;
  a further one (say a third batch size) warns once, is recorded in ``step_report`` and
  runs the compiled, uncaptured step for good. Nothing is ever re-captured without bound.
* **Warm-up.** Each key first runs ``cudagraph_warmup_steps`` (at least 1) real training
  steps through the compiled function on a side stream: the first one compiles (dynamo,
  inductor, Triton), later ones let lazy initialisation (cuBLAS workspaces, autotuning)
  happen outside capture. These are ordinary steps: they update the parameters.
* **Static inputs.** Per signature a ``StaticBatch`` holds long-lived buffers; each batch
  is ``copy_``'d into them (``non_blocking``). The flag is copied into one static 0-d bool.
  Everything else is persistent already: ``FusedStep.call_args`` returns the same tensor
  objects every call. Adam's ``step`` is moved to the device (``step_on_device``); LR and
  other hyperparameters are 0-d device tensors refreshed in place (``fill_``, only when
  they change) by ``FunctionalOptimizer.prepare`` before each replay, outside the graph.
* **Capture.** ``torch.cuda.graph(g, pool=shared_pool, stream=side_stream,
  capture_error_mode="thread_local")``: one memory pool for all graphs of the step (they
  run one after another on one stream; their static outputs stay referenced, so no graph
  reuses another's live memory); ``thread_local`` so that the C++ prefetch thread's
  allocations do not invalidate the capture. Capture records without executing, so the
  step is then performed by one ``replay()``.
* **Replay.** Host work per call: refresh hyperparameters, copy the batch and the flag
  into the static buffers, ``replay()``, and clone the outputs (loss, logged values) so
  that values kept for logging are not overwritten by the next replay. No host-device
  synchronisation and no allocation inside the graph; the clones allocate outside it.
* **Persistent inputs replaced.** If ``optimizer.load_state_dict`` or a
  ``zero_grad(set_to_none=True)`` replaced a tensor the graph reads, the graphs of that
  optimizer are dropped and captured again (``persistent_key`` compares addresses), at
  most ``CapturePlanner.max_recaptures`` times.
* **Fallbacks.** ``build_cudagraph_train_step`` returns ``(None, reason)`` when the run
  cannot be captured (no CUDA device, tensors off the device); the loop then uses the
  compiled step and ``trainer.explain()`` prints the reason. A capture that raises
  disables capturing for the rest of the run (reason in ``step_report``; the compiled
  step serves); a compile failure during warm-up falls back to eager as in the compiled
  step. A batch that cannot be keyed (unhashable non-tensor leaves) runs compiled.

* **Mixed precision.** ``bf16-mixed``: the forward inside the graph runs under bf16 autocast
  (``cache_enabled=False``). ``16-mixed``: the fused step scales the loss by a device
  tensor, unscales the gradients, finds inf/nan with tensor ops and undoes the update with
  ``torch.where`` where one was found, then grows or backs off the scale in place
  (``precision.DeviceLossScaler``, ``torch.amp.GradScaler``'s rule); no host sync, so it is
  captured like the fp32 step. The eager step uses ``torch.amp.GradScaler`` (the reference).
* **Triton kernels.** ``CompileConfig(triton_kernels=True)`` makes the fused step (and so
  the captured graph) apply the optimizer update with ``torch.ops.fastloop.fused_adam`` /
  ``fused_sgd`` and clip with ``torch.ops.fastloop.clip_grads``; off by default, and
  ignored (reason in ``FusedStep.triton_reason``) where triton cannot run.
* **Non-finite check.** ``Trainer(nonfinite="raise"/"skip")`` adds the fused step's device
  check and ``torch.where`` guard to the captured graph (tensor ops on a persistent int64
  counter tensor, no branch); the host reads the counters only at the points listed in
  ``nonfinite.py``, outside any replay. Adam's step count is on the device here, so its bias
  corrections are computed in the graph from it (a withheld step leaves it unchanged).
* **Distributed (compiled DDP).** A fused step that all-reduces its gradients in the graph is
  not captured (``distributed.grad_sync.capture_blocker``): the compiled step serves, with the
  reason in ``trainer.explain()``.
* **Input copies.** On CUDA the fit loop's ``DataFetcher`` copies the next batch to the
  device on a side stream while the current step runs (``data/device_copy.py``); the copy
  into the static buffers is then a device-to-device copy on the compute stream.

The CUDA calls live in :class:`CudaGraphBackend`; :class:`CudaGraphTrainStep` takes the
backend as an argument, so the host logic runs on CPU in the tests with a fake one
(``tests/test_cudagraph_logic.py``); ``tests/test_gpu_cudagraph.py`` runs it for real.

Host-device synchronisation: none per step. Once per captured graph (``torch.cuda.graph``
synchronises before capture), once when SGD momentum buffers are created or reloaded (a
small flag copy), and in ``DeviceLossScaler.state_dict`` (checkpointing).

Unverified without a GPU (this module was written on a CPU-only machine)
------------------------------------------------------------------------
* Capturing an inductor-compiled function with ``torch.cuda.graph`` (the inductor wrapper
  allocates from the graph pool and launches Triton kernels; its dynamo guards run on the
  host at capture time only). Believed legal, not run here.
* Dropout RNG inside the captured step (philox offsets of the default CUDA generator are
  graph-safe in torch; not run here).
* ``torch.ops.fastloop.*`` as ``triton_op`` inside the captured graph (tested only as
  opaque ``custom_op`` under ``TRITON_INTERPRET=1`` on CPU).
* bf16/fp16 autocast inside the compiled step on CUDA (the same code is tested on CPU with
  CPU autocast), and the fp16 skip/scale parity with ``torch.amp.GradScaler``.
* The side-stream warm-up, ``record_stream`` bookkeeping and ``thread_local`` capture mode
  together with the C++ prefetch thread.
* The ``DeviceCopier`` (pinned source, side stream, event wait, ``record_stream``).
* Memory: graphs share one pool; the fp16 skip clones the parameters and optimizer state
  inside the graph (inductor should fuse the clone into the ``where``; not measured).
* The loss scale of the fused fp16 step is not saved in checkpoints (a resumed run starts
  from 2**16 again, as a fresh ``GradScaler`` would).
* Speed: nothing here was timed.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

from fastloop.step.compiled import CompiledTrainStep
from fastloop.step.cudagraph_plan import (
    CAPTURE, COMPILED, REPLAY, WARMUP, CapturePlanner, NotCapturable, StaticBatch, batch_signature,
    check_batch_device, persistent_key,
)
from fastloop.step.fused_step import FusedStep

__all__ = ["CudaGraphBackend", "CudaGraphTrainStep", "build_cudagraph_train_step", "cudagraph_blockers"]

_FLAG, _BATCH = 7, 8  # positions in FusedStep.call_args


class CudaGraphBackend:
    """The CUDA side: side-stream warm-up, capture into a shared pool, replay."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.pool = torch.cuda.graph_pool_handle()

    def warmup(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` eagerly on the side stream, ordered after and before the current stream."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            out = fn()
        current.wait_stream(self.stream)
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                t.record_stream(current)  # allocated on the side stream, read on the current one
        return out

    def capture(self, fn: Callable[[], Any]) -> "CapturedGraph":
        # torch.cuda.graph synchronises the device before capture: once per graph, not per step.
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            outputs = fn()
        return CapturedGraph(graph, outputs)


class CapturedGraph:
    """A captured graph and the static tensors its replays write the outputs into."""

    def __init__(self, graph: Any, outputs: Any) -> None:
        self.graph = graph
        self.outputs = outputs

    def replay(self) -> None:
        self.graph.replay()


def _clone(tree: Any) -> Any:
    return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, tree)


class CudaGraphTrainStep(CompiledTrainStep):
    """``CompiledTrainStep`` whose fused step is served by captured CUDA graphs.

    Counters, ``self.log`` values and observer hooks are handled by the base class; this
    class only decides, per call, how the fused step runs (see the module docstring).
    """

    mode = "cudagraph"

    def __init__(self, loop: Any, fused: Dict[int, FusedStep], layouts: Dict[int, Any], backend: Any,
                 max_graphs: int, warmup_steps: int) -> None:
        super().__init__(loop, fused, layouts)
        self.backend = backend
        self.planner = CapturePlanner(max_signatures=max_graphs, warmup_steps=warmup_steps)
        self._graphs: Dict[Any, Tuple[CapturedGraph, Any]] = {}  # key -> (graph, persistent key)
        self._static: Dict[Any, StaticBatch] = {}  # batch signature -> buffers
        self._flags: Dict[int, Tensor] = {}  # optimizer index -> static new-window flag

    @property
    def captured_graphs(self) -> int:
        return len(self._graphs)

    def _run_fused(self, opt_idx: int, fused: FusedStep, batch: Any, stepping: bool) -> Tuple[Tensor, Any]:
        batch = (batch,)  # FusedStep's batch is the tuple of loss_fn's extra arguments
        try:
            key = (opt_idx, stepping, batch_signature(batch))
            check_batch_device(batch, self.backend.device.type)
        except NotCapturable as exc:  # this batch runs compiled; later ones may be captured
            self._note_once(f"a batch ran the compiled step uncaptured: {exc}")
            key = None
        action, newly_rejected = self.planner.action(key) if key is not None else (COMPILED, False)
        if newly_rejected:
            self._note_rejected(key)
        args = fused.call_args(batch, stepping)
        if action == COMPILED:
            out = fused.run(fused._fn(stepping), args)
        else:
            out = self._run_static(opt_idx, fused, stepping, key, action, args)
        fused.after_call(stepping)
        return out

    def _run_static(self, opt_idx: int, fused: FusedStep, stepping: bool, key: Any, action: str,
                    args: tuple) -> Tuple[Tensor, Any]:
        signature = key[2]
        static = self._static.get(signature)
        if static is None:
            static = self._static[signature] = StaticBatch(args[_BATCH])
        flag = self._flags.get(opt_idx)
        if flag is None:
            flag = self._flags[opt_idx] = torch.zeros_like(args[_FLAG])
        flag.copy_(args[_FLAG])  # device-to-device, no sync
        static_args = args[:_FLAG] + (flag, static.load(args[_BATCH]))
        persistent = persistent_key(args[:_FLAG])
        if action == REPLAY:
            graph, captured_with = self._graphs[key]
            if captured_with == persistent:
                graph.replay()
                return _clone(graph.outputs)
            # A persistent input was replaced (state reload, grads set to None): capture again.
            for k in [k for k in self._graphs if k[0] == opt_idx]:
                del self._graphs[k]
            if not self.planner.invalidate(opt_idx):
                self._note_disabled()
                return fused.run(fused._fn(stepping), static_args)
            action = CAPTURE
        fn = fused._fn(stepping)
        if action == WARMUP:
            return self.backend.warmup(lambda: fused.run(fn, static_args))
        try:
            graph = self.backend.capture(lambda: fused.run(fn, static_args))
        except Exception as exc:  # nothing ran: capture records without executing
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            self._disable(f"CUDA-graph capture failed ({type(exc).__name__}: {first[:200]}); "
                          "the compiled step serves the rest of the run")
            return fused.run(fn, static_args)
        self._graphs[key] = (graph, persistent)
        self.planner.mark_captured(key)
        graph.replay()  # the capture did not run the step: this does
        return _clone(graph.outputs)

    # ------------------------------------------------------------------ reasons
    def _reasons(self) -> Optional[list]:
        report = getattr(self.loop, "step_report", None)
        return report.reasons if report is not None else None

    def _note_rejected(self, key: Any) -> None:
        n = self.planner.max_signatures
        reason = (f"a batch signature beyond max_graphs_per_step={n} runs the compiled step uncaptured "
                  f"(optimizer {key[0]}, {len(self.planner.rejected)} such signature(s) so far)")
        reasons = self._reasons()
        if reasons is not None:
            reasons.append(reason)
        warnings.warn(f"fastloop: {reason}", RuntimeWarning, stacklevel=4)

    def _note_once(self, reason: str) -> None:
        reasons = self._reasons()
        if reasons is not None and reason not in reasons:
            reasons.append(reason)
            warnings.warn(f"fastloop: {reason}", RuntimeWarning, stacklevel=4)

    def _disable(self, reason: str) -> None:
        if self.planner.disabled is None:
            self.planner.disable(reason)
            self._note_disabled()

    def _note_disabled(self) -> None:
        reason = self.planner.disabled or ""
        self._graphs.clear()
        report = getattr(self.loop, "step_report", None)
        if report is not None:
            report.used = "compiled"
            report.reasons.append(reason)
        warnings.warn(f"fastloop: {reason}", RuntimeWarning, stacklevel=4)


def cudagraph_blockers(trainer: Any, fused: Dict[int, FusedStep]) -> list:
    """Why this run cannot be captured (empty: it can). Pure checks, no CUDA calls."""
    device = trainer.device
    if device.type != "cuda":
        return [f"CUDA graphs need a CUDA device; this run is on {device.type}"]
    reasons = []
    module = trainer.module
    off = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.device.type != "cuda"]
    if off:
        reasons.append(f"{len(off)} module tensors are not on the CUDA device (first: {off[0]})")
    if not fused:
        reasons.append("no fused step to capture")
    from fastloop.distributed.grad_sync import capture_blocker

    synced = next((step.grad_sync for step in fused.values() if getattr(step, "grad_sync", None)), None)
    if capture_blocker(synced):  # compiled DDP: its in-graph all-reduce is not captured
        reasons.append(capture_blocker(synced))
    return reasons


def _cuda_ready() -> bool:
    return torch.cuda.is_available()


def build_cudagraph_train_step(loop: Any, fused: Dict[int, Any], layouts: Dict[int, Any]) -> Tuple[Optional[Any], str]:
    """A step that replays captured CUDA graphs of the fused steps, or ``(None, reason)``."""
    trainer = loop.trainer
    reasons = cudagraph_blockers(trainer, fused)
    if not reasons and not _cuda_ready():
        reasons.append("torch.cuda is not available")
    if reasons:
        return None, "; ".join(reasons)
    for step in fused.values():
        # A graph can neither read nor update Adam's default CPU step count.
        step.functional_optimizer.step_on_device = True
    config = trainer.config.compile
    backend = CudaGraphBackend(trainer.device)
    step = CudaGraphTrainStep(loop, fused, layouts, backend, max_graphs=config.max_graphs_per_step,
                              warmup_steps=config.cudagraph_warmup_steps)
    return step, ""
