"""A dependency-free progress display.

On a terminal it redraws one line every ``refresh_rate`` batches; elsewhere (CI logs) it prints
one line per epoch. Reading the loss for display synchronises with the device, so it happens
only at those refresh points.
"""
from __future__ import annotations

import sys
from typing import Any, Optional, TextIO

import torch

from fastloop.callback import Callback


class ProgressBar(Callback):
    def __init__(self, refresh_rate: int = 20, stream: Optional[TextIO] = None) -> None:
        self.refresh_rate = refresh_rate
        self.stream = stream or sys.stderr
        self._interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_loss: Optional[torch.Tensor] = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else None
        if loss is not None:
            self._last_loss = loss
        if self._interactive and (batch_idx + 1) % self.refresh_rate == 0:
            self._draw(trainer, batch_idx + 1, end="\r")

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed if hasattr(trainer.fit_loop, "epoch_loop") else 0
        self._draw(trainer, done, end="\n")

    def _draw(self, trainer: Any, done: int, end: str) -> None:
        total = trainer.num_training_batches
        total_text = "?" if total == float("inf") else str(total)
        text = f"Epoch {trainer.current_epoch}: {done}/{total_text}"
        if self._last_loss is not None:
            text += f" loss={float(self._last_loss):.4g}"  # host sync: only at refresh points
        for key, value in trainer.progress_bar_metrics.items():
            text += f" {key}={float(value):.4g}"  # host sync: only at refresh points
        self.stream.write(text + end)
        self.stream.flush()
