"""Lightning 1.x's read-only Trainer attributes (``lightning_module``, ``callback_metrics``,
``checkpoint_callback``, ``log_dir``, ``estimated_stepping_batches``...), kept out of the
``Trainer`` facade. Each reads the state that the trainer, its loops and its connectors own."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

import torch

from fastloop.callback import Callback
from fastloop.datamodule import DataModule
from fastloop.module import Module
from fastloop.trainer_args import estimated_stepping_batches


class TrainerAttributes:
    """Mixed into ``Trainer``."""

    @property
    def lightning_module(self) -> Optional[Module]:
        return self.module

    @property
    def model(self) -> Optional[Module]:
        return self.module

    @property
    def datamodule(self) -> Optional[DataModule]:
        return self.data.datamodule

    @property
    def callback_metrics(self) -> Dict[str, torch.Tensor]:
        return self.metrics.callback_metrics

    @property
    def logged_metrics(self) -> Dict[str, torch.Tensor]:
        return self.metrics.logged_metrics

    @property
    def progress_bar_metrics(self) -> Dict[str, torch.Tensor]:
        return self.metrics.progress_bar_metrics

    @property
    def training(self) -> bool:
        return self.state.training

    @property
    def validating(self) -> bool:
        return self.state.validating

    @property
    def testing(self) -> bool:
        return self.state.testing

    @property
    def predicting(self) -> bool:
        return self.state.predicting

    @property
    def sanity_checking(self) -> bool:
        return self.state.sanity_checking

    # -------------------------------------------------- callbacks and loggers
    @property
    def checkpoint_callbacks(self) -> List[Callback]:
        from fastloop.callbacks import ModelCheckpoint

        return [cb for cb in self._all_callbacks() if isinstance(cb, ModelCheckpoint)]

    @property
    def checkpoint_callback(self) -> Optional[Callback]:
        """The first ``ModelCheckpoint``, or None."""
        callbacks = self.checkpoint_callbacks
        return callbacks[0] if callbacks else None

    @property
    def early_stopping_callbacks(self) -> List[Callback]:
        from fastloop.callbacks import EarlyStopping

        return [cb for cb in self._all_callbacks() if isinstance(cb, EarlyStopping)]

    @property
    def early_stopping_callback(self) -> Optional[Callback]:
        callbacks = self.early_stopping_callbacks
        return callbacks[0] if callbacks else None

    @property
    def progress_bar_callback(self) -> Optional[Callback]:
        from fastloop.callbacks import ProgressBar

        return next((cb for cb in self._all_callbacks() if isinstance(cb, ProgressBar)), None)

    def _all_callbacks(self) -> List[Callback]:
        """The running callbacks (with the module's ``configure_callbacks``), else the given ones."""
        return self.hooks.callbacks if self.module is not None else self.callbacks

    @property
    def logger(self) -> Optional[Any]:
        """The first logger, or None."""
        return self.loggers[0] if self.loggers else None

    @logger.setter
    def logger(self, logger: Optional[Any]) -> None:
        self.loggers = [] if logger is None else [logger]

    @property
    def log_dir(self) -> str:
        """Lightning 1.9's rule: TensorBoard's ``log_dir``, another logger's ``save_dir``, else
        ``default_root_dir``."""
        if not self.loggers:
            return self.default_root_dir
        first = self.loggers[0]
        from fastloop.loggers import TensorBoardLogger

        return first.log_dir if isinstance(first, TensorBoardLogger) else (first.save_dir or self.default_root_dir)

    @property
    def log_every_n_steps(self) -> int:
        return self.logger_connector.log_every_n_steps

    # ------------------------------------------------------ run description
    @property
    def fast_dev_run(self) -> int:
        """Batches per stage of a ``fast_dev_run`` (0: off)."""
        return self.debug.fast_dev_run

    @property
    def overfit_batches(self) -> Union[int, float]:
        return self.debug.overfit_batches

    # ------------------------------------------------ processes (trainer.strategy)
    @property
    def is_global_zero(self) -> bool:
        """Whether this is the process that writes checkpoints and logs (global rank 0)."""
        return self.strategy.is_global_zero

    @property
    def global_rank(self) -> int:
        return self.strategy.global_rank

    @property
    def local_rank(self) -> int:
        return self.strategy.local_rank

    @property
    def node_rank(self) -> int:
        return self.strategy.node_rank

    @property
    def world_size(self) -> int:
        """Processes in the run (all nodes)."""
        return self.strategy.world_size

    @property
    def num_nodes(self) -> int:
        return self.strategy.num_nodes

    @property
    def num_devices(self) -> int:
        """Processes (devices) per node."""
        return self.strategy.num_processes

    @property
    def val_check_interval(self) -> Union[int, float]:
        return self.config.validation.val_check_interval

    @property
    def check_val_every_n_epoch(self) -> Optional[int]:
        return self.config.validation.check_val_every_n_epoch

    @property
    def num_sanity_val_steps(self) -> int:
        return self.config.validation.num_sanity_val_steps

    @property
    def limit_train_batches(self) -> Union[int, float]:
        return self.config.limits.limit_train_batches

    @property
    def limit_val_batches(self) -> Union[int, float]:
        return self.config.limits.limit_val_batches

    @property
    def num_val_batches(self) -> List[Union[int, float]]:
        """Batches per validation loader (requests the loaders if needed)."""
        if self.module is None or not self.data.has_source("val"):
            return []
        return list(self.data.stage_data("val", self.config.limits.limit_val_batches).max_batches)

    @property
    def min_epochs(self) -> Optional[int]:
        loop = self._counting_fit_loop()
        return loop.min_epochs if loop is not None else None

    @property
    def estimated_stepping_batches(self) -> Union[int, float]:
        """Optimizer steps this fit will take (for OneCycleLR's ``total_steps``), as Lightning
        estimates them: requests the training loader when it is not there yet."""
        if self.train_data is None and self.module is not None:
            self.prepare_training_data()
        return estimated_stepping_batches(self.max_epochs, self.max_steps, self.num_training_batches,
                                          self.accumulate_grad_batches)
