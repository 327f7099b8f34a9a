"""Step throughput of data-parallel training: 1 vs N processes under torchrun, for fastloop eager
DDP, fastloop compiled DDP and Lightning 2.x DDP, on the same model, optimizer and data.

Each (workload, contender, process count) is one ``torchrun`` launch running one fit of
``warmup + rounds x steps`` steps over a ``DataLoader`` (each rank reads its shard through the
``DistributedSampler`` the trainer injects); a callback stamps every batch end. Rank 0 reports
the time per step of each window of ``steps`` steps after the warm-up (compilation included
there); the table gives the median window. Every process runs with ``OMP_NUM_THREADS=1`` (also
with one process), so that N processes use N cores.

Columns: ``ms/step`` (median, per process step, gradient all-reduce included), ``samples/s``
(all processes), ``scaling`` (samples/s against the same contender on 1 process), ``vs
lightning`` (Lightning's ms/step over this one's, same process count; > 1: faster than
Lightning), and the mode fastloop's ``trainer.explain()`` says the training step used.

Run (CPU, gloo): ``python benchmarks/ddp_throughput.py`` (``--help`` for workloads, steps,
rounds, process counts). GPU (NCCL, one GPU per process): ``python benchmarks/ddp_throughput.py
--gpu --nprocs 1,2``. Lightning runs in its own environment (``--lightning-python``, default
``/tmp/pl26/bin/python``: ``python3 -m venv /tmp/pl26 && /tmp/pl26/bin/pip install torch==2.13.0
"lightning==2.6.*"`` plus fastloop on its path); it is skipped, with a note, when that interpreter
cannot import ``lightning``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

CONTENDERS = ("fastloop-eager", "fastloop-compiled", "lightning")
DEFAULT_LIGHTNING_PYTHON = "/tmp/pl26/bin/python"


# --------------------------------------------------------------------------------- worker side
def _worker(args: argparse.Namespace) -> None:
    """One process of a torchrun launch: fit, stamp batch ends, rank 0 writes the result."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from fastloop.bench.workloads import get_workload

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    gpu = args.device == "cuda"
    if gpu:
        torch.cuda.set_device(local_rank)
    workload = get_workload(args.workload)
    total = args.warmup + args.rounds * args.steps
    # The same rows for every contender: total batches per rank, world ranks.
    batches = workload.batches(total * world, seed=0, device=torch.device("cpu"))
    dataset = TensorDataset(*(torch.cat(parts) for parts in zip(*batches)))
    # shuffle=True: Lightning 2 shuffles training data under DDP whatever the loader says; with
    # it, both frameworks inject DistributedSampler(shuffle=True, seed=0): the same order.
    loader = DataLoader(dataset, batch_size=workload.batch_size, shuffle=True)
    stamps: List[float] = []

    def stamp() -> None:
        if gpu:
            torch.cuda.synchronize()  # host sync: benchmark timing only
        stamps.append(time.perf_counter())

    if args.contender == "lightning":
        mode = _fit_lightning(workload, loader, total, world, gpu, stamp)
    else:
        mode = _fit_fastloop(workload, loader, total, world, gpu, stamp, args.contender.split("-", 1)[1])
    if rank != 0:
        return
    start = args.warmup - 1  # the end of the last warm-up step
    windows = [(stamps[start + (i + 1) * args.steps] - stamps[start + i * args.steps]) / args.steps
               for i in range(args.rounds)]
    with open(args.out + ".tmp", "w") as f:
        json.dump({"step_s": windows, "mode": mode, "world": world, "steps_run": len(stamps)}, f)
    os.replace(args.out + ".tmp", args.out)


def _fit_fastloop(workload: Any, loader: Any, total: int, world: int, gpu: bool, stamp: Any, mode: str) -> str:
    import torch

    import fastloop
    from fastloop.bench.fastloop_contender import BenchModule, mode_used

    dist = torch.distributed
    if world > 1 and not dist.is_initialized():  # the Trainer joins a group that exists
        dist.init_process_group("nccl" if gpu else "gloo")

    class Stamp(fastloop.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            stamp()

    module = BenchModule(workload.model(seed=0), workload.loss_fn, workload.make_optimizer)
    trainer = fastloop.Trainer(
        max_epochs=1, max_steps=total, mode=mode, accelerator="cuda" if gpu else "cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[Stamp()],
    )
    trainer.fit(module, loader)
    explained = [line.strip() for line in trainer.explain().splitlines() if "fallback:" in line]
    return mode_used(trainer) + (f" ({explained[0]})" if explained else "")


def _fit_lightning(workload: Any, loader: Any, total: int, world: int, gpu: bool, stamp: Any) -> str:
    import lightning.pytorch as pl
    import torch

    class Stamp(pl.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            stamp()

    class BenchLightningModule(pl.LightningModule):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return workload.loss_fn(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return workload.make_optimizer(list(self.net.parameters()))

    trainer = pl.Trainer(
        max_epochs=1, max_steps=total, accelerator="gpu" if gpu else "cpu", devices=world,
        strategy="ddp" if world > 1 else "auto", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Stamp()],
    )
    trainer.fit(BenchLightningModule(workload.model(seed=0)), loader)
    return f"lightning {pl.__version__}"


# --------------------------------------------------------------------------------- launcher side
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lightning_unavailable(python: str) -> Optional[str]:
    """Why the Lightning contender cannot run with ``python``, or None."""
    if not os.path.exists(python):
        return f"{python} does not exist"
    probe = subprocess.run([python, "-c", "import lightning, fastloop; print(lightning.__version__)"],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        return f"{python} cannot import lightning and fastloop: {probe.stderr.strip().splitlines()[-1:]}"
    return None


def launch(args: argparse.Namespace, python: str, contender: str, workload: str, nproc: int) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ddp-bench-") as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [python, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={_free_port()}",
               os.path.abspath(__file__), "--worker", "--contender", contender, "--workload", workload,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--rounds", str(args.rounds),
               "--device", "cuda" if args.gpu else "cpu", "--out", out]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("FASTLOOP_MODE", None)  # the contender names its mode
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {args.timeout} s"}
        if proc.returncode != 0 or not os.path.exists(out):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
        with open(out) as f:
            return json.load(f)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="tiny-mlp,mnist-mlp")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--nprocs", default="1,2", help="process counts, e.g. 1,2")
    parser.add_argument("--steps", type=int, default=200, help="steps per timed window")
    parser.add_argument("--rounds", type=int, default=5, help="timed windows per launch (median reported)")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps first (compilation included)")
    parser.add_argument("--gpu", action="store_true", help="CUDA + NCCL, one GPU per process")
    parser.add_argument("--lightning-python", default=DEFAULT_LIGHTNING_PYTHON)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per torchrun launch")
    parser.add_argument("--json", help="also write the raw results here")
    # worker-only arguments
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return
    import torch

    contenders = [c for c in args.contenders.split(",") if c]
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}; choose from {CONTENDERS}")
    nprocs = [int(n) for n in args.nprocs.split(",")]
    if args.gpu and max(nprocs) > torch.cuda.device_count():
        parser.error(f"--gpu with {max(nprocs)} processes needs as many GPUs; {torch.cuda.device_count()} visible")
    notes: List[str] = []
    if "lightning" in contenders:
        reason = lightning_unavailable(args.lightning_python)
        if reason:
            notes.append(f"lightning skipped: {reason}")
            contenders.remove("lightning")
    device = torch.cuda.get_device_name(0) if args.gpu else f"{os.cpu_count()}-core CPU"
    print(f"# ddp_throughput: {device}, torch {torch.__version__}, {'nccl' if args.gpu else 'gloo'}; "
          f"{args.rounds} windows of {args.steps} steps after {args.warmup} warm-up steps; OMP_NUM_THREADS=1")
    for note in notes:
        print(f"# {note}")
    results: Dict[str, Dict[str, Dict[int, Dict[str, Any]]]] = {}
    for workload in args.workloads.split(","):
        for nproc in nprocs:
            for contender in contenders:
                python = args.lightning_python if contender == "lightning" else sys.executable
                result = launch(args, python, contender, workload, nproc)
                results.setdefault(workload, {}).setdefault(contender, {})[nproc] = result
                print(f"#   {workload} {contender} x{nproc}: "
                      + (result["error"] if "error" in result else
                         f"{statistics.median(result['step_s']) * 1e3:.3f} ms/step"), flush=True)
    print_table(results, nprocs, args)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump({"notes": notes, "results": results}, f, indent=1)
        os.replace(args.json + ".tmp", args.json)


def print_table(results: Dict[str, Any], nprocs: List[int], args: argparse.Namespace) -> None:
    from fastloop.bench.workloads import get_workload

    print("\n| workload | contender | procs | ms/step (median) | samples/s | scaling | vs lightning | step used |")
    print("|---|---|---|---|---|---|---|---|")
    for workload, by_contender in results.items():
        batch = get_workload(workload).batch_size
        for contender, by_nproc in by_contender.items():
            base = by_nproc.get(nprocs[0], {})
            for nproc in nprocs:
                r = by_nproc.get(nproc, {})
                if "error" in r or not r:
                    print(f"| {workload} | {contender} | {nproc} | {r.get('error', 'not run')} | | | | |")
                    continue
                step = statistics.median(r["step_s"])
                rate = batch * nproc / step
                scaling = ""
                if nproc != nprocs[0] and "step_s" in base:
                    scaling = f"{rate / (batch * nprocs[0] / statistics.median(base['step_s'])):.2f}x"
                pl = by_contender.get("lightning", {}).get(nproc, {}) if contender != "lightning" else {}
                vs = f"{statistics.median(pl['step_s']) / step:.2f}x" if "step_s" in pl else ""
                print(f"| {workload} | {contender} | {nproc} | {step * 1e3:.3f} | {rate:,.0f} | {scaling} | {vs} "
                      f"| {r['mode']} |")


if __name__ == "__main__":
    main()
