"""Compiled DDP: gradient all-reduce inside the fused graph vs right after it (2 processes, gloo).

Run (from the repository root):
    python -m torch.distributed.run --nproc-per-node=2 benchmarks/ddp_grad_sync_placement.py \
        [--workload tiny|mnist] [--steps 50] [--repeats 15]

Per rank, on the same batches, in alternating blocks of ``steps`` steps (medians over blocks):

* ``in-graph``: ``FusedStep`` with ``grad_sync``: one graph per step that all-reduces (one flat
  buffer) between backward and the Adam update. What compiled DDP runs.
* ``after``: the placement the alternative would have: the fused step's forward/backward graph
  (its accumulate-only graph, called directly), then an eager ``dist.all_reduce`` of one flat
  buffer, then the Adam update in a second compiled graph. Its ``grads+allreduce`` part alone
  (no update at all) is a lower bound of any after-step placement: when ``in-graph`` beats even
  that, the in-graph placement is the faster one whatever the update graph costs.

Compile time is excluded (warm-up). Compare the ratios printed by rank 0, not the absolute µs.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastloop.distributed.grad_sync import GradSync
from fastloop.step.fused_step import build_fused_step


def workload(name: str) -> tuple[nn.Module, int, int]:
    if name == "tiny":
        return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)), 32, 64
    return nn.Sequential(nn.Linear(784, 128), nn.Tanh(), nn.Linear(128, 10)), 784, 128


def loss_fn(module: nn.Module):
    def fn(params, buffers, x, y):
        return F.cross_entropy(torch.func.functional_call(module, {**params, **buffers}, (x,)), y), ()
    return fn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", default="tiny", choices=("tiny", "mnist"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    net_a, features, batch = workload(args.workload)
    net_b, _, _ = workload(args.workload)
    net_b.load_state_dict(net_a.state_dict())
    g = torch.Generator().manual_seed(dist.get_rank())
    data = [(torch.randn(batch, features, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(args.steps)]

    names = [n for n, _ in net_a.named_parameters()]
    in_graph, why = build_fused_step(loss_fn(net_a), net_a, names, torch.optim.Adam(net_a.parameters(), 1e-3),
                                     grad_sync=GradSync())
    assert in_graph is not None, why
    opt_b = torch.optim.Adam(net_b.parameters(), 1e-3)
    grads_only, why = build_fused_step(loss_fn(net_b), net_b, names, opt_b, accumulate=2)
    assert grads_only is not None, why
    params_b = list(net_b.parameters())
    fopt = grads_only.functional_optimizer

    def update(params, grads, inputs):
        fopt.update(params, grads, inputs)

    update_graph = torch.compile(update, fullgraph=True, dynamic=False)

    def run_in_graph():
        for x, y in data:
            in_graph(x, y, step=True)

    def run_grads_allreduce(with_update: bool):
        for x, y in data:
            grads_only.zero_grad()
            grads_only(x, y, step=False)  # forward, backward, p.grad = g (the accumulate-only graph)
            grads = [p.grad for p in params_b]
            flat = torch.cat([t.reshape(-1) for t in grads]).div_(dist.get_world_size())
            dist.all_reduce(flat)
            torch._foreach_copy_(grads, [t.view_as(g) for t, g in zip(flat.split([g.numel() for g in grads]),
                                                                       grads)])
            if with_update:
                with torch.no_grad():
                    update_graph([p.detach() for p in params_b], grads, fopt.prepare())
                fopt.finish()

    variants = {"in-graph": run_in_graph, "after": lambda: run_grads_allreduce(True),
                "grads+allreduce": lambda: run_grads_allreduce(False)}
    start = time.perf_counter()
    for fn in variants.values():  # warm-up: compiles
        fn()
    compile_s = time.perf_counter() - start
    blocks = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            dist.barrier()
            t = time.perf_counter()
            fn()
            blocks[name].append((time.perf_counter() - t) / args.steps * 1e6)
    if dist.get_rank() == 0:
        med = {k: statistics.median(v) for k, v in blocks.items()}
        print(f"workload {args.workload}, world 2 (gloo), {args.steps} steps x {args.repeats} blocks, "
              f"warm-up with compiles {compile_s:.0f} s; torch {torch.__version__}")
        for k, v in med.items():
            print(f"  {k:16s} median {v:8.0f} µs/step   min {min(blocks[k]):8.0f}")
        print(f"  after / in-graph = {med['after'] / med['in-graph']:.2f}; "
              f"(grads+allreduce, no update) / in-graph = {med['grads+allreduce'] / med['in-graph']:.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
