"""How long the training step waits for data, as a share of the step (one process, CPU).

Runs the default bench workload (tiny MLP 32->64->10, batch 64, Adam) with fastloop eager
on three loaders over the same in-memory data, and in compiled mode (the default bench mode on
a CPU; its step is ~3x shorter, so the same wait is a larger share) on TensorLoader, timing
every ``next()`` of the loop's data fetcher against the whole epoch.
Run: ``python benchmarks/data_wait.py``.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from fastloop import Callback, Trainer
from fastloop.testing import TinyMLP
from fastloop.data import TensorLoader
from fastloop.data import fetcher as fetcher_module


class EpochTimer(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


def measure(loader, mode: str = "eager", epochs: int = 3) -> tuple:
    """(share of the last epoch spent in the fetcher's ``next()``, µs waited per batch)."""
    waited = [0.0]
    original = fetcher_module.DataFetcher.__next__

    def timed_next(self):
        start = time.perf_counter()
        try:
            return original(self)
        finally:
            waited[0] += time.perf_counter() - start

    timer = EpochTimer()
    fetcher_module.DataFetcher.__next__ = timed_next
    try:
        trainer = Trainer(max_epochs=epochs, mode=mode, enable_progress_bar=False, callbacks=[timer],
                          logger=False, enable_checkpointing=False, enable_model_summary=False)

        class LastEpoch(Callback):
            def on_train_epoch_start(self, trainer, pl_module):
                waited[0] = 0.0

        trainer.callbacks.append(LastEpoch())
        trainer.fit(TinyMLP(), loader)
    finally:
        fetcher_module.DataFetcher.__next__ = original
    return waited[0] / timer.seconds, waited[0] / len(loader) * 1e6


def main() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16384, 32, generator=g), torch.randint(0, 10, (16384,), generator=g)
    loaders = {
        "TensorLoader (native)": ("eager", lambda: TensorLoader(x, y, batch_size=64, shuffle=True, seed=0)),
        "TensorLoader (python)": ("eager", lambda: TensorLoader(x, y, batch_size=64, shuffle=True, seed=0,
                                                                backend="python")),
        "DataLoader(TensorDataset)": ("eager", lambda: DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)),
        "TensorLoader (native), compiled": ("compiled", lambda: TensorLoader(x, y, batch_size=64, shuffle=True,
                                                                              seed=0)),
    }
    for name, (mode, make) in loaders.items():
        results = [measure(make(), mode) for _ in range(3)]
        share = statistics.median(r[0] for r in results)
        per_batch = statistics.median(r[1] for r in results)
        print(f"{name:32s} data wait: {100 * share:5.2f} % of the step, {per_batch:6.1f} us per batch (median of 3)")


if __name__ == "__main__":
    main()
