"""Whole-Trainer step time against a hand-written loop, in one process (CPU).

Times the second epoch of ``Trainer.fit`` (the compiled graph exists by then) for fastloop
eager and compiled against a raw PyTorch loop over the same 500 batches of the tiny-MLP
workload (32->64->10, batch 64, Adam); 5 repeats, medians. Unlike ``python -m fastloop.bench``
it runs everything on the main thread. Run: ``python benchmarks/trainer_speed.py [threads]``.
"""
from __future__ import annotations

import copy
import statistics
import sys
import time

import torch
from torch import nn

from fastloop import Callback, Trainer
from fastloop.testing import TinyMLP

STEPS = 500


class LastEpochTimer(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


def raw_loop(model: TinyMLP, data) -> float:
    opt = model.configure_optimizers()
    start = time.perf_counter()
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model.net(x), y).backward()
        opt.step()
    return (time.perf_counter() - start) / len(data) * 1e6


def fastloop_fit(model: TinyMLP, data, mode: str) -> float:
    timer = LastEpochTimer()
    Trainer(max_epochs=2, mode=mode, enable_progress_bar=False, callbacks=[timer]).fit(model, data)
    return timer.seconds / len(data) * 1e6


def main() -> None:
    if len(sys.argv) > 1:
        torch.set_num_threads(int(sys.argv[1]))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(64, 32, generator=g), torch.randint(0, 10, (64,), generator=g)) for _ in range(STEPS)]
    base = TinyMLP()
    raw, eager, compiled = [], [], []
    for _ in range(5):
        raw.append(raw_loop(copy.deepcopy(base), data))
        eager.append(fastloop_fit(copy.deepcopy(base), data, "eager"))
        compiled.append(fastloop_fit(copy.deepcopy(base), data, "compiled"))
    r, e, c = (statistics.median(v) for v in (raw, eager, compiled))
    print(f"threads {torch.get_num_threads()}: raw {r:.0f} us/step, fastloop eager {e:.0f} ({e / r:.3f}x raw), "
          f"fastloop compiled {c:.0f} (speedup {r / c:.2f}x)")


if __name__ == "__main__":
    main()
