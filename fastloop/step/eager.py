"""The eager step: the reference semantics every other mode must reproduce."""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, List, Optional

import torch
from torch.optim import Optimizer

from fastloop.loops.optimizer import StepOutput
from fastloop.step.precision import autocast

if TYPE_CHECKING:
    from fastloop.loops.optimizer import OptimizerLoop


class EagerTrainStep:
    """One automatic-optimization step for one optimizer, run op by op with every hook.

    Order: ``optimizer_step(..., closure)`` whose closure runs ``training_step``, the
    zero-grad hooks (first batch of an accumulation window), the backward hooks; the optimizer
    wrapper then runs ``on_before_optimizer_step`` and clipping before the torch step. While
    accumulating, only the closure runs.
    """

    mode = "eager"

    def __init__(self, loop: "OptimizerLoop") -> None:
        self.loop = loop
        self._warned_none = False

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
            return result.loss

        toggle = loop.toggle_parameters
        if toggle:
            module.toggle_optimizer(optimizer, opt_idx)
        try:
            if trainer.should_accumulate:
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
        return results[-1]

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
