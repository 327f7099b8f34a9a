"""Compiled DDP: the fused step all-reduces its gradients in the graph (fastloop/distributed/grad_sync.py).

The end-to-end cases run ``tests/ddp_compiled_worker.py`` on 2 processes under torchrun (gloo,
CPU), each compiling its fused step, and compare with eager DDP: torch's
``DistributedDataParallel`` driven by hand, and fastloop's own eager DDP (``mode="eager"``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastloop.distributed.grad_sync import GradSync, capture_blocker, distributed_grad_sync
from tests.ddp_worker import free_port

WORKER = Path(__file__).with_name("ddp_compiled_worker.py")
REPO = WORKER.parent.parent


def run_worker(case: str, out_dir: Path, timeout: float = 540) -> list:
    """Run the worker on 2 processes; return each rank's report."""
    env = dict(os.environ)
    env.pop("FASTLOOP_MODE", None)  # the suite pins eager mode; these workers choose their own
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           str(WORKER), case, str(out_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]


def assert_equal_to_eager_ddp(reports: list) -> None:
    for rank, report in enumerate(reports):
        assert report["params_equal_across_ranks"], rank
        assert report["adam_state_equal_across_ranks"], rank
        for reference in ("vs_torch_ddp", "vs_fastloop_eager_ddp"):
            far = {name: diff for name, (close, diff) in report[reference].items() if not close}
            assert not far, f"rank {rank}, {reference}: beyond rtol=1e-4, atol=1e-5: {far}"


@pytest.mark.compile
def test_compiled_ddp_accumulate_clip_equals_eager_ddp(tmp_path):
    """accumulate_grad_batches=2, clipping, BatchNorm, Adam, ranks starting from different weights."""
    reports = run_worker("accumulate_clip", tmp_path)
    assert_equal_to_eager_ddp(reports)
    for report in reports:
        assert report["global_step"] == 3 and report["adam_step"] == 3.0
        explain = report["explain"]
        assert "OptimizerLoop): compiled [2 graph(s)" in explain, explain  # no eager fallback
        assert ("gradient all-reduce in the fused graph (stepping calls only; mean over 2 ranks, gloo, "
                "1 flat bucket(s) per step)") in explain, explain
        assert "buffers broadcast from rank 0 before the first forward of each accumulation window" in explain
        assert "OptimizerLoop): eager" in report["eager_explain"]


@pytest.mark.slow
@pytest.mark.compile
def test_compiled_ddp_nonfinite_on_one_rank_skips_on_every_rank(tmp_path):
    """A NaN loss on rank 1 only (nonfinite='skip'): both ranks skip that step and stay equal."""
    reports = run_worker("nan_on_rank1", tmp_path)
    assert_equal_to_eager_ddp(reports)
    for report in reports:
        assert report["global_step"] == 6 and report["adam_step"] == 5.0
        assert "nonfinite='skip': 1 of 6 optimizer steps skipped" in report["explain"]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_cudagraph_ddp_serves_compiled_with_reason(tmp_path):
    reports = run_worker("nccl_cudagraph", tmp_path)
    assert_equal_to_eager_ddp(reports)
    for report in reports:
        assert "OptimizerLoop): compiled (requested cudagraph)" in report["explain"]
        assert "capturing the in-graph NCCL all-reduce in a CUDA graph is not verified yet" in report["explain"]


# ---------------------------------------------------------------------------------- in process
@pytest.fixture
def group_of_one(tmp_path):
    """A gloo process group of one in this process, destroyed afterwards."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_one_process_has_no_grad_sync(group_of_one):
    assert distributed_grad_sync() is None


def test_no_process_group_has_no_grad_sync():
    assert distributed_grad_sync() is None


def test_all_reduce_mean_buckets_by_dtype_and_carries_the_flag(group_of_one):
    sync = GradSync()
    grads = [torch.arange(6.0).reshape(2, 3), torch.tensor([1.0, 2.0], dtype=torch.float64), torch.ones(4)]
    reduced, flag = sync.all_reduce_mean(grads, torch.tensor(True))
    assert [r.shape for r in reduced] == [g.shape for g in grads]
    assert [r.dtype for r in reduced] == [g.dtype for g in grads]
    assert all(torch.equal(r, g) for r, g in zip(reduced, grads))  # a mean over one rank
    assert flag.item() is True
    assert sync.all_reduce_mean(grads, torch.tensor(False))[1].item() is False
    assert sync.all_reduce_mean(grads)[1] is None
    assert GradSync.buckets(grads) == 2


def test_cudagraph_is_not_captured_under_ddp():
    gloo, nccl = SimpleNamespace(backend="gloo"), SimpleNamespace(backend="nccl")
    assert capture_blocker(None) == ""
    assert capture_blocker(gloo).startswith("the gradient all-reduce runs on the gloo backend, which a CUDA graph "
                                            "cannot capture")
    assert capture_blocker(nccl).startswith("capturing the in-graph NCCL all-reduce in a CUDA graph is not verified")


def test_compile_failure_under_ddp_raises_instead_of_an_unsynchronised_eager_step():
    from fastloop.step.compiled import CompiledTrainStep

    step = CompiledTrainStep.__new__(CompiledTrainStep)
    step.loop = SimpleNamespace()
    step.fused = {0: SimpleNamespace(grad_sync=object())}
    with pytest.raises(RuntimeError, match=r"the compiled DDP step could not be compiled \(ValueError: boom\); an eager "
                                           r"fallback would update this rank alone"):
        step._fall_back(ValueError("boom"), None, 0, 0, None, True)
