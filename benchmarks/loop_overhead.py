"""Where fastloop's eager per-step overhead goes, in absolute microseconds (CPU, one thread).

1. The loops alone: a fit whose optimizer step is replaced by a function returning a constant
   (fetching, counters, hooks, the loop skeleton, no model work).
2. The eager step's own bookkeeping: the time inside ``DirectEagerStep.__call__`` against a
   bare step that only runs clear_grads, training_step, backward and optimizer.step.

Both isolate fastloop's work from model compute, which whole-step ratios cannot do on a noisy
shared machine. Run: ``python benchmarks/loop_overhead.py``.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

import fastloop.step.build as build
from fastloop import Callback, Module, Trainer
from fastloop.loops.optimizer import StepOutput
from fastloop.step.eager import DirectEagerStep, clear_grads

N = 3000


class OneWeight(Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w * batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), 0.1)


class EpochTimer(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


class ConstantStep:
    mode = "eager"

    def __init__(self, loop) -> None:
        self.output = StepOutput(torch.zeros(()))

    def __call__(self, *args):
        return self.output


class BareStep:
    mode = "eager"

    def __init__(self, loop) -> None:
        self.loop = loop

    def __call__(self, batch, batch_idx, opt_idx, optimizer):
        clear_grads(optimizer)  # as DirectEagerStep does: the difference is bookkeeping only
        loss = self.loop.trainer.module.training_step(batch, batch_idx)
        loss.backward()
        optimizer.step()
        return StepOutput(loss)


def fit_us_per_step(step_factory=None) -> float:
    original = build.eager_train_step
    if step_factory is not None:
        build.eager_train_step = step_factory
    try:
        timer = EpochTimer()
        data = [(torch.ones(1),)] * N
        Trainer(max_epochs=1, mode="eager", enable_progress_bar=False, callbacks=[timer], logger=False,
                enable_checkpointing=False, enable_model_summary=False).fit(OneWeight(), data)
        return timer.seconds / N * 1e6
    finally:
        build.eager_train_step = original


def time_inside(cls, factory) -> float:
    """Mean µs spent inside ``cls.__call__`` during a fit."""
    spent = [0.0]
    original = cls.__call__

    def timed(self, *args):
        start = time.perf_counter()
        try:
            return original(self, *args)
        finally:
            spent[0] += time.perf_counter() - start

    cls.__call__ = timed
    try:
        fit_us_per_step(factory)
    finally:
        cls.__call__ = original
    return spent[0] / N * 1e6


def main() -> None:
    torch.set_num_threads(1)
    loops = statistics.median(fit_us_per_step(ConstantStep) for _ in range(5))
    direct = statistics.median(time_inside(DirectEagerStep, None) for _ in range(5))
    bare = statistics.median(time_inside(BareStep, BareStep) for _ in range(5))
    print(f"loops per batch with a constant step: {loops:.1f} us")
    print(f"inside the step: DirectEagerStep {direct:.1f} us, bare step {bare:.1f} us "
          f"(bookkeeping {direct - bare:.1f} us)")


if __name__ == "__main__":
    main()
