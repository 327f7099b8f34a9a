"""Worker of tests/test_ddp_compiled.py, run by torchrun on 2 processes (gloo, CPU).

``python -m torch.distributed.run --nproc-per-node=2 tests/ddp_compiled_worker.py CASE OUT_DIR``

Each rank builds its model from its own seed (the set-up broadcast must make them equal), trains
it with ``Trainer(mode=...)`` on its half of every global batch, and trains the same initial
model with a hand-written loop over ``torch.nn.parallel.DistributedDataParallel`` (``no_sync``
while accumulating, clipping, ``torch.optim.Adam``): eager DDP, the reference. It writes what it
saw to ``OUT_DIR/rank<r>.json``; the test asserts on those files.

Cases:
* ``accumulate_clip``: compiled mode, accumulate_grad_batches=2, gradient_clip_val=0.5, a
  BatchNorm module, Adam.
* ``nan_on_rank1``: compiled mode, nonfinite="skip", the loss of rank 1 is NaN at its second
  batch only: both ranks must skip that step.
* ``nccl_cudagraph`` (2 GPUs): as ``accumulate_clip`` under NCCL with ``mode="cudagraph"``.

The module trained by fastloop's eager DDP (``Trainer(mode="eager")``) from the same initial
weights is compared too.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import fastloop
from fastloop import Trainer

STEPS = 6
PER_RANK = 8  # rows of each global batch a rank gets


def make_net() -> nn.Module:
    # BatchNorm after the ReLU: a Linear bias right before a BatchNorm gets a gradient of pure
    # rounding noise, which Adam would turn into lr-sized steps that no two programs share.
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, 4))


class Batches:
    """This rank's half of each global batch, in order (a plain iterable: no sampler, no sharding)."""

    def __init__(self, rank: int, world: int) -> None:
        gen = torch.Generator().manual_seed(1234)
        x = torch.randn(STEPS, world * PER_RANK, 8, generator=gen)
        y = torch.randint(0, 4, (STEPS, world * PER_RANK), generator=gen)
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        self.batches = [(x[i, rows].clone(), y[i, rows].clone()) for i in range(STEPS)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


class Net(fastloop.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def reference(net: nn.Module, batches: Batches, accumulate: int, clip: float | None,
              device: torch.device) -> nn.Module:
    """Eager DDP by hand: what Lightning 1.9 does around DistributedDataParallel."""
    ddp = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.Adam(ddp.parameters(), lr=0.05)
    for i, (x, y) in enumerate(batches):
        stepping = (i + 1) % accumulate == 0 or i + 1 == len(batches)
        with contextlib.nullcontext() if stepping else ddp.no_sync():
            (F.cross_entropy(ddp(x.to(device)), y.to(device)) / accumulate).backward()
        if stepping:
            grads = [p.grad for p in net.parameters()]
            # nonfinite="skip": DDP's reduced gradients agree across ranks, and so does this test.
            finite = all(bool(torch.isfinite(g).all()) for g in grads)
            if clip is not None:
                nn.utils.clip_grad_norm_(net.parameters(), clip)
            if finite:
                opt.step()
            opt.zero_grad()
    return net


def gather_equal(tensors: list, device: torch.device) -> bool:
    """True when every rank holds exactly these values."""
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors]).to(device)
    everyone = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, flat)
    return all(torch.equal(everyone[0], other) for other in everyone[1:])


def compare(net: nn.Module, ref: nn.Module) -> dict:
    """Per tensor: within the parity tolerance of tests/test_compiled_parity.py, and the largest difference."""
    ours = dict(list(net.named_parameters()) + list(net.named_buffers()))
    theirs = dict(list(ref.named_parameters()) + list(ref.named_buffers()))
    out = {}
    for name, t in ours.items():
        a, b = t.detach().double().cpu(), theirs[name].detach().double().cpu()
        out[name] = [bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5)), (a - b).abs().max().item()]
    return out


def train(mode: str, net: nn.Module, batches: Batches, accumulate: int, clip: float | None,
          nonfinite: str) -> Trainer:
    trainer = Trainer(mode=mode, max_epochs=1, accumulate_grad_batches=accumulate, gradient_clip_val=clip,
                      nonfinite=nonfinite, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(Net(net), batches)
    return trainer


def main(case: str, out_dir: str) -> None:
    backend = "nccl" if case == "nccl_cudagraph" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(100 + rank)  # different initial weights on each rank: the set-up broadcast must fix it
    net = make_net()
    initial = copy.deepcopy(net)
    batches = Batches(rank, world)
    mode, accumulate, clip, nonfinite = "compiled", 2, 0.5, "raise"
    if case == "nan_on_rank1":
        accumulate, clip, nonfinite = 1, None, "skip"
        if rank == 1:  # a NaN input row makes this rank's loss (and gradients) NaN
            batches.batches[1][0][0, 0] = float("nan")
    elif case == "nccl_cudagraph":
        mode = "cudagraph"
    elif case != "accumulate_clip":
        raise SystemExit(f"unknown case {case!r}")
    trainer = train(mode, net, batches, accumulate, clip, nonfinite)
    eager_net = copy.deepcopy(initial)
    eager = train("eager", eager_net, batches, accumulate, clip, nonfinite)  # fastloop's eager DDP
    ref = reference(copy.deepcopy(initial).to(device), batches, accumulate, clip, device)

    opt = trainer.optimizers[0]
    state = [opt.state[p][key] for p in net.parameters() for key in ("exp_avg", "exp_avg_sq", "step")]
    result = {
        "explain": trainer.explain(),
        "eager_explain": eager.explain(),
        "params_equal_across_ranks": gather_equal(list(net.parameters()), device),
        "adam_state_equal_across_ranks": gather_equal(state, device),
        "adam_step": float(opt.state[next(net.parameters())]["step"]),
        "vs_torch_ddp": compare(net, ref),
        "vs_fastloop_eager_ddp": compare(net, eager_net),
        "global_step": trainer.global_step,
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
