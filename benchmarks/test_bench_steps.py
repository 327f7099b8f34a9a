"""pytest-benchmark suite: steady-state training-step time per workload and contender.

Run (kept out of the default test run; ``testpaths`` is ``tests/``)::

    pytest benchmarks/ --benchmark-group-by=group            # one group per workload
    pytest benchmarks/ -k tiny-mlp --benchmark-json out.json
    pytest benchmarks/ --benchmark-disable                   # smoke: each target runs once

One benchmark round is ``STEPS`` training steps (one device synchronisation at its end on CUDA);
``warmup_rounds`` absorb compilation and CUDA-graph capture after the contender's own warm-up.
Contenders are the ones of ``python -m fastloop.bench`` (``fastloop.bench.registry``); those that
cannot run here (CUDA-only ones on CPU, Lightning when not installed) are skipped.
"""
from __future__ import annotations

import os

import pytest
import torch

from fastloop.bench.contender import RunSpec
from fastloop.bench.registry import CONTENDERS, make_contender
from fastloop.bench.runner import BATCH_POOL
from fastloop.bench.workloads import WORKLOADS

STEPS = int(os.environ.get("FASTLOOP_BENCH_STEPS", "50"))
ROUNDS = int(os.environ.get("FASTLOOP_BENCH_ROUNDS", "10"))
WARMUP_ROUNDS = 2
WARMUP_STEPS = 5
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

CASES = [
    pytest.param(w.name, c, id=f"{w.name}-{c}", marks=pytest.mark.benchmark(group=w.name))
    for w in WORKLOADS.values() if w.kind == "train"
    for c in CONTENDERS
]


@pytest.mark.parametrize("workload_name, contender_name", CASES)
def test_step_throughput(benchmark, workload_name: str, contender_name: str) -> None:
    workload = WORKLOADS[workload_name]
    if workload.gpu_only and DEVICE.type != "cuda" and not os.environ.get("FASTLOOP_BENCH_ALL"):
        pytest.skip(f"{workload_name} is meant for GPUs (set FASTLOOP_BENCH_ALL=1 to run it here)")
    contender = make_contender(contender_name)
    reason = contender.unavailable_reason(DEVICE)
    if reason:
        pytest.skip(reason)
    total = WARMUP_STEPS + (WARMUP_ROUNDS + ROUNDS) * STEPS
    spec = RunSpec(workload, DEVICE, workload.model(0), workload.batches(min(total, BATCH_POOL), 0, DEVICE), total)
    try:
        contender.setup(spec)
        first_step_s = contender.warmup(WARMUP_STEPS)
        benchmark.pedantic(contender.run, args=(STEPS,), rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
        outcome = contender.finish()
    finally:
        contender.close()
    benchmark.extra_info.update({
        "steps_per_round": STEPS, "batch_size": workload.batch_size, "device": DEVICE.type,
        "mode_requested": contender.mode_requested, "mode_used": outcome.mode_used,
        "first_step_s": first_step_s, "final_loss": outcome.final_loss,
    })
    assert outcome.final_loss is not None and torch.isfinite(torch.tensor(outcome.final_loss))
