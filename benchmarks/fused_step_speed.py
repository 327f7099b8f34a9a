"""Median µs per training step: raw eager PyTorch loop vs the fused compiled step, called through
torch.compile's guards on every step and called directly (``FusedStep(direct_call=True)``).

Run:  PYTHONPATH=. python benchmarks/fused_step_speed.py [--steps 50] [--repeats 21] [--threads N]

Both variants run in one process on the same data, in alternating blocks of
``steps`` consecutive steps timed with ``time.perf_counter`` (CPU: no device
sync needed), so that noise from other processes hits both alike. Reported:
median and minimum over blocks of the mean µs/step, and the speedup for each.
On a shared machine the minimum is the steadier estimate. Compile time is
excluded (warm-up) and printed separately. Compare ratios, not absolute numbers.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastloop.step.fused_step import build_fused_step


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def mnist_mlp() -> nn.Module:
    # Lightning's ParityModuleMNIST shape.
    return nn.Sequential(nn.Linear(784, 128), nn.Tanh(), nn.BatchNorm1d(128), nn.Dropout(0.1), nn.Linear(128, 10))


def make_batches(n: int, batch: int, features: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, features, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


def time_block(step: Callable[[torch.Tensor, torch.Tensor], None], batches, steps: int) -> float:
    """Mean µs per step over ``steps`` consecutive steps."""
    start = time.perf_counter()
    for i in range(steps):
        step(*batches[i % len(batches)])
    return (time.perf_counter() - start) / steps * 1e6


def eager_step_fn(model: nn.Module, opt: torch.optim.Optimizer) -> Callable:
    def step(x, y):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()

    return step


def fused_step_fn(model: nn.Module, opt: torch.optim.Optimizer, direct_call: bool):
    def loss_fn(params, buffers, x, y):
        return F.cross_entropy(torch.func.functional_call(model, {**params, **buffers}, (x,)), y), {}

    names = [n for n, _ in model.named_parameters()]
    fused, reason = build_fused_step(loss_fn, model, names, opt, compile=True, direct_call=direct_call)
    assert fused is not None, reason

    def step(x, y):
        fused(x, y, step=True)

    return step, fused


def bench(name: str, factory: Callable[[], nn.Module], batch: int, features: int, steps: int, repeats: int) -> None:
    batches = make_batches(16, batch, features)
    torch.manual_seed(0)
    eager_model = factory().train()
    variants = {"eager": eager_step_fn(eager_model, torch.optim.Adam(eager_model.parameters(), lr=1e-3))}
    handles = {}
    for label, direct in (("guarded", False), ("direct", True)):
        torch.manual_seed(0)
        model = factory().train()
        variants[label], handles[label] = fused_step_fn(model, torch.optim.Adam(model.parameters(), lr=1e-3), direct)
    for _ in range(5):  # warm-up: compile, allocator, caches
        for step in variants.values():
            step(*batches[0])
    # Interleave the variants so that machine noise hits all alike.
    runs: dict = {label: [] for label in variants}
    for _ in range(repeats):
        for label, step in variants.items():
            runs[label].append(time_block(step, batches, steps))
    med = {label: statistics.median(v) for label, v in runs.items()}
    low = {label: min(v) for label, v in runs.items()}
    print(f"{name}")
    for label in ("guarded", "direct"):
        print(f"  fused ({label}): median {med[label]:6.0f} µs/step (eager {med['eager']:6.0f}, speedup "
              f"{med['eager'] / med[label]:4.2f}x); min {low[label]:6.0f} (eager {low['eager']:6.0f}, "
              f"{low['eager'] / low[label]:4.2f}x)")
    handle = handles["direct"]
    print(f"  first-call compile {handle.compile_seconds:.1f} s, graphs {handle.graph_count}, "
          f"direct calls {handle.direct_calls} of {handle.calls}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=21, help="timed blocks per variant")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    bench("(a) MLP 32->64->10, batch 64, Adam", tiny_mlp, 64, 32, args.steps, args.repeats)
    bench("(b) MNIST-MLP 784->128->10 (tanh, BN, Dropout), batch 128, Adam", mnist_mlp, 128, 784,
          args.steps, args.repeats)


if __name__ == "__main__":
    main()
