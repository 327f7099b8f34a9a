"""What ``Trainer(mode="auto")`` decides on a CPU, with real timings: for each bench workload, one
fit of ``--steps`` steps in auto mode, then ``trainer.explain()``'s line with the two medians
(compiled vs eager, ``fastloop/step/auto_choice.py``) and the mode kept.

    python benchmarks/auto_decisions.py --workloads tiny-mlp,mnist-mlp,small-cnn --steps 40

Timings are only meaningful on a quiet machine: on a loaded one both medians swell and the
choice follows the noise.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

os.environ.pop("FASTLOOP_MODE", None)  # this script is about mode="auto" itself

from fastloop import Trainer  # noqa: E402
from fastloop.bench.fastloop_contender import BenchModule  # noqa: E402
from fastloop.bench.workloads import get_workload  # noqa: E402
from fastloop.data import TensorLoader  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="tiny-mlp,mnist-mlp,small-cnn")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    for name in args.workloads.split(","):
        workload = get_workload(name)
        batches = workload.batches(args.steps, seed=0, device=torch.device("cpu"))
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        module = BenchModule(workload.model(0), workload.loss_fn, workload.make_optimizer)
        trainer = Trainer(mode="auto", max_epochs=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        start = time.perf_counter()
        trainer.fit(module, TensorLoader(x, y, batch_size=workload.batch_size))
        report = trainer.fit_loop.epoch_loop.batch_loop.optimizer_loop.step_report
        print(f"{name}: {args.steps} steps in {time.perf_counter() - start:.1f} s, auto kept {report.used}")
        print("  " + report.describe().replace("\n", "\n  "))


if __name__ == "__main__":
    main()
