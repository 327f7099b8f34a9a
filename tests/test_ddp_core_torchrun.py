"""Eager DDP across processes (gloo): 2 workers under torchrun end with identical parameters,
equal to one process fed the same global batches (automatic, accumulating and manual
optimization); a checkpoint is written by rank 0 only and resumed exactly by both; logs are
written by rank 0 only. Slow: ``python train.py`` with devices=2 (torch's launcher API) and a
simulated two-node run (two ``torchrun --nnodes=2`` with a c10d rendezvous on 127.0.0.1).

One torchrun start costs seconds of imports: the default cases share one launch (``core``)."""
import glob
import os
import subprocess

import pytest
import torch

from tests import ddp_worker
from tests.ddp_worker import launch, result, torchrun_args

TIMEOUT_S = 240  # a hung collective fails the test, not the suite

CORE_RUNS = [
    {"name": "plain"},
    {"name": "accumulate", "accumulate": 2},
    {"name": "manual", "manual": True},
    {"name": "full", "ckpt_every": 3, "logger": True},
    {"name": "first_epoch", "max_epochs": 1, "ckpt_every": 3, "ckpt_dir": "resume_ckpts"},
    {"name": "resumed", "ckpt_every": 3, "ckpt_dir": "resume_ckpts", "resume": True},
]


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp_core"))
    proc = launch(torchrun_args(2), {"out": out, "runs": CORE_RUNS}, TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return out


def reference(tmp_path, **run):
    """The same training in this process, one rank, fed both ranks' rows at each step."""
    ddp_worker.train({"name": "ref", "reference": True, "devices": 1, **run}, str(tmp_path), [])
    return result(str(tmp_path), "ref", 0)["params"]


def assert_ranks_identical(out, name):
    a, b = result(out, name, 0), result(out, name, 1)
    for key in a["params"]:
        assert torch.equal(a["params"][key], b["params"][key]), (name, key)
    return a


def assert_close(params, expected):
    for key in expected:
        torch.testing.assert_close(params[key], expected[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, run", [("plain", {}), ("accumulate", {"accumulate": 2}), ("manual", {})])
def test_two_processes_equal_one_process_fed_the_global_batches(core, tmp_path, name, run):
    rank0 = assert_ranks_identical(core, name)
    assert rank0["global_step"] == (8 if name == "accumulate" else 16)
    assert_close(rank0["params"], reference(tmp_path, **run))


def test_trainer_coordinates_under_torchrun(core):
    for rank in (0, 1):
        r = result(core, "plain", rank)
        assert (r["global_rank"], r["local_rank"], r["node_rank"], r["world_size"], r["num_nodes"],
                r["num_devices"], r["is_global_zero"]) == (rank, rank, 0, 2, 1, 2, rank == 0)
    assert "distributed: training_step runs through DistributedDataParallel" in result(core, "plain", 0)["explain"]


def test_only_rank_zero_writes_checkpoints_and_logs(core):
    full0, full1 = result(core, "full", 0), result(core, "full", 1)
    assert full1["written"] == []
    assert "last.ckpt" in full0["written"] and len(full0["written"]) >= 6  # steps 3, 6, ... 15
    versions = os.listdir(os.path.join(core, "full_logs", "lightning_logs"))
    assert versions == ["version_0"]  # rank 1 took rank 0's version, and created nothing
    assert os.path.isfile(os.path.join(core, "full_logs", "lightning_logs", "version_0", "metrics.csv"))


def test_checkpoint_written_once_is_resumed_exactly_by_both_ranks(core):
    ckpt = os.path.join(core, "resume_ckpts", "last.ckpt")
    for rank in (0, 1):
        resumed, full = result(core, "resumed", rank), result(core, "full", rank)
        assert resumed["restored_from"] == ckpt  # resolved by rank 0, broadcast
        assert resumed["global_step"] == 16
        for key in full["params"]:
            assert torch.equal(resumed["params"][key], full["params"][key]), (rank, key)
    assert result(core, "first_epoch", 1)["written"] == []


def test_plain_python_with_two_devices_launches_two_workers(tmp_path):
    out = str(tmp_path / "out")
    proc = launch([], {"out": out, "runs": [{"name": "launched", "devices": 2}]}, TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert sorted(os.listdir(out)) == ["launched.rank0.pt", "launched.rank1.pt"]  # the launcher trained nothing
    assert assert_ranks_identical(out, "launched")["world_size"] == 2


def test_plain_python_launcher_exits_with_the_failed_workers_status(tmp_path):
    run = {"name": "failing", "devices": 2, "fail": {"rank": 1, "step": 3, "how": "raise"}}
    proc = launch([], {"out": str(tmp_path), "runs": [run]}, TIMEOUT_S)
    assert proc.returncode == 1
    assert "RuntimeError: boom at step 3" in proc.stdout
    assert "fastloop: raised on global rank 1 (of 2 processes)" in proc.stdout


def test_two_simulated_nodes_train_identically(tmp_path):
    out, port = str(tmp_path), ddp_worker.free_port()
    spec = {"out": out, "runs": [{"name": "nodes", "num_nodes": 2}]}
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    procs = [
        subprocess.Popen(
            [ddp_worker.sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
             f"--node-rank={i}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=fastloop-test",
             ddp_worker.WORKER, ddp_worker.json.dumps(spec)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in (0, 1)
    ]
    try:
        outputs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    rank0 = assert_ranks_identical(out, "nodes")
    coords = sorted((result(out, "nodes", r)["node_rank"], result(out, "nodes", r)["num_nodes"],
                     result(out, "nodes", r)["num_devices"], result(out, "nodes", r)["world_size"]) for r in (0, 1))
    assert coords == [(0, 2, 1, 2), (1, 2, 1, 2)]
    assert rank0["global_step"] == 16
    assert not glob.glob(os.path.join(out, "*.ckpt"))
