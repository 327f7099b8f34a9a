"""Metrics logged with ``Module.log``: per-step values and per-epoch reductions.

Values stay tensors on their device; reductions accumulate with tensor ops, so logging adds no
host-device synchronisation to a step. ``trainer.callback_metrics`` exposes the latest values.

With several processes, ``sync_dist=True`` reduces a value across ranks (``reduce_fx``: mean by
default, sum, max, min): a per-step value when it is logged, an epoch value when it is computed
(mean: over every sample of every rank). Each is a collective, so it happens only when asked
for; values logged without ``sync_dist`` stay per-rank.
"""
from __future__ import annotations

import builtins
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

import torch

from fastloop.distributed.sync import sync_value, sync_weighted_mean

if TYPE_CHECKING:
    from fastloop.trainer import Trainer

_REDUCTIONS = ("mean", "sum", "max", "min")
# ``reduce_fx`` may be one of these callables (Lightning accepts them); matched by identity.
REDUCE_FX_CALLABLES = ((torch.mean, "mean"), (torch.sum, "sum"), (torch.max, "max"), (torch.min, "min"),
                       (builtins.sum, "sum"), (builtins.max, "max"), (builtins.min, "min"))
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
    sync_dist: bool = False  # reduce across ranks when computed
    sync_dist_group: Any = None
    _synced: Optional[torch.Tensor] = None  # the last cross-rank value, until the next add

    def add(self, value: torch.Tensor, batch_size: int) -> None:
        self._synced = None
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
        if not self.sync_dist:
            return self.total / self.weight if self.reduce_fx == "mean" else self.total
        # A collective: computed once per epoch end on every rank (publish_epoch_values, then
        # epoch_end, reuse it unless a value was added in between, on every rank alike).
        if self._synced is None:
            if self.reduce_fx == "mean":
                self._synced = sync_weighted_mean(self.total, self.weight, self.sync_dist_group)
            else:
                self._synced = sync_value(self.total, self.reduce_fx, self.sync_dist_group)
        return self._synced


class _MetricObjectAccumulator:
    """A torchmetrics ``Metric`` logged on epoch: its own state accumulates (the user calls it
    in the step); at epoch end the value is ``compute()`` and the metric is ``reset()``, as in
    Lightning."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric

    def add(self, value: Any, batch_size: int) -> None:
        self.metric = value

    def compute(self) -> torch.Tensor:
        value = self.metric.compute()
        self.metric.reset()
        return torch.as_tensor(value).detach()


class _Computed:
    """An epoch value already computed (a ``Metric`` after ``publish_epoch_values``)."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value

    def add(self, value: Any, batch_size: int) -> None:
        raise RuntimeError("a torchmetrics Metric was logged again after its epoch value was computed")

    def compute(self) -> torch.Tensor:
        return self.value


def is_metric_object(value: Any) -> bool:
    """A torchmetrics ``Metric`` (checked without importing torchmetrics when it is not loaded)."""
    module = sys.modules.get("torchmetrics")
    return module is not None and isinstance(value, module.Metric)


def _reduce_fx_name(name: str, reduce_fx: Any) -> str:
    if isinstance(reduce_fx, str):
        fx = reduce_fx.lower()
    else:
        fx = next((n for fn, n in REDUCE_FX_CALLABLES if reduce_fx is fn), None)
    if fx not in _REDUCTIONS:
        raise ValueError(
            f"self.log({name!r}): reduce_fx must be one of {_REDUCTIONS} or torch.mean/sum/max/min, got {reduce_fx!r}"
        )
    return fx


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
        self._epoch: Dict[str, Any] = {}  # key -> _Accumulator or _MetricObjectAccumulator
        self._epoch_options: Dict[str, Tuple[bool, bool]] = {}  # key -> (logger, also logged on step)
        # Values for loggers: the latest per-step ones of this training epoch, and the reduced
        # ones of the last epoch end. They stay tensors until a logger is due (no host sync).
        self.step_log: Dict[str, torch.Tensor] = {}
        self.epoch_log: Dict[str, torch.Tensor] = {}
        self._paused: List[Tuple[Dict[str, Any], Dict[str, Tuple[bool, bool]], Dict[str, torch.Tensor]]] = []
        self._prog_bar_keys: set = set()
        self.current_batch: Any = None
        self.dataloader_suffix = ""
        # When a list, ``log`` records calls instead of storing them (used while tracing a step).
        self.capture: Optional[List[Tuple[str, torch.Tensor, Dict[str, Any]]]] = None

    def reset_epoch(self) -> None:
        self._epoch = {}
        self._epoch_options = {}
        self.step_log = {}

    def begin_evaluation(self) -> None:
        """Set a training epoch's accumulators aside while validation runs inside it."""
        self._paused.append((self._epoch, self._epoch_options, self.step_log))
        self.reset_epoch()

    def end_evaluation(self) -> None:
        self._epoch, self._epoch_options, self.step_log = self._paused.pop()

    def log(
        self,
        name: str,
        value: Any,
        *,
        prog_bar: bool = False,
        logger: bool = True,
        on_step: Optional[bool] = None,
        on_epoch: Optional[bool] = None,
        reduce_fx: Union[str, Any] = "mean",
        batch_size: Optional[int] = None,
        sync_dist: bool = False,
        sync_dist_group: Any = None,
    ) -> None:
        options = dict(prog_bar=prog_bar, logger=logger, on_step=on_step, on_epoch=on_epoch,
                       reduce_fx=reduce_fx, batch_size=batch_size)
        if sync_dist:  # only then, so that the options of most calls stay as they were
            options.update(sync_dist=True, sync_dist_group=sync_dist_group)
        if self.capture is not None:
            self.capture.append((name, value, options))
            return
        self.store(name, value, **options)

    def store(self, name: str, value: Any, *, prog_bar: bool, logger: bool, on_step: Optional[bool],
              on_epoch: Optional[bool], reduce_fx: Union[str, Any], batch_size: Optional[int],
              sync_dist: bool = False, sync_dist_group: Any = None) -> None:
        """Record one logged value (from ``log``, or replayed from a compiled step's outputs)."""
        reduce_fx = _reduce_fx_name(name, reduce_fx)
        metric_object = None
        if is_metric_object(value):
            metric_object, value = value, getattr(value, "_forward_cache", None)
        step_default = self._step_level()
        on_step = step_default if on_step is None else on_step
        on_epoch = (not step_default) if on_epoch is None else on_epoch
        if metric_object is not None and on_step and value is None:
            raise ValueError(
                f"self.log({name!r}, metric, on_step=True) needs the metric's value for this batch: call the metric "
                "(metric(preds, target)) rather than metric.update(), or log it with on_step=False"
            )
        value = _as_scalar(name, value) if value is not None else None
        key = name + self.dataloader_suffix
        if prog_bar:
            self._prog_bar_keys.add(key)
        if on_step:
            step_key = key + "_step" if on_epoch else key
            step_value = value
            if sync_dist and metric_object is None:  # a torchmetrics Metric syncs itself
                step_value = sync_value(value, reduce_fx, sync_dist_group)
            # As in Lightning, per-step values of evaluation go to loggers and the progress bar
            # only; callbacks see evaluation values once reduced.
            training = self._trainer.state.training
            self._publish(step_key, step_value, logger, callback=training)
            if logger:
                self.step_log[step_key] = step_value
            if on_epoch and training:
                self.callback_metrics[key] = step_value
        if on_epoch:
            acc = self._epoch.get(key)
            if acc is None:
                if metric_object is not None:
                    self._epoch[key] = _MetricObjectAccumulator(metric_object)
                    self._epoch_options[key] = (logger, on_step)
                    return
                acc = self._epoch[key] = _Accumulator(reduce_fx, torch.zeros((), dtype=value.dtype, device=value.device),
                                                      0.0, sync_dist, sync_dist_group)
                self._epoch_options[key] = (logger, on_step)
                if reduce_fx in ("max", "min"):
                    acc.total = value.clone()
                    return
            size = batch_size if batch_size is not None else extract_batch_size(self.current_batch)
            acc.add(metric_object if metric_object is not None else value, size)

    def publish_epoch_values(self) -> None:
        """Put this epoch's reductions so far into ``callback_metrics`` (before the epoch-end
        hooks, which may read them, as in Lightning); tensor ops only, no host sync. A logged
        ``Metric`` is computed here once and its value kept for ``epoch_end``."""
        for key, acc in list(self._epoch.items()):
            value = acc.compute()
            if isinstance(acc, _MetricObjectAccumulator):
                self._epoch[key] = _Computed(value)
            self.callback_metrics[key] = value

    def epoch_end(self) -> Dict[str, torch.Tensor]:
        """Reduce this epoch's values into ``callback_metrics``; return them. ``epoch_log`` then
        holds the reduced values meant for loggers, under their logged names (``loss_epoch``
        where ``loss`` was also logged per step)."""
        reduced = {}
        self.epoch_log = {}
        for key, acc in self._epoch.items():
            value = acc.compute()
            reduced[key] = value
            logger, also_on_step = self._epoch_options.get(key, (True, False))
            logged_key = key + "_epoch" if also_on_step else key
            self._publish(logged_key, value, logger)
            self.callback_metrics[key] = value
            if logger:
                self.epoch_log[logged_key] = value
        self._epoch = {}
        self._epoch_options = {}
        return reduced

    def _publish(self, key: str, value: torch.Tensor, logger: bool, callback: bool = True) -> None:
        if callback:
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


def _as_scalar(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"self.log({name!r}) needs a scalar, got a tensor of shape {tuple(value.shape)}")
        return value.detach().reshape(())
    if isinstance(value, (int, float, bool)):
        return torch.tensor(float(value))
    raise TypeError(
        f"self.log({name!r}) got a {type(value).__name__}; log numbers, scalar tensors or torchmetrics Metrics"
    )
