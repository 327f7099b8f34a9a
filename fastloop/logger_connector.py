"""From ``self.log`` to the loggers: which logger a ``Trainer(logger=...)`` gets, and when logged
values are sent.

As in Lightning 1.9: per-step training values go out every ``log_every_n_steps`` batches that
stepped an optimizer (and on the last one before a stop), at step ``_batches_that_stepped``;
reduced epoch values at each training epoch end and at the end of each validation or test run,
with an ``epoch`` entry. Values stay tensors until a row is due, so the batches in between add
no host-device synchronisation.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Tuple, Union

import torch

if TYPE_CHECKING:
    from fastloop.loggers import Logger
    from fastloop.trainer import Trainer

LoggerArg = Union[bool, None, "Logger", Iterable["Logger"]]


def configure_loggers(logger: LoggerArg, default_root_dir: str) -> List["Logger"]:
    """``True``: a ``CSVLogger`` under ``<default_root_dir>/lightning_logs``; ``False``/``None``: none."""
    if logger is None or logger is False:
        return []
    if logger is True:
        from fastloop.loggers import CSVLogger

        return [CSVLogger(save_dir=default_root_dir)]
    loggers = list(logger) if isinstance(logger, Iterable) else [logger]
    from fastloop.loggers import Logger

    for item in loggers:
        if not isinstance(item, Logger):
            raise TypeError(f"Trainer(logger=...) got a {type(item).__name__}; pass True/False, a fastloop.loggers.Logger "
                            "or a list of them")
    return loggers


class LoggerConnector:
    """Sends a trainer's logged values to its loggers."""

    def __init__(self, trainer: "Trainer", log_every_n_steps: int) -> None:
        if not isinstance(log_every_n_steps, int) or isinstance(log_every_n_steps, bool) or log_every_n_steps < 0:
            raise ValueError(f"log_every_n_steps must be an int >= 0, got {log_every_n_steps!r}")
        self.trainer = trainer
        self.log_every_n_steps = log_every_n_steps
        # Rows of per-batch evaluation values are numbered by a batch counter per stage and
        # dataloader, which runs on across validation runs of one fit (as Lightning's).
        self._eval_batches: Dict[Tuple[str, int], int] = {}

    def reset_evaluation_steps(self) -> None:
        """At each entry point, and when loaders are reloaded."""
        self._eval_batches = {}

    def _batches_that_stepped(self) -> int:
        loop = self.trainer._counting_fit_loop()
        return loop.epoch_loop._batches_that_stepped if loop is not None else 0

    def log_metrics(self, metrics: Dict[str, Any], step: Optional[int] = None, save: bool = True) -> None:
        """Convert to floats and send one row to every logger (adds ``epoch`` when ``step`` is None).

        ``save=False`` for per-step rows: the logger writes them at its own flush interval
        (``CSVLogger(flush_logs_every_n_steps=100)``) and at the next epoch end, instead of
        rewriting its file every ``log_every_n_steps`` batches as Lightning 1.9 does.
        """
        trainer = self.trainer
        if not trainer.loggers or not metrics:
            return
        row = {key: float(value) if isinstance(value, torch.Tensor) else value  # host sync: only when a row is due
               for key, value in metrics.items()}
        if step is None:
            row.setdefault("epoch", trainer.current_epoch)
            step = self._batches_that_stepped()
        for logger in trainer.loggers:
            logger.log_metrics(row, step=step)
            if save:
                logger.save()

    # ------------------------------------------------------------ training
    def on_train_batch_end(self) -> None:
        """After the batch's ``on_train_batch_end`` hooks: a row of step values when due.
        Runs every batch: the cheap checks come first."""
        trainer = self.trainer
        if not trainer.loggers or not trainer.metrics.step_log:
            return
        loop = trainer._counting_fit_loop()
        if loop is None:
            return
        epoch_loop = loop.epoch_loop
        every = self.log_every_n_steps
        due = every and (epoch_loop._batches_that_stepped + 1) % every == 0
        if not (due or trainer.should_stop or trainer.debug.fast_dev_run) or epoch_loop._should_accumulate():
            return
        self.log_metrics(trainer.metrics.step_log, save=False)

    def on_train_epoch_end(self) -> None:
        """After ``epoch_end`` reduced the epoch: its values, at the last step of the epoch."""
        trainer = self.trainer
        if not trainer.loggers or not trainer.metrics.epoch_log:
            return
        # Lightning logs epoch values at the step of the epoch's last stepping batch.
        row = dict(trainer.metrics.epoch_log)
        row.setdefault("epoch", trainer.current_epoch)
        self.log_metrics(row, step=self._batches_that_stepped() - 1)

    def on_evaluation_batch_end(self, dataloader_idx: int) -> None:
        """After an evaluation batch's end hooks: its per-step values, if any were logged."""
        trainer = self.trainer
        if trainer.sanity_checking:
            return
        key = (trainer.state.eval_stage, dataloader_idx)
        step = self._eval_batches.get(key, 0)
        self._eval_batches[key] = step + 1
        if trainer.loggers and trainer.metrics.step_log:
            self.log_metrics(trainer.metrics.step_log, step=step, save=False)

    def on_evaluation_end(self) -> None:
        """After a validation or test run (not a sanity check): its epoch values."""
        trainer = self.trainer
        if trainer.sanity_checking or not trainer.loggers or not trainer.metrics.epoch_log:
            return
        self.log_metrics(trainer.metrics.epoch_log)

    # ------------------------------------------------------------ run boundaries
    def log_hyperparams(self) -> None:
        """At fit/validate/test start: the module's (and datamodule's) saved hyperparameters."""
        trainer = self.trainer
        if not trainer.loggers or trainer.module is None:
            return
        from fastloop.hparams import hyperparameters_to_log

        params = hyperparameters_to_log(trainer.module, trainer.datamodule)
        for logger in trainer.loggers:
            if params is not None:
                logger.log_hyperparams(params)
            logger.log_graph(trainer.module)
            logger.save()

    def finalize(self, status: str) -> None:
        for logger in self.trainer.loggers:
            logger.finalize(status)
