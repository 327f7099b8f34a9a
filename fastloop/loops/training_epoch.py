"""``TrainingEpochLoop``: one advance is one training batch.

Per batch (callbacks before the module at every ``[hook]``)::

    batch = next(fetcher); on_before_batch_transfer, transfer_batch_to_device, on_after_batch_transfer
    [on_train_batch_start(batch, batch_idx)]     # module returns -1: end the epoch here
    TrainingBatchLoop.run(batch, batch_idx)       # optimizer loop or manual loop
    step-interval LR schedulers (when an optimizer stepped); on the last batch, epoch-interval ones
    [on_train_batch_end(outputs, batch, batch_idx)]
    validation when due (val_check_interval, check_val_every_n_epoch, last batch)
    step-interval ReduceLROnPlateau schedulers
"""
from __future__ import annotations

import math
from typing import Any, List, Optional

import torch

from fastloop.data.fetcher import DataFetcher
from fastloop.loops.base import Loop
from fastloop.loops.evaluation import EvaluationLoop
from fastloop.loops.progress import BatchProgress, SchedulerProgress
from fastloop.loops.training_batch import TrainingBatchLoop


class TrainingEpochLoop(Loop):
    """Runs the batches of one epoch, validation when due, and LR schedulers."""

    def __init__(self, min_steps: Optional[int] = None, max_steps: int = -1) -> None:
        super().__init__()
        if max_steps < -1:
            raise ValueError(f"max_steps must be -1 (no limit) or >= 0, got {max_steps}")
        self.min_steps = min_steps
        self.max_steps = max_steps
        self.batch_progress = BatchProgress()
        self.scheduler_progress = SchedulerProgress()
        self.batch_loop = TrainingBatchLoop()
        self.val_loop = EvaluationLoop(verbose=False)
        self._batches_that_stepped = 0
        self._outputs: List[Any] = []

    def connect(  # type: ignore[override]
        self, batch_loop: Optional[TrainingBatchLoop] = None, val_loop: Optional[EvaluationLoop] = None
    ) -> None:
        super().connect(batch_loop=batch_loop, val_loop=val_loop)

    # ---------------------------------------------------------------- counters
    @property
    def batch_idx(self) -> int:
        return self.batch_progress.current.ready - 1

    @property
    def total_batch_idx(self) -> int:
        return self.batch_progress.total.ready - 1

    @property
    def global_step(self) -> int:
        batch_loop = self.batch_loop
        return (batch_loop.optimizer_loop.optim_progress.optimizer.step.total.completed
                + batch_loop.manual_loop.optim_step_progress.total.completed)

    @property
    def max_steps_reached(self) -> bool:
        return self.max_steps != -1 and self.global_step >= self.max_steps

    @property
    def min_steps_met(self) -> bool:
        return self.min_steps is None or self.global_step >= self.min_steps

    def _num_ready_batches_reached(self) -> bool:
        progress = self.batch_progress
        return progress.is_last_batch or progress.current.ready >= self.trainer.num_training_batches

    # ---------------------------------------------------------------- skeleton
    @property
    def done(self) -> bool:
        if self._num_ready_batches_reached() or self.max_steps_reached:
            return True
        return self.trainer.should_stop and self.min_steps_met

    def reset(self) -> None:
        if self.restarting:
            self.batch_progress.reset_on_restart()
            self.scheduler_progress.reset_on_restart()
        else:
            self.batch_progress.reset_on_run()
            self.scheduler_progress.reset_on_run()
            self.batch_loop.optimizer_loop.optim_progress.optimizer.reset_on_run()
        self.val_loop.epoch_loop.batch_progress.total.reset()
        self._outputs = []

    def advance(self, fetcher: DataFetcher) -> None:
        trainer = self.trainer
        hooks = trainer.hooks
        progress = self.batch_progress
        batch_idx = progress.current.ready
        batch = next(fetcher)  # StopIteration ends the epoch
        progress.is_last_batch = fetcher.done
        batch = trainer.data.transfer(batch, 0)
        trainer.metrics.current_batch = batch
        progress.increment_ready()

        if hooks.call("on_train_batch_start", batch, batch_idx) == -1:
            progress.increment_processed()
            raise StopIteration
        progress.increment_started()

        outputs = self.batch_loop.run(batch, batch_idx)
        progress.increment_processed()

        self.update_lr_schedulers("step", update_plateau_schedulers=False)
        if self._num_ready_batches_reached():
            self.update_lr_schedulers("epoch", update_plateau_schedulers=False)

        hooks.call("on_train_batch_end", outputs, batch, batch_idx)
        progress.increment_completed()
        if hooks.module_overrides("training_epoch_end"):
            self._outputs.append(outputs)

    def on_advance_end(self) -> None:
        trainer = self.trainer
        if self._should_check_val():
            with trainer.state.stage_as("validate"), torch.no_grad():
                self.val_loop.run()
        self.update_lr_schedulers("step", update_plateau_schedulers=True)
        if not self._should_accumulate():
            self._batches_that_stepped += 1

    def on_run_end(self) -> List[Any]:
        outputs, self._outputs = self._outputs, []
        return outputs

    # -------------------------------------------------------------- decisions
    def _should_accumulate(self) -> bool:
        """True while gradients of this batch are only accumulated (no optimizer step)."""
        trainer = self.trainer
        accumulate = trainer.config.optimization.accumulate_grad_batches
        if accumulate == 1 or not trainer.module.automatic_optimization:
            return False
        window_done = self.batch_progress.current.ready % accumulate == 0
        return not (window_done or self._num_ready_batches_reached())

    def _should_check_val(self) -> bool:
        trainer = self.trainer
        if not trainer.validation_enabled:
            return False
        every_n = trainer.config.validation.check_val_every_n_epoch
        if every_n is not None and (trainer.current_epoch + 1) % every_n != 0:
            return False
        is_last = self._num_ready_batches_reached()
        if trainer.should_stop:
            return True
        interval = trainer.val_check_batch
        if interval == math.inf:
            return is_last
        index = self.batch_idx if every_n is not None else self.total_batch_idx
        return (index + 1) % interval == 0

    def update_lr_schedulers(self, interval: str, update_plateau_schedulers: bool) -> None:
        """Step the schedulers of ``interval`` whose optimizer ran in this batch."""
        trainer = self.trainer
        if not trainer.lr_scheduler_configs or not trainer.module.automatic_optimization:
            return
        if interval == "step" and self._should_accumulate():
            return
        active = set(trainer.active_optimizer_indices(max(self.batch_idx, 0)))
        index = (self._batches_that_stepped if interval == "step" else trainer.current_epoch) + 1
        for config in trainer.lr_scheduler_configs:
            if config.opt_idx not in active or update_plateau_schedulers != config.reduce_on_plateau:
                continue
            if config.interval != interval or index % config.frequency != 0:
                continue
            metric = None
            if config.reduce_on_plateau:
                metric = trainer.metrics.callback_metrics.get(config.monitor)
                if metric is None:
                    if config.strict:
                        available = ", ".join(sorted(trainer.metrics.callback_metrics)) or "none"
                        raise KeyError(
                            f"ReduceLROnPlateau conditioned on metric {config.monitor!r}, which was not logged. "
                            f"Available metrics: {available}. Set `strict=False` in the scheduler dict to skip."
                        )
                    continue
            self.scheduler_progress.increment_ready()
            trainer.hooks.call_module("lr_scheduler_step", config.scheduler, config.opt_idx, metric)
            self.scheduler_progress.increment_completed()

    # ------------------------------------------------------------------ state
    def on_save_checkpoint(self) -> dict:
        return {"_batches_that_stepped": self._batches_that_stepped}

    def on_load_checkpoint(self, state_dict: dict) -> None:
        self._batches_that_stepped = state_dict.get("_batches_that_stepped", 0)

    def _on_state_loaded(self) -> None:
        # A batch whose optimization ran is not run again on resume.
        self.batch_progress.finish_processed()

    def reset_progress(self) -> None:
        self.batch_progress.reset()
        self.scheduler_progress.reset()
        self._batches_that_stepped = 0
        self.batch_loop.reset_progress()
