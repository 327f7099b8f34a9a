"""``LearningRateMonitor``: log each optimizer's learning rate (and momentum) to the loggers,
with Lightning 1.9.5's names.

Names: ``lr-<OptimizerClass>``, or the scheduler's ``name`` when it has one; ``-1``, ``-2``...
for the second, third... optimizer of one class; ``/pg1``, ``/pg2``... (or ``/<group name>``)
for several parameter groups; ``<name>-momentum`` with ``log_momentum``. Values come from
``param_groups`` (Python floats), so logging them never synchronises with the device.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from typing import TYPE_CHECKING, Any, DefaultDict, Dict, List, Optional, Sequence, Tuple

from torch.optim import Optimizer

from fastloop.callback import Callback

if TYPE_CHECKING:
    from fastloop.module import Module
    from fastloop.trainer import Trainer


class LearningRateMonitor(Callback):
    """``logging_interval``: ``"step"`` (before each training batch whose step is logged, see
    ``Trainer(log_every_n_steps)``), ``"epoch"`` (at each training epoch start) or ``None``
    (each scheduler at its own interval; optimizers without a scheduler at both)."""

    def __init__(self, logging_interval: Optional[str] = None, log_momentum: bool = False) -> None:
        if logging_interval not in (None, "step", "epoch"):
            raise ValueError(f"LearningRateMonitor(logging_interval={logging_interval!r}): "
                             "should be 'step', 'epoch' or None")
        self.logging_interval = logging_interval
        self.log_momentum = log_momentum
        self.lrs: Dict[str, List[float]] = {}
        self.last_momentum_values: Dict[str, Optional[float]] = {}

    def on_train_start(self, trainer: "Trainer", pl_module: "Module") -> None:
        if not trainer.loggers:
            raise ValueError("Cannot use `LearningRateMonitor` callback with `Trainer` that has no logger.")
        if self.log_momentum and self._some_optimizer_lacks_momentum(trainer):
            warnings.warn("You have set log_momentum=True, but some optimizers do not have momentum. "
                          "This will log a value 0 for the momentum.", RuntimeWarning)
        names = [name for _, group_names in self._named_optimizers(trainer, "any") for name in group_names]
        self.lrs = {name: [] for name in names}
        self.last_momentum_values = {name + "-momentum": None for name in names}

    def on_train_batch_start(self, trainer: "Trainer", pl_module: "Module", batch: Any, batch_idx: int) -> None:
        if self.logging_interval == "epoch" or not _step_is_logged(trainer):
            return
        self._log(trainer, "step" if self.logging_interval is None else "any")

    def on_train_epoch_start(self, trainer: "Trainer", pl_module: "Module") -> None:
        if self.logging_interval != "step":
            self._log(trainer, "epoch" if self.logging_interval is None else "any")

    # ----------------------------------------------------------------- values
    def _log(self, trainer: "Trainer", interval: str) -> None:
        stats: Dict[str, float] = {}
        for optimizer, names in self._named_optimizers(trainer, interval):
            stats.update(self._stats_of(optimizer, names))
        if stats:
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            for logger in trainer.loggers:
                logger.log_metrics(stats, step=step)

    def _stats_of(self, optimizer: Optimizer, names: Sequence[str]) -> Dict[str, float]:
        stats: Dict[str, float] = {}
        use_betas = "betas" in optimizer.defaults
        for group, name in zip(optimizer.param_groups, names):
            stats[name] = group["lr"]
            self.lrs.setdefault(name, []).append(group["lr"])
            if self.log_momentum:
                momentum = group["betas"][0] if use_betas else group.get("momentum", 0)
                stats[name + "-momentum"] = momentum
                self.last_momentum_values[name + "-momentum"] = momentum
        return stats

    def _some_optimizer_lacks_momentum(self, trainer: "Trainer") -> bool:
        optimizers = [c.scheduler.optimizer for c in trainer.lr_scheduler_configs] or trainer.optimizers

        def lacks(key: str) -> bool:
            return any(key not in opt.defaults for opt in optimizers)

        return lacks("momentum") and lacks("betas")

    # ------------------------------------------------------------------ names
    def _named_optimizers(self, trainer: "Trainer", interval: str) -> List[Tuple[Optimizer, List[str]]]:
        """``(optimizer, one name per param group)`` to log at ``interval`` ("step", "epoch" or
        "any"): optimizers with a scheduler of that interval, then every optimizer without one.
        Names are derived for all of them, in the same order, so that they never depend on the
        interval."""
        seen: List[Optimizer] = []
        class_counts: DefaultDict[type, int] = defaultdict(int)
        named: List[Tuple[Optimizer, List[str], Optional[str]]] = []  # (optimizer, names, scheduler interval)
        for config in trainer.lr_scheduler_configs:
            optimizer = config.scheduler.optimizer
            base = config.name if config.name is not None else "lr-" + type(optimizer).__name__
            names = self._names_for(optimizer, base, seen, class_counts, count_class=config.name is None)
            named.append((optimizer, names, config.interval))
        for optimizer in trainer.optimizers:
            if any(optimizer is s for s in seen):
                continue
            names = self._names_for(optimizer, "lr-" + type(optimizer).__name__, seen, class_counts, count_class=True)
            named.append((optimizer, names, None))
        self._move_to_group_names([names for _, names, _ in named])
        return [(opt, names) for opt, names, every in named if every is None or interval in (every, "any")]

    @staticmethod
    def _names_for(optimizer: Optimizer, base: str, seen: List[Optimizer], class_counts: DefaultDict[type, int],
                   count_class: bool) -> List[str]:
        seen.append(optimizer)
        cls = type(optimizer)
        if count_class:
            class_counts[cls] += 1
        groups = optimizer.param_groups
        group_names = [g.get("name", f"pg{i}") for i, g in enumerate(groups, start=1)]
        duplicates = {n for n in group_names if group_names.count(n) > 1}
        if duplicates:
            raise ValueError(
                "A single `Optimizer` cannot have multiple parameter groups with identical `name` values. "
                f"{base} has duplicated parameter group names {duplicates}"
            )
        if class_counts.get(cls, 0) > 1:
            base = f"{base}-{class_counts[cls] - 1}"
        if len(groups) > 1:
            return [f"{base}/{n}" for n in group_names]
        return [f"{base}/{groups[0]['name']}"] if groups[0].get("name") else [base]

    def _move_to_group_names(self, name_lists: List[List[str]]) -> None:
        """An optimizer that gained parameter groups: its history moves from ``name`` to ``name/pg1``."""
        for names in name_lists:
            for name in names:
                old = name.replace("/pg1", "")
                if "/pg1" in name and old in self.lrs:
                    self.lrs[name] = self.lrs.pop(old)
                elif name not in self.lrs:
                    self.lrs[name] = []


def _step_is_logged(trainer: "Trainer") -> bool:
    """Lightning's ``should_update_logs``: the coming step is a multiple of ``log_every_n_steps``
    (``+ 1``: checked before the step runs), or the run is stopping."""
    step = trainer.fit_loop.epoch_loop._batches_that_stepped + 1
    return step % trainer.log_every_n_steps == 0 or trainer.should_stop
