"""Shared pieces of the ModelCheckpoint / EarlyStopping / LearningRateMonitor tests: a module
whose validation loss follows a script, a logger that records its calls, and trainer
construction (eager, no progress bar)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from fastloop import Trainer
from fastloop.callbacks.model_checkpoint import ModelCheckpoint
from fastloop.loggers import Logger
from fastloop.testing import BoringModel, random_loader


class ScriptedValLoss(BoringModel):
    """Logs ``val_loss = values[current_epoch]`` from every validation step (so the epoch mean
    is exactly that value) and ``val_acc = -val_loss``; with ``train_values``, also the
    epoch-level ``train_metric = train_values[current_epoch]`` from every training step."""

    def __init__(self, values: Optional[Sequence[float]] = None, train_values: Optional[Sequence[float]] = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.values = list(values or [])
        self.train_values = list(train_values) if train_values is not None else None

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.train_values is not None:
            self.log("train_metric", torch.tensor(self.train_values[self.current_epoch]), on_step=False,
                     on_epoch=True)
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        value = torch.tensor(self.values[self.current_epoch])
        self.log("val_loss", value)
        self.log("val_acc", -value)


class RecordingLogger(Logger):
    """A logger that writes nothing and records the calls the callbacks make."""

    def __init__(self, save_dir: Optional[str] = None, name: str = "fake", version: Any = 0) -> None:
        self._save_dir = save_dir
        self._name = name
        self._version = version
        self.metrics: List[Tuple[Dict[str, float], Optional[int]]] = []
        self.saved_by: List[Any] = []

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> Any:
        return self._version

    @property
    def save_dir(self) -> Optional[str]:
        return self._save_dir

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: Dict[str, float], step: Optional[int] = None) -> None:
        self.metrics.append((dict(metrics), step))

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self.saved_by.append(checkpoint_callback)

    def logged(self, prefix: str) -> List[Tuple[Dict[str, float], Optional[int]]]:
        """The ``log_metrics`` calls with keys starting with ``prefix``, those keys only."""
        calls = [({k: v for k, v in m.items() if k.startswith(prefix)}, step) for m, step in self.metrics]
        return [(m, step) for m, step in calls if m]


def loaders(n_train: int = 64, n_val: int = 32, batch_size: int = 16) -> Tuple[Any, Any]:
    """Training and validation loaders: ``n_train / batch_size`` training batches per epoch."""
    return random_loader(n=n_train, batch_size=batch_size), random_loader(n=n_val, batch_size=batch_size, seed=1)


def make_trainer(callbacks: Sequence[Any], logger: Any = None, **kwargs: Any) -> Trainer:
    """An eager trainer with ``callbacks``, ``logger`` (None: no logger), and none of the
    default callbacks (progress bar, model summary, a ModelCheckpoint of its own)."""
    kwargs.setdefault("enable_progress_bar", False)
    kwargs.setdefault("enable_model_summary", False)
    kwargs.setdefault("enable_checkpointing", any(isinstance(cb, ModelCheckpoint) for cb in callbacks))
    return Trainer(callbacks=list(callbacks), logger=logger if logger is not None else False, **kwargs)
