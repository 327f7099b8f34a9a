"""What the default callbacks and logger cost per step, in one process (CPU, main thread).

The bench's default workload (``tiny-mlp``: 32->64->10, batch 64, Adam), its module logging
its loss every step (``self.log("train_loss", loss, prog_bar=True)``), fitted by a Trainer:

- ``on``: Lightning's defaults, as a ported script gets them: progress bar (one line per epoch
  here, stderr is not a terminal), model summary, ``ModelCheckpoint`` (a file per epoch) and
  ``CSVLogger`` (a row every ``log_every_n_steps=50`` batches);
- ``off``: ``logger=False, enable_checkpointing=False, enable_progress_bar=False,
  enable_model_summary=False``.

Each fit runs ``EPOCHS`` epochs of ``STEPS`` batches; the time of the last epoch is taken (the
graph is compiled by then; it includes that epoch's checkpoint write). ``REPEATS`` alternating
pairs; the median of the paired ratios on/off is printed.
Run: ``python benchmarks/callbacks_overhead.py [--mode compiled|eager] [--repeats N]``.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

from fastloop import Callback, Trainer
from fastloop.bench.fastloop_contender import BenchModule
from fastloop.bench.workloads import get_workload

STEPS = 400
EPOCHS = 3


class LoggingBenchModule(BenchModule):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss


class LastEpochTimer(Callback):
    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.seconds = time.perf_counter() - self.start


def fit_us_per_step(module: LoggingBenchModule, data: Any, mode: str, defaults_on: bool) -> float:
    timer = LastEpochTimer()
    with tempfile.TemporaryDirectory() as root:
        options = {} if defaults_on else dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                              enable_model_summary=False)
        trainer = Trainer(max_epochs=EPOCHS, mode=mode, num_sanity_val_steps=0, default_root_dir=root,
                          callbacks=[timer], **options)
        trainer.fit(module, data)
        if defaults_on:
            assert trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path
    return timer.seconds / len(data) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="compiled", choices=["compiled", "eager"])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    workload = get_workload("tiny-mlp")
    data = workload.batches(STEPS, seed=0, device=torch.device("cpu"))
    base = LoggingBenchModule(workload.model(0), workload.loss_fn, workload.make_optimizer)
    on, off = [], []
    for _ in range(args.repeats):
        on.append(fit_us_per_step(copy.deepcopy(base), data, args.mode, True))
        off.append(fit_us_per_step(copy.deepcopy(base), data, args.mode, False))
    ratio = statistics.median(a / b for a, b in zip(on, off))
    print(f"tiny-mlp {args.mode}, threads {torch.get_num_threads()}: defaults on {statistics.median(on):.0f} us/step, "
          f"off {statistics.median(off):.0f} us/step, paired median ratio on/off {ratio:.3f} "
          f"(ratios: {', '.join(f'{a / b:.3f}' for a, b in zip(on, off))})", file=sys.stdout)


if __name__ == "__main__":
    main()
