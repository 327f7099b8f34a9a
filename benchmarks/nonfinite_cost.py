"""Cost of the non-finite check (``Trainer(nonfinite=...)``) per training step, paired.

Run:  PYTHONPATH=. python benchmarks/nonfinite_cost.py [--steps 50] [--repeats 21] [--threads N]

Fused (compiled, called directly): the same step built with ``nonfinite="ignore"`` (no check),
``"skip"`` and ``"raise"`` (the device check and the ``torch.where`` guard in the graph; "raise"
also reads the device counters every 20 steps, as the Trainer does). Eager: a hand-written
step without and with ``EagerNonFiniteCheck.check`` (one foreach op and one host read). The
variants run interleaved in blocks in one process, so that noise from other processes hits all
alike; reported: median and minimum over blocks of the mean µs/step. Compare ratios.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn

from fastloop.step.fused_step import build_fused_step
from fastloop.step.nonfinite import EagerNonFiniteCheck


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def mnist_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 128), nn.Tanh(), nn.BatchNorm1d(128), nn.Dropout(0.1), nn.Linear(128, 10))


def fused_variant(factory: Callable[[], nn.Module], policy: str) -> Callable:
    torch.manual_seed(0)
    model = factory().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss_fn(params, buffers, x, y):
        return F.cross_entropy(torch.func.functional_call(model, {**params, **buffers}, (x,)), y), {}

    fused, reason = build_fused_step(loss_fn, model, [n for n, _ in model.named_parameters()], opt, compile=True,
                                     nonfinite=policy)
    assert fused is not None, reason
    calls = [0]

    def step(x, y):
        fused(x, y, step=True)
        calls[0] += 1
        if policy == "raise" and calls[0] % 20 == 0:
            fused.nonfinite_state.tolist()  # the Trainer's periodic read

    return step


def eager_variant(factory: Callable[[], nn.Module], check: bool) -> Callable:
    torch.manual_seed(0)
    model = factory().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = EagerNonFiniteCheck("raise", model, several=False)

    def step(x, y):
        loss = F.cross_entropy(model(x), y)
        for p in model.parameters():
            p.grad = None
        loss.backward()
        if check:
            guard.check(opt, 0, loss, True, 0, 0)
        opt.step()

    return step


def bench(name: str, factory: Callable[[], nn.Module], batch: int, features: int, steps: int, repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch, features, generator=g), torch.randint(0, 10, (batch,), generator=g))
               for _ in range(16)]
    variants: Dict[str, Callable] = {f"fused {p}": fused_variant(factory, p) for p in ("ignore", "skip", "raise")}
    variants["eager"] = eager_variant(factory, False)
    variants["eager+check"] = eager_variant(factory, True)
    for _ in range(5):  # warm-up: compile, allocator, caches
        for step in variants.values():
            step(*batches[0])
    runs: Dict[str, list] = {label: [] for label in variants}
    for _ in range(repeats):
        for label, step in variants.items():
            start = time.perf_counter()
            for i in range(steps):
                step(*batches[i % len(batches)])
            runs[label].append((time.perf_counter() - start) / steps * 1e6)
    print(name)
    for label, values in runs.items():
        base = runs["fused ignore" if label.startswith("fused") else "eager"]
        print(f"  {label:13s} median {statistics.median(values):6.0f} µs/step ({statistics.median(values) / statistics.median(base):5.3f}x)"
              f"  min {min(values):6.0f} ({min(values) / min(base):5.3f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    bench("(a) MLP 32->64->10, batch 64, Adam", tiny_mlp, 64, 32, args.steps, args.repeats)
    bench("(b) MNIST-MLP 784->128->10 (tanh, BN, Dropout), batch 128, Adam", mnist_mlp, 128, 784,
          args.steps, args.repeats)


if __name__ == "__main__":
    main()
