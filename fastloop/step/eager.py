"""The eager step: the reference semantics every other mode must reproduce."""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, List, Optional

import torch
from torch.optim import Optimizer

from fastloop.step.output import StepOutput
from fastloop.optim import clip_gradients
from fastloop.step.nonfinite import EagerNonFiniteCheck
from fastloop.step.precision import autocast

if TYPE_CHECKING:
    from fastloop.loops.optimizer import OptimizerLoop


class EagerTrainStep:
    """One automatic-optimization step for one optimizer, run op by op with every hook.

    Order: ``optimizer_step(..., closure)`` whose closure runs ``training_step``, the
    zero-grad hooks (first batch of an accumulation window), the backward hooks; the optimizer
    wrapper then runs ``on_before_optimizer_step`` and clipping before the torch step. While
    accumulating, only the closure runs. The non-finite check (``Trainer(nonfinite=...)``, see
    ``step/nonfinite.py``) runs at the end of the closure, after backward.
    """

    mode = "eager"

    def __init__(self, loop: "OptimizerLoop", notes: Optional[List[str]] = None) -> None:
        self.loop = loop
        self._notes: List[str] = list(notes or [])
        self._warned_none = False
        trainer = loop.trainer
        self.nonfinite = EagerNonFiniteCheck(trainer.config.nonfinite, trainer.module, len(trainer.optimizers) > 1)

    @property
    def notes(self) -> List[str]:
        """Shown by ``trainer.explain()``."""
        return self._notes + self.nonfinite.notes()

    def __call__(self, batch: Any, batch_idx: int, opt_idx: int, optimizer: Optimizer) -> StepOutput:
        loop = self.loop
        trainer = loop.trainer
        module = trainer.module
        progress = loop.optim_progress.optimizer
        accumulate = trainer.accumulate_grad_batches
        step_fn = loop.make_step_fn(batch, batch_idx, opt_idx)
        window_start = batch_idx % accumulate == 0
        results: List[StepOutput] = []

        precision = trainer.config.precision
        scaler = trainer.grad_scaler if module.automatic_optimization else None
        stepping = not trainer.should_accumulate
        nonfinite = self.nonfinite if self.nonfinite.active else None

        def closure() -> Optional[torch.Tensor]:
            with autocast(trainer.device.type, precision):
                output = step_fn()
            result = StepOutput.from_training_step_output(output, accumulate)
            results.append(result)
            if result.closure_loss is None:
                self._warn_none()
            if window_start:
                progress.zero_grad.increment_ready()
                trainer.hooks.call("on_before_zero_grad", optimizer)
                progress.zero_grad.increment_started()
                trainer.hooks.call_module("optimizer_zero_grad", trainer.current_epoch, batch_idx, optimizer, opt_idx)
                progress.zero_grad.increment_completed()
            if result.closure_loss is not None:
                loss = scaler.scale(result.closure_loss) if scaler is not None else result.closure_loss
                trainer._run_backward(loss, optimizer, opt_idx, **loop.backward_kwargs(opt_idx))
                if nonfinite is not None:
                    self._check_nonfinite(nonfinite, optimizer, opt_idx, result, stepping, window_start,
                                          batch_idx, scaler is None)
            return result.loss

        toggle = loop.toggle_parameters
        if toggle:
            module.toggle_optimizer(optimizer, opt_idx)
        try:
            if not stepping:
                with trainer.strategy.block_backward_sync():  # DDP: no all-reduce while accumulating
                    closure()
            else:
                progress.step.increment_ready()
                trainer.hooks.call_module(
                    "optimizer_step", trainer.current_epoch, batch_idx, trainer.optimizer_wrappers[opt_idx],
                    opt_idx, closure, on_tpu=False, using_lbfgs=isinstance(optimizer, torch.optim.LBFGS),
                )
                progress.step.increment_completed()
        finally:
            if toggle:
                module.untoggle_optimizer(opt_idx)
        if not results:
            raise RuntimeError(
                "The optimizer closure was not executed: an overridden `optimizer_step` must call "
                "`optimizer.step(closure=optimizer_closure)` (or `optimizer_closure()`)"
            )
        if stepping and nonfinite is not None and nonfinite.policy == "skip":
            nonfinite.log(trainer.metrics, opt_idx)
        return results[-1]

    def _check_nonfinite(self, nonfinite: EagerNonFiniteCheck, optimizer: Optimizer, opt_idx: int,
                         result: StepOutput, stepping: bool, window_start: bool, batch_idx: int,
                         check_grads: bool) -> bool:
        """After backward: note the loss of an accumulating micro-batch, or check loss and gradients
        before the step (raises under "raise"; under "skip" clears the gradients, so that the
        torch step leaves parameters and state alone, and returns True)."""
        if not stepping:
            nonfinite.window_loss(opt_idx, result.loss, window_start)
            return False
        return nonfinite.check(optimizer, opt_idx, result.loss, window_start, self.loop.trainer.global_step,
                               batch_idx, check_grads)

    def _warn_none(self) -> None:
        if not self._warned_none:
            self._warned_none = True
            warnings.warn(
                "`training_step` returned `None`: backward was skipped for this batch. If this was on "
                "purpose, ignore this warning.", UserWarning, stacklevel=2,
            )


class EagerEvalStep:
    """Calls ``validation_step``/``test_step``/``predict_step`` directly."""

    mode = "eager"

    def __init__(self, loop: Any) -> None:
        self.loop = loop

    def __call__(self, hook: str, *args: Any) -> Any:
        return self.loop.trainer.hooks.call_module(hook, *args)


# Hooks that run inside an eager step. When neither the module nor a callback overrides any
# of them, ``DirectEagerStep`` runs the same operations without the closure plumbing.
STEP_HOOKS = (
    "optimizer_step", "optimizer_zero_grad", "backward", "configure_gradient_clipping",
    "on_before_zero_grad", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
)


def direct_step_blocker(loop: "OptimizerLoop") -> Optional[str]:
    """Why ``DirectEagerStep`` cannot stand in for ``EagerTrainStep`` (None: it can)."""
    trainer = loop.trainer
    if not trainer.module.automatic_optimization:
        return "manual optimization"
    if trainer.strategy.is_distributed:
        return "distributed: training_step runs through DistributedDataParallel"
    overridden = loop.overridden_extension_points()
    if overridden:
        return f"{type(loop).__name__} overrides {overridden[0]}"
    for hook in STEP_HOOKS:
        if trainer.hooks.overridden_by(hook):
            return f"{hook} is overridden"
    for opt in trainer.optimizers:
        if isinstance(opt, torch.optim.LBFGS):
            return "optimizer LBFGS calls its closure more than once"
        if not type(opt).__module__.startswith("torch.optim"):
            return (f"optimizer {type(opt).__name__} is not one of torch.optim's own classes (its step may "
                    "call the closure other than once, its zero_grad may do more)")
        if "zero_grad" in vars(opt):
            return f"optimizer {type(opt).__name__} has its own zero_grad (set on the instance)"
    if trainer.config.precision != "32":
        return "mixed precision"
    return None


def clear_grads(optimizer: Optimizer) -> None:
    """What ``optimizer.zero_grad()`` (``set_to_none=True``) does for a built-in torch optimizer:
    every parameter's ``.grad`` becomes None.

    Without ``zero_grad``'s profiler range (``Optimizer.zero_grad#Adam.zero_grad``) and its
    dynamo-disable wrapper, which cost 35-55 µs per call inside a fit on the 2-core CPU VM, 4-5 %
    of a tiny-MLP step (``benchmarks/eager_overhead.py``). Only for optimizers whose class is
    torch's own and whose ``zero_grad`` is not replaced (``direct_step_blocker``).
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = None


class DirectEagerStep(EagerTrainStep):
    """``EagerTrainStep``'s operations, counters and order without closures or hook dispatch.

    Chosen once per fit when no hook inside the step is overridden and every optimizer is a
    built-in one that calls its closure exactly once: then ``training_step``, zero_grad (first
    batch of an accumulation window, done by ``clear_grads``), backward, clipping and the torch
    step are exactly what the generic path runs, minus the per-step plumbing.
    """

    def __init__(self, loop: "OptimizerLoop") -> None:
        super().__init__(loop, ["direct eager step: no hook inside the step is overridden; "
                                "gradients are cleared with param.grad = None"])
        trainer = loop.trainer
        # Fixed for the fit this step is built for (steps are rebuilt by every entry point).
        self.module = trainer.module
        self.hooks = trainer.hooks
        self.accumulate = trainer.accumulate_grad_batches
        self.clip_val = trainer.gradient_clip_val
        self.clip_algorithm = trainer.gradient_clip_algorithm
        self.several = len(trainer.optimizers) > 1

    def __call__(self, batch: Any, batch_idx: int, opt_idx: int, optimizer: Optimizer) -> StepOutput:
        module, hooks = self.module, self.hooks
        progress = self.loop.optim_progress.optimizer
        stepping = self.accumulate == 1 or not module.trainer.should_accumulate
        if stepping:
            progress.step.increment_ready()
        if self.several:
            module.toggle_optimizer(optimizer, opt_idx)
        try:
            previous, hooks.current_hook = hooks.current_hook, "training_step"
            try:
                output = (module.training_step(batch, batch_idx, opt_idx) if self.several
                          else module.training_step(batch, batch_idx))
            finally:
                hooks.current_hook = previous
            result = StepOutput.from_training_step_output(output, self.accumulate)
            if result.closure_loss is None:
                self._warn_none()
            window_start = batch_idx % self.accumulate == 0
            if window_start:
                progress.zero_grad.increment_ready_started()  # no hook between the two here
                clear_grads(optimizer)
                progress.zero_grad.increment_completed()
            skip = False
            if result.closure_loss is not None:
                result.closure_loss.backward()
                if self.nonfinite.active:
                    skip = self._check_nonfinite(self.nonfinite, optimizer, opt_idx, result, stepping, window_start,
                                                 batch_idx, True)
            if stepping:
                if not skip:
                    if self.clip_val:
                        clip_gradients(optimizer, self.clip_val, self.clip_algorithm)
                    optimizer.step()
                if self.nonfinite.policy == "skip":
                    self.nonfinite.log(module.trainer.metrics, opt_idx)
                progress.step.increment_completed()
        finally:
            if self.several:
                module.untoggle_optimizer(opt_idx)
        return result


def eager_train_step(loop: "OptimizerLoop") -> EagerTrainStep:
    """The direct eager step where it is equivalent, else the generic one (noting why)."""
    blocker = direct_step_blocker(loop)
    if blocker is None:
        return DirectEagerStep(loop)
    return EagerTrainStep(loop, [f"eager step with every hook dispatched: {blocker}"])
