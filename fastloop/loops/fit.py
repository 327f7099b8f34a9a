"""``FitLoop``: one advance is one training epoch.

Hook order of ``trainer.fit`` (callbacks before the module at every ``[hook]``)::

    configure_callbacks, prepare_data, [setup("fit")], configure_optimizers, [on_fit_start]
    FitLoop.run():
        sanity check (unless resuming): on_sanity_check_start, val loop, on_sanity_check_end
        train_dataloader, [on_train_start]
        for each epoch:
            [on_train_epoch_start]
            TrainingEpochLoop.run()          # batches, validation when due
            training_epoch_end(outputs)      # only if overridden
            [on_train_epoch_end]
            epoch-interval ReduceLROnPlateau schedulers
        [on_train_end]
    [on_fit_end], [teardown("fit")]
"""
from __future__ import annotations

import logging
from typing import Any, List, Optional

from fastloop.data.connector import set_epoch
from fastloop.data.fetcher import DataFetcher
from fastloop.loops.base import Loop
from fastloop.loops.progress import Progress
from fastloop.loops.training_epoch import TrainingEpochLoop
from fastloop.optim_snapshot import OptimizerSnapshot
from fastloop.seed import capture_rng_states, isolate_rng, restore_rng_states

log = logging.getLogger(__name__)


class FitLoop(Loop):
    """Runs training epochs until ``max_epochs``/``max_steps`` or ``trainer.should_stop``.

    ``min_epochs``/``max_epochs`` left as None take the trainer's limits (``Trainer(max_epochs=...)``)
    when read; limits given here, or assigned later (``loop.max_epochs = 3``), win over them.
    """

    _runtime_attributes = {"_fetcher": None, "_fresh_optimizers": None}

    def __init__(self, min_epochs: Optional[int] = None, max_epochs: Optional[int] = None) -> None:
        super().__init__()
        self._min_epochs: Optional[int] = None
        self._max_epochs: Optional[int] = None
        self.min_epochs = min_epochs
        self.max_epochs = max_epochs
        self.epoch_loop = TrainingEpochLoop()
        self.epoch_progress = Progress()
        self._outputs: List[Any] = []
        self._fetcher: Optional[DataFetcher] = None
        self._epoch_rng_state: Optional[dict] = None
        self._fresh_optimizers: Optional[OptimizerSnapshot] = None  # taken by ``setup``

    # ---------------------------------------------------------------- limits
    @property
    def max_epochs(self) -> Optional[int]:
        """This loop's limit; else the trainer's (its default: 1000 without ``max_steps``, else
        none, -1); None while neither is known."""
        if self._max_epochs is not None or self._trainer is None:
            return self._max_epochs
        limits = self._trainer.config.limits
        if limits.max_epochs is not None:
            return limits.max_epochs
        return 1000 if limits.max_steps == -1 else -1

    @max_epochs.setter
    def max_epochs(self, value: Optional[int]) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < -1):
            raise ValueError(f"max_epochs must be None (the trainer's), -1 (no limit) or an int >= 0, got {value!r}")
        self._max_epochs = value

    @property
    def min_epochs(self) -> int:
        """This loop's minimum; else the trainer's; else 1 when ``min_steps`` is set, or 0."""
        if self._min_epochs is not None:
            return self._min_epochs
        if self._trainer is not None and self._trainer.config.limits.min_epochs is not None:
            return self._trainer.config.limits.min_epochs
        return 1 if self.min_steps is not None else 0

    @min_epochs.setter
    def min_epochs(self, value: Optional[int]) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"min_epochs must be None (the trainer's) or an int >= 0, got {value!r}")
        self._min_epochs = value

    def _init_argument(self, name: str) -> Any:
        # ``replace`` rebuilds a loop with the limits it was given (None: still the trainer's).
        if name in ("min_epochs", "max_epochs"):
            return getattr(self, "_" + name)
        return super()._init_argument(name)

    # ------------------------------------------------------------ forwarding
    @property
    def min_steps(self) -> Optional[int]:
        return self.epoch_loop.min_steps

    @min_steps.setter
    def min_steps(self, value: Optional[int]) -> None:
        self.epoch_loop.min_steps = value

    @property
    def max_steps(self) -> int:
        return self.epoch_loop.max_steps

    @max_steps.setter
    def max_steps(self, value: Optional[int]) -> None:
        self.epoch_loop.max_steps = value

    @property
    def global_step(self) -> int:
        return self.epoch_loop.global_step

    @property
    def batch_idx(self) -> int:
        return self.epoch_loop.batch_idx

    @property
    def total_batch_idx(self) -> int:
        return self.epoch_loop.total_batch_idx

    def connect(self, epoch_loop: Optional[TrainingEpochLoop] = None) -> None:  # type: ignore[override]
        super().connect(epoch_loop=epoch_loop)

    @property
    def restarting(self) -> bool:
        return self._restarting

    @restarting.setter
    def restarting(self, restarting: bool) -> None:
        # A checkpoint taken after an epoch's work was processed resumes with a fresh epoch.
        current = self.epoch_progress.current
        unfinished = current.ready != current.processed or current.started != current.processed
        Loop.restarting.fset(self, restarting and unfinished)  # type: ignore[attr-defined]

    # -------------------------------------------------------------- skeleton
    @property
    def _stop_epochs_reached(self) -> bool:
        return self.max_epochs not in (None, -1) and self.epoch_progress.current.processed >= self.max_epochs

    @property
    def done(self) -> bool:
        trainer = self.trainer
        if trainer.num_training_batches == 0:
            log.info("`Trainer.fit` stopped: there are no training batches.")
            return True
        if self.epoch_loop.max_steps_reached or self._stop_epochs_reached:
            return True
        if trainer.should_stop:
            min_epochs_met = self.epoch_progress.current.processed >= self.min_epochs
            if min_epochs_met and self.epoch_loop.min_steps_met:
                return True
            log.info(
                "Trainer was signaled to stop but the required `min_epochs=%s` or `min_steps=%s` has not been "
                "met. Training will continue...", self.min_epochs, self.min_steps,
            )
            trainer.should_stop = False
        return False

    @property
    def skip(self) -> bool:
        return self.done or self.trainer.config.limits.limit_train_batches == 0

    def on_skip(self) -> None:
        self._finish_processed_epoch()

    def reset(self) -> None:
        self._finish_processed_epoch()
        if self.restarting:
            self.epoch_progress.reset_on_restart()

    def _finish_processed_epoch(self) -> None:
        """Count an epoch whose work was processed as completed. A checkpoint written in
        ``on_train_epoch_end`` (after ``processed``, before ``completed``) resumes with the next
        epoch, and ``trainer.current_epoch`` counts it."""
        self.epoch_progress.finish_processed()

    def on_run_start(self) -> None:
        trainer = self.trainer
        trainer._register_fit_loop(self)
        if not self.restarting and not self.epoch_loop.restarting:
            self._run_sanity_check()
        trainer.module.train()
        trainer.prepare_training_data()
        trainer.hooks.call("on_train_start")

    def _run_sanity_check(self) -> None:
        trainer = self.trainer
        if not trainer._sanity_check_due():
            return
        val_loop = self.epoch_loop.val_loop
        with trainer.state.stage_as("sanity_check"), isolate_rng():
            trainer.hooks.call_callbacks("on_sanity_check_start")
            val_loop.run()
            trainer.hooks.call_callbacks("on_sanity_check_end")
        val_loop.reset_progress()
        trainer.metrics.callback_metrics.clear()
        trainer.metrics.logged_metrics.clear()
        trainer.metrics.progress_bar_metrics.clear()

    def on_advance_start(self) -> None:
        trainer = self.trainer
        epoch = self.epoch_progress.current.completed
        every = trainer.reload_dataloaders_every_n_epochs
        if every and epoch > 0 and epoch % every == 0 and not self.epoch_loop.restarting:
            trainer.reload_dataloaders()  # reload_dataloaders_every_n_epochs: fresh loaders from their sources
            trainer.prepare_training_data()
        loader = trainer.train_data.loaders[0]
        set_epoch(loader, epoch)
        self.epoch_progress.increment_ready()
        trainer.metrics.reset_epoch()
        trainer.hooks.call("on_train_epoch_start")
        self.epoch_progress.increment_started()

    def advance(self) -> None:
        fetcher = self._start_fetcher()
        with self.trainer.state.stage_as("train"):
            self._outputs = self.epoch_loop.run(fetcher)

    def _start_fetcher(self) -> DataFetcher:
        """A fetcher for this epoch; when resuming mid-epoch, positioned after the done batches."""
        trainer = self.trainer
        data = trainer.train_data
        resuming = self.epoch_loop.restarting
        skip = self.epoch_loop.resume_position if resuming else 0
        loader = data.loaders[0]
        data.check_lengths(self.epoch_progress.current.completed)  # before the epoch's first step
        fetcher = DataFetcher(loader, data.max_batches[0], copier=trainer.data.device_copier(),
                              name="train_dataloader")
        if resuming and skip and trainer._resume_loader_position(loader, skip):
            skip = 0  # the loader restored its own position
        if resuming and self._epoch_rng_state is not None:
            # Recreate this epoch's shuffle order as drawn when the epoch first started.
            now = capture_rng_states()
            restore_rng_states(self._epoch_rng_state)
            fetcher.start(skip)
            restore_rng_states(now)
        else:
            self._epoch_rng_state = capture_rng_states()
            fetcher.start(skip)
        self._fetcher = fetcher
        return fetcher

    def on_advance_end(self) -> None:
        trainer = self.trainer
        self._close_fetcher()
        if trainer.hooks.module_overrides("training_epoch_end"):
            returned = trainer.hooks.call_module("training_epoch_end", self._outputs)
            if returned is not None:
                raise TypeError("`training_epoch_end` must return None; log values with self.log instead")
        self._outputs = []
        self.epoch_progress.increment_processed()
        with trainer.state.stage_as("train"):
            trainer.metrics.publish_epoch_values()
            trainer.hooks.call("on_train_epoch_end")
            trainer.metrics.epoch_end()
            trainer.logger_connector.on_train_epoch_end()
        self.epoch_loop.update_lr_schedulers("epoch", update_plateau_schedulers=True)
        self.epoch_progress.increment_completed()

    def on_run_end(self) -> None:
        from fastloop.step.nonfinite import check_pending

        check_pending(self.trainer)  # a fit stopped between reads of the device-side check still raises
        self.trainer.hooks.call("on_train_end")

    def teardown(self) -> None:
        self._close_fetcher()
        super().teardown()

    def _close_fetcher(self) -> None:
        # Dropped, not kept closed: it holds the loader, which holds threads or native objects.
        if self._fetcher is not None:
            self._fetcher.close()
            self._fetcher = None

    def on_save_checkpoint(self) -> dict:
        return {"epoch_rng_state": self._epoch_rng_state} if self._epoch_rng_state is not None else {}

    def on_load_checkpoint(self, state_dict: dict) -> None:
        self._epoch_rng_state = state_dict.get("epoch_rng_state")

    def reset_progress(self) -> None:
        """Forget epochs and steps run so far, so that ``run()`` trains from epoch 0 again.

        For outer loops that call ``fit_loop.run()`` several times (cross-validation folds,
        active-learning cycles).
        """
        self.epoch_progress.reset()
        self.epoch_loop.reset_progress()
        self._epoch_rng_state = None

    # ------------------------------------------------- restarting training from an outer loop
    def setup(self) -> None:
        # The optimizers as configure_optimizers built them (before a checkpoint is restored).
        trainer = self.trainer
        self._fresh_optimizers = OptimizerSnapshot(trainer.optimizers, trainer.lr_scheduler_configs)

    def reset_epochs(self) -> None:
        """Let the next ``run()`` train from epoch 0 again (``trainer.current_epoch == 0``),
        keeping ``global_step`` and the loop's total counters (unlike ``reset_progress``).

        For outer loops that call ``fit_loop.run()`` once per cycle (active learning): step-based
        logging, checkpoint names and ``max_steps`` go on counting across cycles.
        """
        self.epoch_progress.reset_on_run()
        self._epoch_rng_state = None

    def reset_optimizers(self) -> None:
        """Give every optimizer and LR scheduler back the state ``configure_optimizers`` gave it
        (learning rates, scheduler positions, no moments), in place.

        Unlike ``trainer.setup_optimizers()`` nothing is rebuilt: the optimizer objects, the
        built steps and, in compiled mode, their graphs keep serving (see
        ``fastloop.optim_snapshot``). Call it between runs of this loop, not during one.
        """
        if self._fresh_optimizers is None:
            raise RuntimeError("FitLoop.reset_optimizers() needs a running entry point (call it from a loop's hooks)")
        self._fresh_optimizers.restore()
