"""The compiled step: each automatic-optimization step as one fused ``torch.compile`` graph.

The graph (see ``fused_step``) computes ``training_step`` with ``torch.func.functional_call``,
its gradient with ``torch.func.grad_and_value``, accumulates, clips and applies the optimizer
update written as tensor ops. Around it this module keeps the eager step's observable
behaviour: the same progress counters, ``self.log`` values (returned from the graph and stored
afterwards, without a host-device sync), and the observing hooks ``on_before_zero_grad`` and
``on_before_backward``, which run after the graph. If the first call cannot compile, the loop
falls back to the eager step for good and ``trainer.explain()`` says why, unless the eager step
fails on the same batch too: that error (a bad batch, a bad loss) is then the user's, raised as
eager mode raises it, with nothing of the failed compile shown (see ``step/errors.py``).

A smaller last batch of an epoch (or of an evaluation dataloader) runs through the eager step
instead of compiling a second graph for it (``CompileConfig.eager_last_batch``, see
``step/last_batch.py``); ``trainer.explain()`` counts those calls.

Under ``torch.distributed`` the fused steps all-reduce their gradients in the graph
(``fastloop.distributed.grad_sync``; ``trainer.explain()`` names the placement). A step that
cannot compile there raises instead of falling back: the eager step would update this rank
alone while the other ranks wait in the all-reduce.
"""
from __future__ import annotations

import math
import re
import time
import warnings
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from fastloop.step.output import StepOutput
from fastloop.step.recurrent import RecurrentSwap
from fastloop.step.eager import eager_train_step
from fastloop.step.errors import first_line, quietly
from fastloop.step.fused_step import FusedStep
from fastloop.step.last_batch import EagerLastBatch
from fastloop.step.nonfinite import fused_notes, make_fused_guards

if TYPE_CHECKING:
    from fastloop.loops.optimizer import OptimizerLoop


class NotFusable(Exception):
    """Raised while tracing when ``training_step`` does something the fused step cannot express."""


# Dynamo reports an exception raised while tracing as "Unsupported: Observed exception", caused
# by an ``Observed<Name>Error("raised exception <Name>('message')")`` it made up.
_OBSERVED_NOT_FUSABLE = re.compile(r"raised exception NotFusable\((['\"])(.*)\1\)", re.S)


def compile_failure(exc: BaseException) -> str:
    """Why a compile failed, in one line; a ``NotFusable`` raised while tracing is named by its
    own message."""
    seen: Optional[BaseException] = exc
    for _ in range(16):  # a chain is short; a cyclic one must not hang
        if seen is None:
            break
        if isinstance(seen, NotFusable):
            return str(seen)
        match = _OBSERVED_NOT_FUSABLE.search(str(seen)) if type(seen).__name__.startswith("Observed") else None
        if match:
            return match.group(2)
        seen = seen.__cause__ or seen.__context__
    return first_line(exc)


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
        if not loss.requires_grad:  # known while tracing; the eager step then raises the user's error
            raise NotFusable("the loss returned by `training_step` does not require grad")
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
        # Host side of each fused step's device non-finite check (step/nonfinite.py).
        self.nonfinite_guards = make_fused_guards(loop.trainer, fused)
        # A smaller last batch of an epoch runs eagerly (step/last_batch.py), not as a second graph.
        self.eager_last = EagerLastBatch(loop.trainer.config.compile.eager_last_batch, self._eager_last_blocker())
        self._eager: Optional[Any] = None  # the eager step serving those batches, built on first use

    def _eager_last_blocker(self) -> str:
        """Why a smaller last batch cannot run eagerly here ('' when it can)."""
        if any(step.grad_sync is not None for step in self.fused.values()):
            return "under DDP the eager step would need the DDP wrapper"
        if any(step.scaler is not None for step in self.fused.values()):
            return "the fused step's loss scale (16-mixed) is not the eager step's"
        if type(self)._run_fused is not CompiledTrainStep._run_fused:
            return f"{type(self).__name__} runs its own graphs"
        return ""

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
                for idx, step in self.fused.items()] + self._sync_notes() + fused_notes(
            self.loop.trainer, self.nonfinite_guards) + [note for note in [self.eager_last.note("epoch")] if note]

    def _sync_notes(self) -> List[str]:
        """How the ranks are kept equal under torch.distributed (nothing in one process)."""
        return [f"optimizer {idx}: {note}" for idx, step in self.fused.items() for note in [step.sync_note()] if note]

    def __call__(self, batch: Any, batch_idx: int, opt_idx: int, optimizer: Optimizer) -> StepOutput:
        loop = self.loop
        trainer = loop.trainer
        eager_last = self.eager_last
        if eager_last.enabled and eager_last.has_reference(opt_idx) and self._at_last_batch(trainer) \
                and eager_last.applies(opt_idx, batch):
            return self._run_eager_last(batch, batch_idx, opt_idx, optimizer)
        hooks = trainer.hooks
        progress = loop.optim_progress.optimizer
        fused = self.fused[opt_idx]
        accumulate = trainer.accumulate_grad_batches
        stepping = not trainer.should_accumulate
        window_start = batch_idx % accumulate == 0
        fused.set_window_start(window_start)
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
        if eager_last.enabled:
            eager_last.remember(opt_idx, batch)  # the first compiled batch's shapes: the reference
        if window_start:
            progress.zero_grad.increment_ready()
            hooks.call("on_before_zero_grad", optimizer)
            progress.zero_grad.increment_started()
            progress.zero_grad.increment_completed()
        closure_loss = loss / accumulate if accumulate != 1 else loss
        hooks.call("on_before_backward", closure_loss)
        if stepping:
            guard = self.nonfinite_guards.get(opt_idx)
            if guard is not None:  # reads the device check when due (raises NonFiniteError)
                guard.after_step(trainer, batch_idx)
            progress.step.increment_completed()
        return StepOutput(closure_loss, extra)

    def _at_last_batch(self, trainer: Any) -> bool:
        """The batch being run is the last of the epoch, from a loader of known length."""
        epoch_loop = getattr(trainer._counting_fit_loop(), "epoch_loop", None)
        if epoch_loop is None or not math.isfinite(trainer.num_training_batches):
            return False
        return epoch_loop._num_ready_batches_reached()

    def _run_eager_last(self, batch: Any, batch_idx: int, opt_idx: int, optimizer: Optimizer) -> StepOutput:
        """The smaller last batch through the eager step: it shares the parameters, ``p.grad`` (an
        open accumulation window goes on in it) and the ``torch.optim`` state with the fused step,
        and counts its own progress. Compiled steps not read yet are checked first, in order."""
        guard = self.nonfinite_guards.get(opt_idx)
        if guard is not None:
            guard.read()
        if self._eager is None:
            self._eager = eager_train_step(self.loop)
        output = self._eager(batch, batch_idx, opt_idx, optimizer)
        self.eager_last.calls += 1
        # A host mirror of a device step count is stale once torch's step advanced it.
        self.fused[opt_idx].functional_optimizer._host_steps.clear()
        return output

    def _run_fused(self, opt_idx: int, fused: FusedStep, batch: Any, stepping: bool) -> Tuple[Tensor, Any]:
        """Run the fused step of ``opt_idx`` for one micro-batch (the CUDA-graph step overrides this)."""
        return fused(batch, step=stepping)

    def _fall_back(self, exc: Exception, batch: Any, batch_idx: int, opt_idx: int, optimizer: Optimizer,
                   stepping: bool) -> StepOutput:
        loop = self.loop
        if any(step.grad_sync is not None for step in self.fused.values()):
            raise RuntimeError(
                f"fastloop: the compiled DDP step could not be compiled ({compile_failure(exc)}); an eager "
                "fallback would update this rank alone. Run with Trainer(mode='eager') (eager DDP)") from exc
        if stepping:  # undo the count: the eager step counts this step itself
            loop.optim_progress.optimizer.step.total.ready -= 1
            loop.optim_progress.optimizer.step.current.ready -= 1
        # The same batch through the eager step: a user error (bad batch, bad loss) raises here
        # exactly as in eager mode, and nothing of the failed compile reaches the user.
        eager = eager_train_step(loop)
        output = eager(batch, batch_idx, opt_idx, optimizer)
        # The eager step served: the compiler was at fault. Eager for good, and say why.
        reason = f"the fused step could not be compiled ({compile_failure(exc)})"
        report = getattr(loop, "step_report", None)
        if report is not None:
            report.used = "eager"
            report.reasons.append(reason)
        warnings.warn(f"fastloop: falling back to the eager step: {reason}", RuntimeWarning, stacklevel=3)
        loop.train_step = eager
        return output


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
        self._recurrent: Optional[RecurrentSwap] = None  # the module's RNNs, unrolled while compiled
        # A smaller last batch of a dataloader runs eagerly (step/last_batch.py); keyed by hook.
        self.eager_last = EagerLastBatch(loop.trainer.config.compile.eager_last_batch)

    @property
    def graph_count(self) -> int:
        return self._backend.graphs

    @property
    def notes(self) -> List[str]:
        note = self.eager_last.note("dataloader")
        return [note] if note else []

    def _at_last_batch(self) -> bool:
        """The batch being run is the last of its dataloader, whose length is known."""
        progress = getattr(self.loop, "batch_progress", None)
        limit = getattr(self.loop, "_max_batches", math.inf)
        # Prediction counts with a plain Progress (no is_last_batch): the count against the limit.
        return progress is not None and math.isfinite(limit) and (
            getattr(progress, "is_last_batch", False) or progress.current.ready >= limit)

    def _fn(self, hook: str) -> Any:
        fn = self._compiled.get(hook)
        if fn is None:
            from fastloop.step._compile import with_fresh_code

            module = self.loop.trainer.module

            def eval_step(*args: Any) -> Any:
                return getattr(module, hook)(*args)

            fn = self._compiled[hook] = quietly(torch.compile(with_fresh_code(eval_step), backend=self._backend,
                                                              dynamic=False))
        return fn

    def __call__(self, hook: str, batch: Any, batch_idx: int, *rest: Any) -> Any:
        eager_last = self.eager_last
        if eager_last.enabled and eager_last.has_reference(hook) and self._at_last_batch() \
                and eager_last.applies(hook, batch):
            from fastloop.step.eager import EagerEvalStep

            eager_last.calls += 1
            return EagerEvalStep(self.loop)(hook, batch, batch_idx, *rest)
        trainer = self.loop.trainer
        metrics = trainer.metrics
        previous_hook, trainer.hooks.current_hook = trainer.hooks.current_hook, hook
        metrics.capture = self._capture
        graphs = self._backend.graphs
        start = time.perf_counter()
        failure: Optional[Exception] = None
        if self._recurrent is None:
            self._recurrent = RecurrentSwap(trainer.module)
        try:
            with self._recurrent:
                output = self._fn(hook)(batch, 0, *rest)
        except Exception as exc:  # compile failures surface here
            failure = exc
        finally:
            if self._backend.graphs != graphs:
                self.compile_seconds += time.perf_counter() - start
            metrics.capture = None
            trainer.hooks.current_hook = previous_hook
        if failure is not None:
            self._capture.clear()
            return self._fall_back(failure, hook, batch, batch_idx, *rest)
        logs, self._capture[:] = list(self._capture), []
        for name, value, options in logs:
            metrics.store(name, value, **options)
        if eager_last.enabled:
            eager_last.remember(hook, batch)
        return output

    def _fall_back(self, exc: Exception, hook: str, *args: Any) -> Any:
        """As the training step's: the eager hook on the same batch raises a user error as eager
        mode does; if it serves, the compiler was at fault and this loop runs eagerly from now."""
        from fastloop.step.eager import EagerEvalStep

        eager = EagerEvalStep(self.loop)
        output = eager(hook, *args)
        reason = f"{hook} could not be compiled ({compile_failure(exc)})"
        report = getattr(self.loop, "step_report", None)
        if report is not None:
            report.used = "eager"
            report.reasons.append(reason)
        warnings.warn(f"fastloop: {type(self.loop).__name__} falls back to eager: {reason}", RuntimeWarning,
                      stacklevel=3)
        self.loop.eval_step = eager
        return output
