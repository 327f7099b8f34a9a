"""A training process for the DDP tests (``tests/test_ddp_core_*.py``, ``tests/test_ddp_faults_*.py``).

Run under ``torchrun`` (or plainly, when a run asks for ``devices=2``: fastloop then re-runs
this script in two workers) as ``python tests/ddp_worker.py SPEC_JSON``; SPEC_JSON holds
``{"out": dir, "runs": [run, ...]}``, runs done one after the other in each process (importing
torch costs seconds). Each run trains ``TinyMLP`` (SGD with momentum, no dropout: every rank
computes the same thing) on ``dataset()``, each rank reading its shard of a ``TensorLoader``
(``BATCH`` rows per rank and step, no shuffling), and writes ``<out>/<name>.rank<R>.pt``: the
final parameters, the trainer's coordinates and how many checkpoint files this process wrote.

Run keys: ``name``; ``max_epochs`` (2); ``accumulate`` (1); ``manual`` (manual optimization);
``ckpt_every`` (a ``ModelCheckpoint(every_n_train_steps=...)`` writing to ``<out>/<name>_ckpts``,
or ``ckpt_dir`` to share one); ``resume`` (``fit(ckpt_path="last")``); ``logger`` (a CSVLogger
under ``<out>/<name>_logs``); ``devices``/``num_nodes`` (Trainer arguments); ``fail`` (
``{"rank": R, "step": N, "how": "raise" | "none" | "kill"}``: at global step N rank R raises,
returns None from training_step or SIGKILLs itself, "kill" only on torchrun's first attempt);
``skip_if_done`` (a restarted worker does not redo a finished run); ``reference`` (one process fed
the global batches of a 2-process run, ``global_batches``).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from typing import Any, Dict, List, Optional

import torch
from torch import nn

import fastloop
from fastloop.callbacks import ModelCheckpoint
from fastloop.data import TensorLoader
from fastloop.loggers import CSVLogger

N_ROWS, BATCH = 64, 4  # 2 ranks x 4 rows: 8 steps per epoch
WORKER = os.path.abspath(__file__)


# ------------------------------------------------------------ for the tests
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher_args: List[str], spec: Dict[str, Any], timeout: float) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run LAUNCHER_ARGS worker SPEC`` (no launcher args: the worker
    alone), eager mode, outside pytest's environment; stdout and stderr together."""
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    env["FASTLOOP_MODE"] = "eager"
    prefix = [sys.executable, "-m", "torch.distributed.run", *launcher_args] if launcher_args else [sys.executable]
    return subprocess.run([*prefix, WORKER, json.dumps(spec)], env=env, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def torchrun_args(nproc: int = 2, *extra: str) -> List[str]:
    return [f"--nproc-per-node={nproc}", f"--master-port={free_port()}", "--monitor-interval=0.1", *extra]


def result(out: str, name: str, rank: int) -> Dict[str, Any]:
    return torch.load(os.path.join(out, f"{name}.rank{rank}.pt"), weights_only=False)


# ------------------------------------------------------------ the worker


def dataset() -> Any:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(N_ROWS, 8, generator=g), torch.randint(0, 3, (N_ROWS,), generator=g)


def global_batches(world_size: int = 2) -> TensorLoader:
    """One process's loader whose step k holds the rows every rank reads at step k (rank 0's
    first): what a 1-process run must be fed to equal a ``world_size``-process one."""
    x, y = dataset()
    shards = [list(TensorLoader(x, y, batch_size=BATCH, rank=r, world_size=world_size)) for r in range(world_size)]
    xs = torch.cat([batch[0] for step in zip(*shards) for batch in step])
    ys = torch.cat([batch[1] for step in zip(*shards) for batch in step])
    return TensorLoader(xs, ys, batch_size=BATCH * world_size, rank=0, world_size=1)


class TinyMLP(fastloop.Module):
    def __init__(self, fail: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
        self.fail = fail

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        fail = self.fail
        if fail and fail["how"] == "none" and self.global_step == fail["step"] and self.trainer.global_rank == fail["rank"]:
            return None
        loss = self.loss(batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class ManualMLP(TinyMLP):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(self.loss(batch))
        opt.step()


class Failure(fastloop.Callback):
    def __init__(self, fail: Dict[str, Any]) -> None:
        self.fail = fail

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        fail = self.fail
        if trainer.global_step != fail["step"] or trainer.global_rank != fail["rank"]:
            return
        if fail["how"] == "raise":
            raise RuntimeError(f"boom at step {trainer.global_step}")
        if fail["how"] == "kill" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            os.kill(os.getpid(), signal.SIGKILL)


def count_saves() -> List[str]:
    """Record every checkpoint file this process writes."""
    from fastloop import checkpoint_connector

    written: List[str] = []
    original = checkpoint_connector.atomic_save

    def counting(obj: Any, path: str) -> None:
        written.append(os.path.basename(path))
        original(obj, path)

    checkpoint_connector.atomic_save = counting
    return written


def train(run: Dict[str, Any], out: str, written: List[str]) -> None:
    name = run["name"]
    target = os.path.join(out, f"{name}.rank{os.environ.get('RANK', '0')}.pt")
    if run.get("skip_if_done") and os.path.exists(target):
        return
    del written[:]
    torch.manual_seed(0)
    fail = run.get("fail")
    callbacks: List[Any] = [Failure(fail)] if fail else []
    if run.get("ckpt_every"):
        callbacks.append(ModelCheckpoint(dirpath=os.path.join(out, run.get("ckpt_dir", f"{name}_ckpts")),
                                         every_n_train_steps=run["ckpt_every"], save_last=True))
    trainer = fastloop.Trainer(
        max_epochs=run.get("max_epochs", 2), accumulate_grad_batches=run.get("accumulate", 1),
        devices=run.get("devices", "auto"), num_nodes=run.get("num_nodes", 1), accelerator="cpu",
        logger=CSVLogger(os.path.join(out, f"{name}_logs")) if run.get("logger") else False,
        enable_checkpointing=bool(run.get("ckpt_every")), callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
    )
    model = ManualMLP() if run.get("manual") else TinyMLP(fail)
    x, y = dataset()
    loader = (global_batches() if run.get("reference") else
              TensorLoader(x, y, batch_size=BATCH, rank=trainer.global_rank, world_size=trainer.world_size))
    trainer.fit(model, loader, ckpt_path="last" if run.get("resume") else None)
    result = {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "global_step": trainer.global_step,
        "written": list(written),
        "restored_from": trainer.ckpt_path,
        "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        "explain": trainer.explain(),
        **{key: getattr(trainer, key) for key in ("global_rank", "local_rank", "node_rank", "world_size",
                                                   "num_nodes", "num_devices", "is_global_zero")},
    }
    torch.save(result, os.path.join(out, f"{name}.rank{trainer.global_rank}.pt"))


def main(spec: Dict[str, Any]) -> None:
    if spec.get("dump_stacks_after_s"):  # a hang shows where every thread is
        import faulthandler

        faulthandler.dump_traceback_later(spec["dump_stacks_after_s"], exit=True)
    torch.set_num_threads(1)
    out = spec["out"]
    os.makedirs(out, exist_ok=True)
    written = count_saves()
    for run in spec["runs"]:
        train(run, out, written)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
