"""Whole-Trainer step time against a hand-written loop, in one process, on the main thread (CPU).

For each workload (default: tiny-mlp and mnist-mlp from ``fastloop.bench.workloads``) it times
the second epoch of ``Trainer.fit`` (the compiled graph exists by then) for fastloop eager and
compiled against a raw PyTorch loop (zero_grad, forward, loss, backward, step) over the same
``STEPS`` batches; ``REPEATS`` alternating repeats, medians. Unlike ``python -m fastloop.bench``
everything runs on the main thread: see benchmarks/RESULTS.md for why that matters on a 2-core
machine (each worker thread that ran ATen keeps an OpenMP team of its own).
Run: ``python benchmarks/trainer_speed.py [--threads N] [--workloads a,b]``.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from fastloop import Callback, Trainer
from fastloop.bench.fastloop_contender import BenchModule
from fastloop.bench.workloads import get_workload

STEPS = 400
REPEATS = 5


class LastEpochTimer(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


def raw_loop(module: BenchModule, data) -> float:
    net, loss_fn = module.net.train(), module.loss_fn
    opt = module.configure_optimizers()
    start = time.perf_counter()
    for x, y in data:
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()
    return (time.perf_counter() - start) / len(data) * 1e6


def fastloop_fit(module: BenchModule, data, mode: str) -> float:
    timer = LastEpochTimer()
    Trainer(max_epochs=2, mode=mode, enable_progress_bar=False, num_sanity_val_steps=0,
            callbacks=[timer], logger=False, enable_checkpointing=False, enable_model_summary=False).fit(module, data)
    return timer.seconds / len(data) * 1e6


def bench(name: str) -> None:
    workload = get_workload(name)
    data = workload.batches(STEPS, seed=0, device=torch.device("cpu"))
    base = BenchModule(workload.model(0), workload.loss_fn, workload.make_optimizer)
    raw, eager, compiled = [], [], []
    for _ in range(REPEATS):
        raw.append(raw_loop(copy.deepcopy(base), data))
        eager.append(fastloop_fit(copy.deepcopy(base), data, "eager"))
        compiled.append(fastloop_fit(copy.deepcopy(base), data, "compiled"))
    r, e, c = (statistics.median(v) for v in (raw, eager, compiled))
    # Paired per repeat as well: each repeat's three runs follow each other within seconds.
    eager_ratio = statistics.median(ei / ri for ei, ri in zip(eager, raw))
    speedup = statistics.median(ri / ci for ri, ci in zip(raw, compiled))
    print(f"{name:10s} threads {torch.get_num_threads()}: raw {r:6.0f} us/step | fastloop eager {e:6.0f} "
          f"(paired ratio {eager_ratio:.3f}) | fastloop compiled {c:6.0f} (paired speedup {speedup:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--workloads", default="tiny-mlp,mnist-mlp")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.workloads.split(","):
        bench(name)


if __name__ == "__main__":
    main()
