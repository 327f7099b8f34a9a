"""``TrainingEpochLoop``: one advance is one training batch.

Per batch (callbacks before the module at every ``[hook]``)::

    batch = next(fetcher); on_before_batch_transfer, transfer_batch_to_device, on_after_batch_transfer
    [on_train_batch_start(batch, batch_idx)]     # module returns -1: end the epoch here
    TrainingBatchLoop.run(batch, batch_idx)       # optimizer loop or manual loop
    step-interval LR schedulers (when an optimizer stepped); on the last batch, epoch-interval ones
    [on_train_batch_end(outputs, batch, batch_idx)]
    validation when due (val_check_interval, check_val_every_n_epoch, last batch)
    step-interval ReduceLROnPlateau schedulers

Resumed from a checkpoint written after a batch's optimization, the epoch goes on with the next
batch; the end work of the checkpointed batch that had not run (validation, from its start,
and the lines after it) runs first.
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
from fastloop.seed import isolate_rng


class TrainingEpochLoop(Loop):
    """Runs the batches of one epoch, validation when due, and LR schedulers.

    ``min_steps``/``max_steps`` left as None take the trainer's limits when read; limits given
    here, or assigned later, win over them.
    """

    def __init__(self, min_steps: Optional[int] = None, max_steps: Optional[int] = None) -> None:
        super().__init__()
        self._min_steps: Optional[int] = None
        self._max_steps: Optional[int] = None
        self.min_steps = min_steps
        self.max_steps = max_steps
        self.batch_progress = BatchProgress()
        self.scheduler_progress = SchedulerProgress()
        self.batch_loop = TrainingBatchLoop()
        self.val_loop = EvaluationLoop(verbose=False)
        self._batches_that_stepped = 0
        self._outputs: List[Any] = []
        self._end_of_batch_pending = False  # set by a restarting ``reset``
        self._validation_interrupted = False

    def connect(  # type: ignore[override]
        self, batch_loop: Optional[TrainingBatchLoop] = None, val_loop: Optional[EvaluationLoop] = None
    ) -> None:
        super().connect(batch_loop=batch_loop, val_loop=val_loop)

    # ------------------------------------------------------------------ limits
    @property
    def max_steps(self) -> int:
        """This loop's limit; else the trainer's; else -1 (no limit)."""
        if self._max_steps is not None:
            return self._max_steps
        return self._trainer.config.limits.max_steps if self._trainer is not None else -1

    @max_steps.setter
    def max_steps(self, value: Optional[int]) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < -1):
            raise ValueError(f"max_steps must be None (the trainer's), -1 (no limit) or an int >= 0, got {value!r}")
        self._max_steps = value

    @property
    def min_steps(self) -> Optional[int]:
        """This loop's minimum; else the trainer's (None: no minimum)."""
        if self._min_steps is not None or self._trainer is None:
            return self._min_steps
        return self._trainer.config.limits.min_steps

    @min_steps.setter
    def min_steps(self, value: Optional[int]) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"min_steps must be None (the trainer's) or an int >= 0, got {value!r}")
        self._min_steps = value

    def _init_argument(self, name: str) -> Any:
        # ``replace`` rebuilds a loop with the limits it was given (None: still the trainer's).
        if name in ("min_steps", "max_steps"):
            return getattr(self, "_" + name)
        return super()._init_argument(name)

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
        max_steps = self.max_steps
        return max_steps != -1 and self.global_step >= max_steps

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

    @property
    def resume_position(self) -> int:
        """Batches of the current epoch that a restarted run does not redo: those whose
        optimization ran (processed), even if their end hooks had not (a checkpoint written in
        ``on_train_batch_end``). ``reset()`` rolls the counters forward to it."""
        current = self.batch_progress.current
        return max(current.completed, current.processed)

    def reset(self) -> None:
        if self.restarting:
            # A checkpoint written after batch k's optimization (ready == processed == k) and
            # before batch k+1 was fetched comes from batch k's on_train_batch_end (completed
            # k - 1) or from its validation (completed k): ``on_run_start`` finishes that batch.
            current = self.batch_progress.current
            self._end_of_batch_pending = current.processed > 0 and current.ready == current.processed
            self._validation_interrupted = self._end_of_batch_pending and current.completed == current.processed
            self.batch_progress.finish_processed()
            self.batch_progress.reset_on_restart()
            self.scheduler_progress.reset_on_restart()
        else:
            self.batch_progress.reset_on_run()
            self.scheduler_progress.reset_on_run()
            self.batch_loop.optimizer_loop.optim_progress.optimizer.reset_on_run()
        self.val_loop.epoch_loop.batch_progress.total.reset()
        self._outputs = []

    def on_run_start(self, fetcher: DataFetcher) -> None:
        if not self.restarting:
            return
        # Validation never resumes mid-way: one that was interrupted runs again from its start.
        self.val_loop.restarting = False
        pending, self._end_of_batch_pending = self._end_of_batch_pending, False
        if not pending:
            return
        if self._validation_interrupted:
            # The checkpoint's RNG state already includes what this validation drew before it.
            with isolate_rng():
                self.on_advance_end()
        else:
            self.on_advance_end()

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
        trainer.logger_connector.on_train_batch_end()

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

    def reset_progress(self) -> None:
        self.batch_progress.reset()
        self.scheduler_progress.reset()
        self._batches_that_stepped = 0
        self.batch_loop.reset_progress()
