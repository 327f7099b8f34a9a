"""``ManualOptimization``: one ``training_step`` per batch; the user steps the optimizers.

Per batch::

    training_step(batch, batch_idx)
      self.manual_backward(loss) -> [on_before_backward], backward, [on_after_backward]
      opt.step(closure)          -> closure, [on_before_optimizer_step], torch step   (counts global_step)

No zero_grad, backward, clipping, accumulation or LR scheduling is automated.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from torch import Tensor

from fastloop.loops.base import Loop
from fastloop.loops.optimizer import has_parameter
from fastloop.loops.progress import Progress, ReadyCompletedTracker


class ManualOptimization(Loop):
    """Runs ``training_step`` once; counts the steps taken through ``self.optimizers()``."""

    def __init__(self) -> None:
        super().__init__()
        self.optim_step_progress = Progress.from_defaults(ReadyCompletedTracker)
        self._done = False
        self._output: Optional[Dict[str, Any]] = None

    def setup(self) -> None:
        trainer = self.trainer
        module = trainer.module
        if module.automatic_optimization:
            return
        config = trainer.config.optimization
        if config.gradient_clip_val:
            raise ValueError(
                "gradient_clip_val is not supported with manual optimization: call "
                "self.clip_gradients(opt, gradient_clip_val=...) in training_step instead"
            )
        if config.accumulate_grad_batches != 1:
            raise ValueError(
                "Automatic gradient accumulation is not supported for manual optimization: "
                "accumulate in training_step instead"
            )
        if len(trainer.optimizers) > 1 and has_parameter(module.training_step, "optimizer_idx"):
            raise ValueError(
                "with manual optimization `training_step` must not take `optimizer_idx`; use self.optimizers()"
            )
        for wrapper in trainer.optimizer_wrappers:
            wrapper.on_before_step = self.optim_step_progress.increment_ready
            wrapper.on_after_step = self.optim_step_progress.increment_completed

    @property
    def done(self) -> bool:
        return self._done

    def reset(self) -> None:
        self._done = False
        self._output = None

    def advance(self, batch: Any, batch_idx: int) -> None:
        output = self.trainer.strategy.training_step(batch, batch_idx)  # through DDP when distributed
        self._output = self._parse(output)
        self._done = True

    @staticmethod
    def _parse(output: Any) -> Optional[Dict[str, Any]]:
        if output is None:
            return None
        if isinstance(output, Tensor):
            return {"loss": output.detach()}
        if isinstance(output, dict):
            return {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in output.items()}
        raise TypeError(
            f"with manual optimization `training_step` must return None, a Tensor or a dict; "
            f"it returned {type(output).__name__}"
        )

    def on_run_end(self) -> Optional[Dict[str, Any]]:
        return self._output
