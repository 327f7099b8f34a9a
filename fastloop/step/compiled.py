"""The compiled step: each automatic-optimization step as one fused ``torch.compile`` graph.

The graph (see ``fused_step``) computes ``training_step`` with ``torch.func.functional_call``,
its gradient with ``torch.func.grad_and_value``, accumulates, clips and applies the optimizer
update written as tensor ops. Around it this module keeps the eager step's observable
behaviour: the same progress counters, ``self.log`` values (returned from the graph and stored
afterwards, without a host-device sync), and the observing hooks ``on_before_zero_grad`` and
``on_before_backward``, which run after the graph. If the first call cannot compile, the loop
falls back to the eager step for good and ``trainer.explain()`` says why.
"""
from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from fastloop.loops.optimizer import StepOutput
from fastloop.step.eager import eager_train_step
from fastloop.step.fused_step import FusedStep

if TYPE_CHECKING:
    from fastloop.loops.optimizer import OptimizerLoop


class NotFusable(Exception):
    """Raised while tracing when ``training_step`` does something the fused step cannot express."""


class StepCaller(nn.Module):
    """``forward`` calls a step method of the user's module, so that ``functional_call`` can
    substitute parameters and buffers (names are prefixed with ``module.``)."""

    def __init__(self, module: nn.Module, method: str) -> None:
        super().__init__()
        self.module = module
        self.method = method

    def forward(self, *args: Any) -> Any:
        return getattr(self.module, self.method)(*args)


class LogLayout:
    """What the traced ``training_step`` logged, besides the tensor values: names, options and
    non-tensor values, in call order. Set while tracing; the graph returns tensors only."""

    def __init__(self) -> None:
        self.entries: Tuple[Any, ...] = ()

    def unpack(self, values: Tuple[Tensor, ...]) -> List[Tuple[str, Any, Dict[str, Any]]]:
        tensors = iter(values)
        return [(name, next(tensors) if is_tensor else const, dict(options))
                for name, options, is_tensor, const in self.entries]


def make_loss_fn(module: nn.Module, metrics: Any, optimizer_idx: Optional[int], layout: LogLayout) -> Any:
    """``loss_fn(params, buffers, batch) -> (loss, (extra, log_values))`` for the fused step.

    ``batch_idx`` is passed as 0: the builder only fuses a ``training_step`` that does not read
    it (a Python int that changes every step would recompile the graph every step).
    """
    caller = StepCaller(module, "training_step")

    def loss_fn(params: Dict[str, Tensor], buffers: Dict[str, Tensor], batch: Any) -> Tuple[Tensor, Any]:
        state = {"module." + k: v for k, v in {**params, **buffers}.items()}
        args = (batch, 0) if optimizer_idx is None else (batch, 0, optimizer_idx)
        output = torch.func.functional_call(caller, state, args)
        loss, extra = split_output(output)
        # Logged tensors leave as graph outputs; names and options as a constant layout.
        captured = list(metrics.capture)
        metrics.capture.clear()
        layout.entries = tuple(
            (name, tuple(sorted(options.items())), isinstance(value, Tensor), None if isinstance(value, Tensor) else value)
            for name, value, options in captured
        )
        values = tuple(value for _, value, _ in captured if isinstance(value, Tensor))
        return loss, (extra, values)

    return loss_fn


def split_output(output: Any) -> Tuple[Tensor, Dict[str, Tensor]]:
    if isinstance(output, Tensor):
        return output, {}
    if isinstance(output, dict) and isinstance(output.get("loss"), Tensor):
        extra = {k: v for k, v in output.items() if k != "loss"}
        if all(isinstance(v, Tensor) for v in extra.values()):
            return output["loss"], extra
    raise NotFusable("training_step must return a loss tensor or a dict of tensors with 'loss' to be fused")


class CompiledTrainStep:
    """Runs the fused step of the active optimizer; falls back to eager if it cannot compile."""

    mode = "compiled"

    def __init__(self, loop: "OptimizerLoop", fused: Dict[int, FusedStep], layouts: Dict[int, LogLayout]) -> None:
        self.loop = loop
        self.fused = fused
        self.layouts = layouts
        self._capture: List[Any] = []

    @property
    def graph_count(self) -> int:
        return sum(step.graph_count for step in self.fused.values())

    @property
    def compile_seconds(self) -> float:
        return sum(step.compile_seconds for step in self.fused.values())

    @property
    def notes(self) -> List[str]:
        """How the graphs were called: directly, or through torch.compile's guards and why."""
        return [f"optimizer {idx}: no direct graph calls: {step.direct_reason}" if step.direct_reason
                else f"optimizer {idx}: {step.direct_calls} of {step.calls} calls ran the compiled graph directly"
                for idx, step in self.fused.items()]

    def __call__(self, batch: Any, batch_idx: int, opt_idx: int, optimizer: Optimizer) -> StepOutput:
        loop = self.loop
        trainer = loop.trainer
        hooks = trainer.hooks
        progress = loop.optim_progress.optimizer
        fused = self.fused[opt_idx]
        accumulate = trainer.accumulate_grad_batches
        stepping = not trainer.should_accumulate
        window_start = batch_idx % accumulate == 0
        if window_start:
            fused.zero_grad()
        if stepping:
            progress.step.increment_ready()
        metrics = trainer.metrics
        previous_hook, hooks.current_hook = hooks.current_hook, "training_step"
        metrics.capture = self._capture
        failure: Optional[Exception] = None
        try:
            loss, (extra, log_values) = self._run_fused(opt_idx, fused, batch, stepping)
        except Exception as exc:  # compile failures surface here, before any update ran
            failure = exc
        finally:
            metrics.capture = None
            hooks.current_hook = previous_hook
        if failure is not None:
            self._capture.clear()
            return self._fall_back(failure, batch, batch_idx, opt_idx, optimizer, stepping)
        for name, value, options in self.layouts[opt_idx].unpack(log_values):
            metrics.store(name, value, **options)
        if window_start:
            progress.zero_grad.increment_ready()
            hooks.call("on_before_zero_grad", optimizer)
            progress.zero_grad.increment_started()
            progress.zero_grad.increment_completed()
        closure_loss = loss / accumulate if accumulate != 1 else loss
        hooks.call("on_before_backward", closure_loss)
        if stepping:
            progress.step.increment_completed()
        return StepOutput(closure_loss, extra)

    def _run_fused(self, opt_idx: int, fused: FusedStep, batch: Any, stepping: bool) -> Tuple[Tensor, Any]:
        """Run the fused step of ``opt_idx`` for one micro-batch (the CUDA-graph step overrides this)."""
        return fused(batch, step=stepping)

    def _fall_back(self, exc: Exception, batch: Any, batch_idx: int, opt_idx: int, optimizer: Optimizer,
                   stepping: bool) -> StepOutput:
        loop = self.loop
        if stepping:  # undo the count: the eager step counts this step itself
            loop.optim_progress.optimizer.step.total.ready -= 1
            loop.optim_progress.optimizer.step.current.ready -= 1
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = f"the fused step could not be compiled ({type(exc).__name__}: {first_line[:200]})"
        report = getattr(loop, "step_report", None)
        if report is not None:
            report.used = "eager"
            report.reasons.append(reason)
        warnings.warn(f"fastloop: falling back to the eager step: {reason}", RuntimeWarning, stacklevel=3)
        eager = eager_train_step(loop)
        loop.train_step = eager
        return eager(batch, batch_idx, opt_idx, optimizer)


class CompiledEvalStep:
    """``validation_step``/``test_step``/``predict_step`` through ``torch.compile`` (forward only).

    Compiled lazily per hook; ``batch_idx`` is passed as 0 (the builder checked the hook does
    not read it). Logged values are recorded through the same capture list as training.
    """

    mode = "compiled"

    def __init__(self, loop: Any, backend: Any) -> None:
        self.loop = loop
        self._backend = backend
        self._compiled: Dict[str, Any] = {}
        self._capture: List[Any] = []
        self.compile_seconds = 0.0

    @property
    def graph_count(self) -> int:
        return self._backend.graphs

    def _fn(self, hook: str) -> Any:
        fn = self._compiled.get(hook)
        if fn is None:
            from fastloop.step._compile import with_fresh_code

            module = self.loop.trainer.module

            def eval_step(*args: Any) -> Any:
                return getattr(module, hook)(*args)

            fn = self._compiled[hook] = torch.compile(with_fresh_code(eval_step), backend=self._backend,
                                                      dynamic=False)
        return fn

    def __call__(self, hook: str, batch: Any, batch_idx: int, *rest: Any) -> Any:
        trainer = self.loop.trainer
        metrics = trainer.metrics
        previous_hook, trainer.hooks.current_hook = trainer.hooks.current_hook, hook
        metrics.capture = self._capture
        graphs = self._backend.graphs
        start = time.perf_counter()
        try:
            output = self._fn(hook)(batch, 0, *rest)
        finally:
            if self._backend.graphs != graphs:
                self.compile_seconds += time.perf_counter() - start
            metrics.capture = None
            trainer.hooks.current_hook = previous_hook
        logs, self._capture[:] = list(self._capture), []
        for name, value, options in logs:
            metrics.store(name, value, **options)
        return output
