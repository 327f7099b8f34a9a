"""``EarlyStopping``: stop ``fit`` when a monitored metric stops improving, as Lightning 1.9.5.

The check runs at the end of the training epoch when validation runs once per epoch (or not at
all), else at the end of each validation (``check_on_train_epoch_end`` overrides the choice).
``patience`` counts checks, not epochs. Reading the metric synchronises with the device, so it
happens only at these epoch-level check points.
"""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple

import torch

from fastloop.callback import Callback

if TYPE_CHECKING:
    from fastloop.module import Module
    from fastloop.trainer import Trainer

log = logging.getLogger(__name__)


class EarlyStopping(Callback):
    """Set ``trainer.should_stop`` once ``monitor`` has not improved by more than ``min_delta``
    for ``patience`` checks, is not finite, crosses ``stopping_threshold`` (good enough) or
    ``divergence_threshold`` (hopeless)."""

    mode_dict = {"min": torch.lt, "max": torch.gt}
    order_dict = {"min": "<", "max": ">"}

    def __init__(
        self,
        monitor: str,
        min_delta: float = 0.0,
        patience: int = 3,
        verbose: bool = False,
        mode: str = "min",
        strict: bool = True,
        check_finite: bool = True,
        stopping_threshold: Optional[float] = None,
        divergence_threshold: Optional[float] = None,
        check_on_train_epoch_end: Optional[bool] = None,
        log_rank_zero_only: bool = False,
    ) -> None:
        if mode not in self.mode_dict:
            raise ValueError(f"EarlyStopping(mode={mode!r}): `mode` can be 'min' or 'max'")
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.verbose = verbose
        self.strict = strict
        self.check_finite = check_finite
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self.log_rank_zero_only = log_rank_zero_only
        self._check_on_train_epoch_end = check_on_train_epoch_end
        # Stored signed so that "improved" is always monitor_op(current - min_delta, best).
        self.min_delta = min_delta if mode == "max" else -min_delta
        self.wait_count = 0
        self.stopped_epoch = 0
        self.best_score = torch.tensor(math.inf if mode == "min" else -math.inf)

    @property
    def monitor_op(self) -> Callable[..., torch.Tensor]:
        return self.mode_dict[self.mode]

    @property
    def state_key(self) -> str:
        key = {"monitor": self.monitor, "mode": self.mode}
        return f"{type(self).__qualname__}{key!r}"

    def state_dict(self) -> Dict[str, Any]:
        return {"wait_count": self.wait_count, "stopped_epoch": self.stopped_epoch,
                "best_score": self.best_score, "patience": self.patience}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.wait_count = state_dict["wait_count"]
        self.stopped_epoch = state_dict["stopped_epoch"]
        self.best_score = state_dict["best_score"]
        self.patience = state_dict["patience"]

    # ------------------------------------------------------------------- hooks
    def setup(self, trainer: "Trainer", pl_module: "Module", stage: str) -> None:
        if self._check_on_train_epoch_end is None:
            # Validation once per epoch (or none): check at epoch end; otherwise after each validation.
            self._check_on_train_epoch_end = trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1

    def on_train_epoch_end(self, trainer: "Trainer", pl_module: "Module") -> None:
        if self._check_on_train_epoch_end and not self._skip_check(trainer):
            self._run_early_stopping_check(trainer)

    def on_validation_end(self, trainer: "Trainer", pl_module: "Module") -> None:
        if not self._check_on_train_epoch_end and not self._skip_check(trainer):
            self._run_early_stopping_check(trainer)

    @staticmethod
    def _skip_check(trainer: "Trainer") -> bool:
        return not trainer.state.fitting or trainer.sanity_checking

    # ------------------------------------------------------------------- check
    def _metric_available(self, metrics: Dict[str, torch.Tensor]) -> bool:
        if self.monitor in metrics:
            return True
        message = (
            f"Early stopping conditioned on metric `{self.monitor}` which is not available. Pass in or modify your "
            f"`EarlyStopping` callback to use any of the following: `{'`, `'.join(metrics)}`"
        )
        if self.strict:
            raise RuntimeError(message)
        if self.verbose:
            log.warning(message)
        return False

    def _run_early_stopping_check(self, trainer: "Trainer") -> None:
        metrics = trainer.callback_metrics
        if trainer.fast_dev_run or not self._metric_available(metrics):
            return
        current = metrics[self.monitor].squeeze()
        # host sync: the criteria read `current`; once per check (epoch level), never per step
        should_stop, reason = self._evaluate_stopping_criteria(current)
        trainer.should_stop = trainer.should_stop or should_stop
        if should_stop:
            self.stopped_epoch = trainer.current_epoch
        if reason and self.verbose:
            log.info(reason)

    def _evaluate_stopping_criteria(self, current: torch.Tensor) -> Tuple[bool, Optional[str]]:
        """``(should_stop, reason)``; updates ``best_score`` and ``wait_count``."""
        op = self.monitor_op
        if self.check_finite and not torch.isfinite(current):
            return True, (f"Monitored metric {self.monitor} = {current} is not finite. "
                          f"Previous best value was {self.best_score:.3f}. Signaling Trainer to stop.")
        if self.stopping_threshold is not None and op(current, self.stopping_threshold):
            return True, (f"Stopping threshold reached: {self.monitor} = {current} {self.order_dict[self.mode]} "
                          f"{self.stopping_threshold}. Signaling Trainer to stop.")
        if self.divergence_threshold is not None and op(-current, -self.divergence_threshold):
            return True, (f"Divergence threshold reached: {self.monitor} = {current} {self.order_dict[self.mode]} "
                          f"{self.divergence_threshold}. Signaling Trainer to stop.")
        if op(current - self.min_delta, self.best_score.to(current.device)):
            reason = self._improvement_message(current)
            self.best_score = current
            self.wait_count = 0
            return False, reason
        self.wait_count += 1
        if self.wait_count >= self.patience:
            return True, (f"Monitored metric {self.monitor} did not improve in the last {self.wait_count} records. "
                          f"Best score: {self.best_score:.3f}. Signaling Trainer to stop.")
        return False, None

    def _improvement_message(self, current: torch.Tensor) -> str:
        if torch.isfinite(self.best_score):
            return (f"Metric {self.monitor} improved by {abs(self.best_score - current):.3f} >= "
                    f"min_delta = {abs(self.min_delta)}. New best score: {current:.3f}")
        return f"Metric {self.monitor} improved. New best score: {current:.3f}"
