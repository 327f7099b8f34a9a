"""A training process SIGKILLed at chosen points and restarted with ``fit(..., ckpt_path="last")``
ends exactly where an uninterrupted run ends, having seen exactly the same batches.

Each chain runs ``tests/fault_worker.py`` in fresh processes: an uninterrupted reference run, then
runs that each resume from ``last.ckpt`` and kill themselves at the next point, then a last run
to the end. 12 batches per epoch, ``accumulate_grad_batches=3`` (4 optimizer steps per epoch), a
checkpoint every 3 optimizer steps and at each epoch end (``last.ckpt``), 4 epochs.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any, Dict, List, Tuple

import pytest
import torch

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_worker.py")

# (kill point, batches the run must have completed when its last checkpoint was written)
KILL_AFTER_EPOCH_CKPT = (["epoch_start", 1], 12)  # right after the epoch-0 end checkpoint
KILL_IN_WINDOW = (["batch_start", 2, 5], 27)  # epoch 2, 2 micro-batches into the window 3..5; last ckpt: step 9
KILL_IN_VALIDATION = (["val_batch_start", 2, 1], 36)  # validation after epoch 2; last ckpt: step 12, before it
KILLS = [KILL_AFTER_EPOCH_CKPT, KILL_IN_WINDOW, KILL_IN_VALIDATION]


def run_worker(specs: List[Dict[str, Any]], mode: str = "eager", timeout: float = 300) -> int:
    env = dict(os.environ, FASTLOOP_MODE=mode)
    proc = subprocess.run([sys.executable, WORKER, json.dumps(specs)], env=env, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"worker failed ({proc.returncode}):\n{proc.stdout[-4000:]}")
    return proc.returncode


def read_log(path: str) -> Tuple[List[str], List[int]]:
    """The ``B`` lines (batches seen) and the ``C`` counts (batches done at each checkpoint)."""
    batches: List[str] = []
    checkpoints: List[int] = []
    with open(path) as f:
        for line in f:
            kind, _, rest = line.rstrip("\n").partition(" ")
            if kind == "B":
                batches.append(rest)
            elif kind == "C":
                checkpoints.append(int(rest))
    return batches, checkpoints


def assert_same_state(a: Any, b: Any, where: str = "state") -> None:
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_same_state(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def run_chain(tmp_path: Any, loader: str, kills: List[Tuple[List[Any], int]], mode: str = "eager") -> None:
    """Reference run, then one killed-and-resumed run per kill point, then a run to the end;
    every run's batches must be the reference's from where its checkpoint left off."""
    ref_dir, dir_ = str(tmp_path / "ref"), str(tmp_path / "killed")
    base = {"loader": loader, "mode": mode}
    specs = [dict(base, out=ref_dir, run="ref"), dict(base, out=dir_, run="seg0", kill=kills[0][0])]
    assert run_worker(specs, mode) == -signal.SIGKILL
    ref_batches, _ = read_log(os.path.join(ref_dir, "ref.log"))
    assert len(ref_batches) == 48
    for i in range(1, len(kills) + 1):
        kill = kills[i][0] if i < len(kills) else None
        code = run_worker([dict(base, out=dir_, run=f"seg{i}", resume=True, kill=kill)], mode)
        assert code == (0 if kill is None else -signal.SIGKILL)

    start = 0
    for i in range(len(kills) + 1):
        batches, checkpoints = read_log(os.path.join(dir_, f"seg{i}.log"))
        assert batches == ref_batches[start:start + len(batches)], f"seg{i} (from batch {start}) saw other batches"
        if i < len(kills):
            assert not os.path.exists(os.path.join(dir_, f"seg{i}.final.pt"))
            assert start + checkpoints[-1] == kills[i][1], f"seg{i}: last checkpoint after {checkpoints[-1]} batches"
            start = kills[i][1]
        else:
            assert start + len(batches) == len(ref_batches)  # nothing skipped at the end either
    reference = torch.load(os.path.join(ref_dir, "ref.final.pt"), weights_only=True)
    resumed = torch.load(os.path.join(dir_, f"seg{len(kills)}.final.pt"), weights_only=True)
    assert reference["global_step"] == 16 and reference["scheduler"]["last_epoch"] == 4
    assert_same_state(resumed, reference)


def test_killed_and_resumed_dataloader_runs_equal_an_uninterrupted_run(tmp_path):
    run_chain(tmp_path, "dataloader", KILLS)


def test_killed_and_resumed_tensorloader_run_equals_an_uninterrupted_run(tmp_path):
    run_chain(tmp_path, "tensorloader", [KILL_IN_WINDOW])


@pytest.mark.slow
def test_killed_compiled_run_resumed_compiled_equals_uninterrupted_compiled_run(tmp_path):
    run_chain(tmp_path, "tensorloader", [KILL_IN_WINDOW], mode="compiled")
    for explain in (tmp_path / "ref" / "ref.explain.txt", tmp_path / "killed" / "seg1.explain.txt"):
        assert "(OptimizerLoop): compiled" in explain.read_text()  # not an eager fallback
