"""Is a compiled run's final-loss difference a bug or fp32 rounding? Per-step losses of eager fp32,
eager float64 and the fused step (C++ and Python inductor wrappers) from the same start.

Run:  PYTHONPATH=. python benchmarks/loss_drift.py [STEPS [POOL]]
      small-transformer with AdamW; POOL distinct batches cycled as the bench does (default: STEPS
      distinct batches).

Prints, per variant, the relative distance of its loss from the float64 run's at a few steps, and
the fused runs' distance from eager fp32. A fused step that diverges (a bug) moves away from float64
faster than eager fp32 does; rounding noise keeps both at the same distance.
"""
from __future__ import annotations

import copy
import sys
from typing import Dict, List, Optional

import torch
from torch.func import functional_call

from fastloop.bench.workloads import get_workload
from fastloop.step.fused_step import build_fused_step

WORKLOAD = get_workload("small-transformer")


def eager_losses(base: torch.nn.Module, batches: List, marks: List[int], dtype: torch.dtype) -> Dict[int, float]:
    model = copy.deepcopy(base).to(dtype)
    opt = WORKLOAD.make_optimizer(model.parameters())
    out = {}
    for i, (x, y) in enumerate(batches, 1):
        loss = WORKLOAD.loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i in marks:
            out[i] = loss.item()
    return out


def fused_losses(base: torch.nn.Module, batches: List, marks: List[int], options: Optional[dict]) -> Dict[int, float]:
    model = copy.deepcopy(base)
    opt = WORKLOAD.make_optimizer(model.parameters())

    def loss_fn(params, buffers, x, y):
        return WORKLOAD.loss_fn(functional_call(model, {**params, **buffers}, (x,)), y), ()

    step, why = build_fused_step(loss_fn, model, [n for n, _ in model.named_parameters()], opt,
                                 inductor_config=options)
    assert step is not None, why
    out = {}
    for i, (x, y) in enumerate(batches, 1):
        loss, _ = step(x, y)
        if i in marks:
            out[i] = loss.item()
    return out


def distance(a: Dict[int, float], b: Dict[int, float]) -> str:
    return " ".join(f"{k}:{abs(a[k] - b[k]) / abs(b[k]):.1e}" for k in sorted(b))


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 1400
    pool_size = int(sys.argv[2]) if len(sys.argv) > 2 else steps
    torch.manual_seed(0)
    base = WORKLOAD.model(0)
    pool = WORKLOAD.batches(min(steps, pool_size), 0, torch.device("cpu"))
    batches = [pool[i % len(pool)] for i in range(steps)]
    marks = sorted({1, 10, 100, 300, 600, 1000, steps} & set(range(1, steps + 1)))
    runs = {"eager fp32": eager_losses(base, batches, marks, torch.float32),
            "eager float64": eager_losses(base, batches, marks, torch.float64),
            "fused, C++ wrapper": fused_losses(base, batches, marks, {"cpp_wrapper": True}),
            "fused, Python wrapper": fused_losses(base, batches, marks, {"cpp_wrapper": False})}
    for name, losses in runs.items():
        print(f"{name} vs float64: {distance(losses, runs['eager float64'])}")
    for name in ("fused, C++ wrapper", "fused, Python wrapper"):
        print(f"{name} vs eager fp32: {distance(runs[name], runs['eager fp32'])}")


if __name__ == "__main__":
    main()
