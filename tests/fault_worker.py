"""A training process for the kill-and-resume tests (``tests/test_fault_kill.py``).

Run as ``python tests/fault_worker.py SPECS_JSON``: a list of runs done one after the other in
this process (importing torch costs seconds; each run starts from ``seed_everything`` and fresh
objects, so an uninterrupted reference run may share a process with a run that gets killed).

A run trains a small dropout MLP (SGD with momentum, an epoch-interval StepLR,
``accumulate_grad_batches=3``, a shuffled loader) with ``ModelCheckpoint(every_n_train_steps=3,
save_last=True)`` writing to ``<out>/ckpts``; ``spec["resume"]`` passes ``ckpt_path="last"``.
It appends to ``<out>/<run>.log``, flushed and fsynced line by line:

- ``B <epoch> <batch_idx> <batch hash> <lr>`` at every training batch start;
- ``C <n>`` when a checkpoint is dumped, ``n`` being the ``B`` lines this run wrote before it.

``spec["kill"]`` makes the process SIGKILL itself at one point: ``["epoch_start", e]``,
``["batch_start", e, i]`` or ``["val_batch_start", e, i]``. A run that ends normally writes
``<out>/<run>.final.pt`` (parameters, optimizer and scheduler states, counters and RNG draws) and
``<out>/<run>.explain.txt`` (``trainer.explain()``).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastloop
from fastloop.callbacks import ModelCheckpoint
from fastloop.data import TensorLoader

N_TRAIN, N_VAL, BATCH = 48, 8, 4  # 12 training batches per epoch: 4 optimizer steps of 3 batches


class DropoutMLP(fastloop.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.25), nn.Linear(16, 3))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}


def batch_hash(batch: Any) -> str:
    h = hashlib.sha1()
    for t in batch:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class Recorder(fastloop.Callback):
    """Logs every training batch and every checkpoint dump; kills the process where told."""

    def __init__(self, log_path: str, kill: Optional[List[Any]]) -> None:
        self.log = open(log_path, "a", buffering=1)
        self.kill = kill
        self.batches = 0

    def _write(self, line: str) -> None:
        self.log.write(line + "\n")
        self.log.flush()
        os.fsync(self.log.fileno())

    def _kill_at(self, *where: Any) -> None:
        if self.kill is not None and list(where) == self.kill:
            kill_self()

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._kill_at("epoch_start", trainer.current_epoch)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._kill_at("batch_start", trainer.current_epoch, batch_idx)
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self._write(f"B {trainer.current_epoch} {batch_idx} {batch_hash(batch)} {lr!r}")
        self.batches += 1

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._kill_at("val_batch_start", trainer.current_epoch, batch_idx)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: Dict[str, Any]) -> None:
        self._write(f"C {self.batches}")


def make_loaders(kind: str) -> Any:
    g = torch.Generator().manual_seed(1234)
    x, y = torch.randn(N_TRAIN + N_VAL, 8, generator=g), torch.randint(0, 3, (N_TRAIN + N_VAL,), generator=g)
    xt, yt, xv, yv = x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]
    if kind == "dataloader":
        train = DataLoader(TensorDataset(xt, yt), batch_size=BATCH, shuffle=True)
    elif kind == "tensorloader":
        train = TensorLoader(xt, yt, batch_size=BATCH, shuffle=True, seed=7)
    else:
        raise ValueError(f"unknown loader kind {kind!r}")
    return train, DataLoader(TensorDataset(xv, yv), batch_size=BATCH)


def final_state(trainer: Any, module: nn.Module) -> Dict[str, Any]:
    return {
        "params": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "optimizer": trainer.optimizers[0].state_dict(),
        "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        "global_step": trainer.global_step,
        "current_epoch": trainer.current_epoch,
        "rng_torch": torch.get_rng_state(),
        "rng_python": random.random(),
        "rng_numpy": float(np.random.rand()),
    }


def main(spec: Dict[str, Any]) -> None:
    torch.set_num_threads(1)
    out, run = spec["out"], spec["run"]
    os.makedirs(out, exist_ok=True)
    fastloop.seed_everything(spec.get("seed", 0))
    model = DropoutMLP()
    train, val = make_loaders(spec["loader"])
    checkpoint = ModelCheckpoint(dirpath=os.path.join(out, "ckpts"), every_n_train_steps=3, save_last=True)
    trainer = fastloop.Trainer(
        max_epochs=spec.get("max_epochs", 4), accumulate_grad_batches=3, mode=spec.get("mode", "eager"),
        callbacks=[Recorder(os.path.join(out, f"{run}.log"), spec.get("kill")), checkpoint],
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(model, train, val, ckpt_path="last" if spec.get("resume") else None)
    torch.save(final_state(trainer, model), os.path.join(out, f"{run}.final.pt"))
    with open(os.path.join(out, f"{run}.explain.txt"), "w") as f:
        f.write(trainer.explain())


if __name__ == "__main__":
    for run_spec in json.loads(sys.argv[1]):
        main(run_spec)
