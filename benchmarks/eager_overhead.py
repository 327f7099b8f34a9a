"""fastloop eager against the raw loop, finely interleaved, with the direct grad clearing shown apart.

Runs the ``python -m fastloop.bench`` harness (every contender on one OS thread, the same
batches, paired per-round ratios) with short rounds (20 steps, 301 rounds), so that raw and
fastloop see the same phase of a noisy shared machine. Three contenders per workload:

- ``raw``: zero_grad, forward, loss, backward, step.
- ``fastloop-eager``: ``Trainer(mode="eager")``; its direct step clears grads itself
  (``fastloop.step.eager.clear_grads``) instead of calling ``optimizer.zero_grad()``.
- ``fastloop-eager+zero_grad``: the same fit, with ``optimizer.zero_grad()`` also called at the start
  of each step (the grads are then already None when ``clear_grads`` runs): what the loops cost
  with torch's own ``zero_grad``.

Run: ``python benchmarks/eager_overhead.py [--workloads tiny-mlp,mnist-mlp] [--rounds 301]``.
"""
from __future__ import annotations

import argparse

import torch

from fastloop.bench import registry, runner
from fastloop.bench.fastloop_contender import FastloopContender
from fastloop.bench.workloads import get_workload
from fastloop.step.eager import DirectEagerStep


class TorchZeroGradStep(DirectEagerStep):
    def __call__(self, batch, batch_idx, opt_idx, optimizer):
        optimizer.zero_grad()
        return super().__call__(batch, batch_idx, opt_idx, optimizer)


class EagerWithTorchZeroGrad(FastloopContender):
    def __init__(self) -> None:
        super().__init__("eager")
        self.name = "fastloop-eager+zero_grad"

    def warmup(self, steps: int) -> float:
        first = super().warmup(steps)  # the fit is paused after its warm-up steps: swap the step
        loop = self.trainer.fit_loop.epoch_loop.batch_loop.optimizer_loop
        assert type(loop.train_step) is DirectEagerStep, type(loop.train_step)
        loop.train_step = TorchZeroGradStep(loop)
        return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="tiny-mlp,mnist-mlp")
    parser.add_argument("--rounds", type=int, default=301)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    registry.CONTENDERS["fastloop-eager+zero_grad"] = EagerWithTorchZeroGrad
    names = ["raw", "fastloop-eager", "fastloop-eager+zero_grad"]
    device = torch.device("cpu")
    for name in args.workloads.split(","):
        rows = runner.run_workload(get_workload(name), names, device, args.steps, args.rounds, warmup_steps=10)
        cells = "  ".join(f"{r.contender} {r.us_per_step:.0f} µs (ratio {r.ratio_vs_raw:.3f})" for r in rows)
        print(f"{name:10s} threads {torch.get_num_threads()}: {cells}")


if __name__ == "__main__":
    main()
