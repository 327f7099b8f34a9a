"""Metrics logged with ``Module.log``: per-step values and per-epoch reductions.

Values stay tensors on their device; reductions accumulate with tensor ops, so logging adds no
host-device synchronisation to a step. ``trainer.callback_metrics`` exposes the latest values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch

if TYPE_CHECKING:
    from fastloop.trainer import Trainer

_REDUCTIONS = ("mean", "sum", "max", "min")
# Training hooks whose logs default to per-epoch values rather than per-step ones.
_EPOCH_LEVEL_TRAIN_HOOKS = {
    "on_train_start", "on_train_end", "on_train_epoch_start", "on_train_epoch_end", "training_epoch_end",
    "on_fit_start", "on_fit_end",
}


@dataclass
class _Accumulator:
    reduce_fx: str
    total: torch.Tensor
    weight: float

    def add(self, value: torch.Tensor, batch_size: int) -> None:
        if self.reduce_fx == "mean":
            self.total = self.total + value * batch_size
            self.weight += batch_size
        elif self.reduce_fx == "sum":
            self.total = self.total + value
        elif self.reduce_fx == "max":
            self.total = torch.maximum(self.total, value)
        else:
            self.total = torch.minimum(self.total, value)

    def compute(self) -> torch.Tensor:
        return self.total / self.weight if self.reduce_fx == "mean" else self.total


def extract_batch_size(batch: Any) -> int:
    """Length of the first tensor found in the batch (1 when there is none)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.ndim > 0 else 1
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            size = extract_batch_size(item)
            if size:
                return size
    return 1


class MetricLogger:
    """Receives ``Module.log`` calls for one trainer."""

    def __init__(self, trainer: "Trainer") -> None:
        self._trainer = trainer
        self.callback_metrics: Dict[str, torch.Tensor] = {}
        self.logged_metrics: Dict[str, torch.Tensor] = {}
        self.progress_bar_metrics: Dict[str, torch.Tensor] = {}
        self._epoch: Dict[str, _Accumulator] = {}
        self._prog_bar_keys: set = set()
        self.current_batch: Any = None
        self.dataloader_suffix = ""
        # When a list, ``log`` records calls instead of storing them (used while tracing a step).
        self.capture: Optional[List[Tuple[str, torch.Tensor, Dict[str, Any]]]] = None

    def reset_epoch(self) -> None:
        self._epoch = {}

    def log(
        self,
        name: str,
        value: Any,
        *,
        prog_bar: bool = False,
        logger: bool = True,
        on_step: Optional[bool] = None,
        on_epoch: Optional[bool] = None,
        reduce_fx: str = "mean",
        batch_size: Optional[int] = None,
    ) -> None:
        options = dict(prog_bar=prog_bar, logger=logger, on_step=on_step, on_epoch=on_epoch,
                       reduce_fx=reduce_fx, batch_size=batch_size)
        if self.capture is not None:
            self.capture.append((name, value, options))
            return
        self.store(name, value, **options)

    def store(self, name: str, value: Any, *, prog_bar: bool, logger: bool, on_step: Optional[bool],
              on_epoch: Optional[bool], reduce_fx: str, batch_size: Optional[int]) -> None:
        if reduce_fx not in _REDUCTIONS:
            raise ValueError(f"self.log({name!r}): reduce_fx must be one of {_REDUCTIONS}, got {reduce_fx!r}")
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"self.log({name!r}) needs a scalar, got a tensor of shape {tuple(value.shape)}")
            value = value.detach().reshape(())
        elif isinstance(value, (int, float, bool)):
            value = torch.tensor(float(value))
        else:
            raise TypeError(f"self.log({name!r}) got a {type(value).__name__}; log numbers or scalar tensors")
        step_default = self._step_level()
        on_step = step_default if on_step is None else on_step
        on_epoch = (not step_default) if on_epoch is None else on_epoch
        key = name + self.dataloader_suffix
        if prog_bar:
            self._prog_bar_keys.add(key)
        if on_step:
            step_key = key + "_step" if on_epoch else key
            self._publish(step_key, value, logger)
            if on_epoch:
                self.callback_metrics[key] = value
        if on_epoch:
            acc = self._epoch.get(key)
            if acc is None:
                acc = self._epoch[key] = _Accumulator(reduce_fx, torch.zeros((), dtype=value.dtype, device=value.device), 0.0)
                if reduce_fx in ("max", "min"):
                    acc.total = value.clone()
                    return
            size = batch_size if batch_size is not None else extract_batch_size(self.current_batch)
            acc.add(value, size)

    def epoch_end(self) -> Dict[str, torch.Tensor]:
        """Reduce this epoch's values into ``callback_metrics``; return them."""
        reduced = {}
        for key, acc in self._epoch.items():
            value = acc.compute()
            reduced[key] = value
            both = (key + "_step") in self.logged_metrics
            self._publish(key + "_epoch" if both else key, value, True)
            self.callback_metrics[key] = value
        self._epoch = {}
        return reduced

    def _publish(self, key: str, value: torch.Tensor, logger: bool) -> None:
        self.callback_metrics[key] = value
        if logger:
            self.logged_metrics[key] = value
        if key in self._prog_bar_keys or key.rsplit("_", 1)[0] in self._prog_bar_keys:
            self.progress_bar_metrics[key] = value

    def _step_level(self) -> bool:
        trainer = self._trainer
        if not trainer.state.training:
            return False
        return trainer.hooks.current_hook not in _EPOCH_LEVEL_TRAIN_HOOKS
