"""Distributed data under torchrun (gloo, 2 processes): sampler injection, TensorLoader shards,
``sync_dist`` metrics and mid-epoch resume on every rank. The processes run
``tests/ddp_data_worker.py``, once for all scenarios (each launch costs seconds of imports)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Dict, List, Tuple

import pytest

from tests.ddp_worker import free_port

WORKER = os.path.join(os.path.dirname(__file__), "ddp_data_worker.py")
SCENARIOS = ("sampler", "tensorloader", "sync", "resume")


def run_worker(out_dir: str, scenarios: Tuple[str, ...], env: Dict[str, str], timeout: int) -> List[Dict[str, Any]]:
    """Run the scenarios on 2 processes; return ``[{scenario: rank 0 result}, {...rank 1}]``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           WORKER, out_dir, ",".join(scenarios)]
    # A hung collective must fail the test, not the suite: hence the timeout.
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results: List[Dict[str, Any]] = [{}, {}]
    for rank in (0, 1):
        for name in scenarios:
            with open(os.path.join(out_dir, f"{name}_rank{rank}.json")) as f:
                results[rank][name] = json.load(f)
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: Any) -> List[Dict[str, Any]]:
    env = dict(os.environ, FASTLOOP_MODE="eager", OMP_NUM_THREADS="1")
    return run_worker(str(tmp_path_factory.mktemp("ddp_data")), SCENARIOS, env, timeout=240)


def ids_by_epoch(seen: List[Any]) -> Dict[int, List[int]]:
    out: Dict[int, List[int]] = {}
    for epoch, ids in seen:
        out.setdefault(epoch, []).extend(ids)
    return out


def test_distributed_sampler_is_injected_with_set_epoch(ranks: List[Dict[str, Any]]) -> None:
    r0, r1 = (ranks[r]["sampler"] for r in (0, 1))
    assert r0["train_sampler"] == r1["train_sampler"] == ["DistributedSampler", True, 0]
    assert r0["kept_arguments"] == [4, True, True]  # batch_size and collate_fn kept; the user's loader untouched
    e0, e1 = ids_by_epoch(r0["train"]), ids_by_epoch(r1["train"])
    for epoch in (0, 1):
        assert len(e0[epoch]) == len(e1[epoch]) == 20
        assert sorted(e0[epoch] + e1[epoch]) == list(range(40))  # disjoint, and together the whole epoch
    assert e0[0] != e0[1] and e1[0] != e1[1]  # set_epoch: another permutation in epoch 2
    assert sorted(e0[0]) != sorted(e0[1])


def test_evaluation_and_predict_shards(ranks: List[Dict[str, Any]]) -> None:
    r0, r1 = (ranks[r]["sampler"] for r in (0, 1))
    # validation: in order, not shuffled (rank r takes r, r + 2...); run after each of the 2 epochs
    assert r0["val"] == [0, 2, 4, 6, 8] * 2 and r1["val"] == [1, 3, 5, 7, 9] * 2
    # predict: 41 samples, each exactly once over the ranks, no padding
    assert r0["predict"] == list(range(0, 41, 2)) and r1["predict"] == list(range(1, 41, 2))


def test_sampler_off_and_user_samplers(ranks: List[Dict[str, Any]]) -> None:
    whole = [[0, [0, 1, 2, 3]], [0, [4, 5, 6, 7]], [0, [8, 9, 10, 11]]]
    for rank in (0, 1):
        result = ranks[rank]["sampler"]
        assert result["off"] == whole  # use_distributed_sampler=False: every rank reads everything
        assert result["legacy_off"] == whole  # Lightning 1.x's replace_sampler_ddp=False
        assert result["own_sampler_kept"] is True
        assert result["custom_sampler_error"] == (
            "`train_dataloader` returned a DataLoader with a custom sampler (EveryOtherSampler), which fastloop "
            "cannot shard across the 2 processes: give it a torch.utils.data.DistributedSampler yourself (the "
            "loader is then kept as it is), or pass Trainer(use_distributed_sampler=False) to feed it to every "
            "process unchanged")


def test_tensor_loader_equal_disjoint_shards(ranks: List[Dict[str, Any]]) -> None:
    r0, r1 = (ranks[r]["tensorloader"] for r in (0, 1))
    # built before the process group existed, it still follows torch.distributed
    assert (r0["rank"], r0["world_size"], r1["rank"], r1["world_size"]) == (0, 2, 1, 2)
    assert r0["len"] == r1["len"] == 5  # 43 rows: 21 per rank, 5 batches of 5, 5, 5, 5, 1 on each
    import torch

    for epoch in (0, 1):
        a, b = ids_by_epoch(r0["train"])[epoch], ids_by_epoch(r1["train"])[epoch]
        assert len(a) == len(b) == 21 and not set(a) & set(b)
        # the same permutation on both ranks: rank 0 has its first half, rank 1 the second
        gen = torch.Generator().manual_seed((3 * 1_000_003 + epoch) % 2**64)
        assert a + b == torch.randperm(43, generator=gen).tolist()[:42]
    assert [len(ids) for _, ids in r0["train"]] == [len(ids) for _, ids in r1["train"]]


def test_sync_dist_reduces_across_ranks(ranks: List[Dict[str, Any]]) -> None:
    # 24 samples: 3 batches of 4 per rank; rank r logs 2r + batch_idx (mean), 10r + batch_idx (max),
    # 1 (sum), r with batch size r + 1 (weighted mean), r without sync_dist.
    for rank in (0, 1):
        m = ranks[rank]["sync"]["metrics"]
        assert m["mean_metric"] == m["mean_metric_epoch"] == 2.0  # mean of 0, 1, 2, 2, 3, 4
        assert m["mean_metric_step"] == 3.0  # last step: mean of 2 and 4
        assert m["max_metric"] == m["max_metric_step"] == 12.0
        assert m["sum_metric"] == 6.0
        assert m["weighted"] == pytest.approx(2 / 3)  # (0 x 1 + 1 x 2) / (1 + 2) samples
        assert m["val_metric"] == 0.5
        assert m["local_metric"] == float(rank)  # not synced: per rank


def test_resume_mid_epoch_exact_on_every_rank(ranks: List[Dict[str, Any]]) -> None:
    for rank in (0, 1):
        for loader in ("dataloader", "tensorloader"):
            run = ranks[rank]["resume"][loader]
            # checkpoint after the 7th batch (epoch 1, batch 1): the resumed run sees exactly the rest
            assert len(run["reference"]) == 10
            assert run["resumed"] == run["reference"][7:]
    for loader in ("dataloader", "tensorloader"):
        both = [ranks[r]["resume"][loader]["reference"] for r in (0, 1)]
        for epoch in (0, 1):
            ids = ids_by_epoch(both[0])[epoch] + ids_by_epoch(both[1])[epoch]
            assert sorted(ids) == list(range(20))


@pytest.mark.slow
def test_sync_dist_from_the_compiled_step(tmp_path: Any) -> None:
    """Values logged inside the compiled DDP step leave the graph as tensors and are reduced after it."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("FASTLOOP_MODE", None)
    results = run_worker(str(tmp_path), ("sync_compiled",), env, timeout=400)
    for rank in (0, 1):
        assert "optimizer_loop (OptimizerLoop): compiled [1 graph(s)" in results[rank]["sync_compiled"]["explain"]
        m = results[rank]["sync_compiled"]["metrics"]
        assert m["rank_metric_step"] == m["rank_metric"] == m["rank_metric_epoch"] == 0.5
