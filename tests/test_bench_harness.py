"""Smoke tests of the benchmark harness (``fastloop.bench``): parity, CLI, JSON schema, failure
handling, and the pytest-benchmark suite in ``--benchmark-disable`` mode. No timing assertions."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastloop.bench import registry
from fastloop.bench.__main__ import build_parser, main, resolve_contenders
from fastloop.bench.contender import Contender
from fastloop.bench.raw import RawLoop
from fastloop.bench.runner import Row, compare_with_reference, rank, run_workload
from fastloop.bench.schema import SCHEMA_VERSION, validate
from fastloop.bench.workloads import get_workload

CPU = torch.device("cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("workload", ["tiny-mlp", "mnist-mlp"])
def test_raw_and_fastloop_eager_compute_the_same_loss(workload):
    # mnist-mlp has dropout: equality also proves each contender has its own RNG stream.
    rows = run_workload(get_workload(workload), ["raw", "fastloop-eager"], CPU, steps=4, rounds=2, warmup_steps=2)
    raw, eager = rows
    assert raw.status == eager.status == "ok", (raw.error, eager.error)
    assert eager.mode_used == "eager"
    assert eager.final_loss == pytest.approx(raw.final_loss, rel=1e-6, abs=0)
    assert eager.loss_rel_diff <= 1e-6
    assert len(eager.us_per_step_rounds) == 2 and eager.ratio_vs_raw is not None


def test_time_budget_stops_every_contender_after_the_same_step():
    rows = run_workload(get_workload("tiny-mlp"), ["raw", "fastloop-eager"], CPU, steps=2, rounds=6,
                        warmup_steps=1, time_budget_s=1e-9)
    raw, eager = rows
    assert len(raw.us_per_step_rounds) == len(eager.us_per_step_rounds) == 3  # MIN_ROUNDS
    assert eager.status == "ok" and eager.final_loss == pytest.approx(raw.final_loss, rel=1e-6, abs=0)
    assert any("time budget" in n for n in eager.notes)


def test_loss_mismatch_is_flagged_and_not_ranked():
    rows = [Row("w", "raw", final_loss=1.0, us_per_step=10.0, us_per_step_rounds=[10.0, 10.0]),
            Row("w", "fast-but-wrong", final_loss=1.5, us_per_step=1.0, us_per_step_rounds=[1.0, 1.0]),
            Row("w", "slow", final_loss=1.0, us_per_step=20.0, us_per_step_rounds=[20.0, 20.0])]
    compare_with_reference(rows, loss_rtol=1e-4)
    assert rows[1].status == "flagged" and rows[1].loss_rel_diff == pytest.approx(0.5)
    assert rows[2].status == "ok" and rows[2].ratio_vs_raw == pytest.approx(2.0)
    assert rank(rows) == {"raw": 1, "slow": 2}


def test_parity_is_checked_on_the_loss_after_warm_up():
    """A final loss apart by fp32 drift alone is a note; a warm-up loss apart is a flag."""
    rows = [Row("w", "raw", final_loss=1.0, warmup_loss=2.0, us_per_step=10.0, us_per_step_rounds=[10.0]),
            Row("w", "drifts", final_loss=1.002, warmup_loss=2.00002, us_per_step=5.0, us_per_step_rounds=[5.0]),
            Row("w", "wrong", final_loss=1.0, warmup_loss=2.01, us_per_step=5.0, us_per_step_rounds=[5.0])]
    compare_with_reference(rows, loss_rtol=1e-4)
    assert rows[1].status == "ok" and rows[1].warmup_loss_rel_diff == pytest.approx(1e-5)
    assert rows[1].notes == ["final loss drifts from raw by 2.00e-03 (fp32 rounding compounded over the run; "
                             "after warm-up: 1.0e-05)"]
    assert rows[2].status == "flagged"
    assert rows[2].notes == ["loss after the warm-up steps differs from raw by 5.00e-03 (> rtol 0.0001)"]


def test_options_parse():
    args = build_parser().parse_args(["--workloads", "tiny-mlp,mnist-mlp", "--modes", "eager,compiled",
                                      "--device", "cpu", "--steps", "7", "--rounds", "3", "--json", "x.json"])
    assert args.workloads == ["tiny-mlp", "mnist-mlp"] and args.steps == 7 and args.rounds == 3
    assert resolve_contenders(args, CPU) == ["raw", "fastloop-eager", "fastloop-compiled"]
    defaults = build_parser().parse_args([])
    assert defaults.workloads == ["tiny-mlp", "small-transformer"]
    assert resolve_contenders(defaults, CPU) == ["raw", "fastloop-eager", "fastloop-compiled", "lightning"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--modes", "eager", "--contenders", "raw"])  # mutually exclusive
    with pytest.raises(SystemExit):
        resolve_contenders(build_parser().parse_args(["--contenders", "nope"]), CPU)


def test_json_output_matches_schema(tmp_path, capsys):
    path = tmp_path / "out.json"
    assert main(["--device", "cpu", "--contenders", "fastloop-eager,lightning,torch-compile-ro",
                 "--workloads", "tiny-mlp,data-loading", "--steps", "3", "--rounds", "2", "--warmup", "1",
                 "--json", str(path), "--no-plot"]) == 0
    doc = json.loads(path.read_text())
    assert validate(doc) == []
    assert doc["schema_version"] == SCHEMA_VERSION
    statuses = {r["contender"]: r["status"] for r in doc["results"] if r["workload"] == "tiny-mlp"}
    assert statuses["raw"] == "ok" and statuses["fastloop-eager"] == "ok"
    assert statuses["torch-compile-ro"] == "skipped"  # CUDA only
    assert "data-loading" in doc["extras"]
    out = capsys.readouterr().out
    assert "fastloop-eager" in out and "µs/step" in out
    # The checker does catch problems.
    broken = dict(doc, results=[dict(doc["results"][0], status="weird", us_per_step="fast")])
    assert len(validate(broken)) >= 2
    assert validate({"schema_version": 0}) != []


class _Boom(RawLoop):
    name = "boom"

    def run(self, steps):
        if len(getattr(self, "_calls", [])) >= 1:
            raise RuntimeError("boom in round 2")
        self._calls = [1]
        return super().run(steps)


class _BadSetup(Contender):
    name = "bad-setup"

    def setup(self, spec):
        raise ValueError("cannot set up")


def test_failing_contender_is_reported_and_the_run_continues(monkeypatch):
    monkeypatch.setitem(registry.CONTENDERS, "boom", _Boom)
    monkeypatch.setitem(registry.CONTENDERS, "bad-setup", _BadSetup)
    rows = run_workload(get_workload("tiny-mlp"), ["raw", "bad-setup", "boom", "fastloop-eager"], CPU,
                        steps=3, rounds=3, warmup_steps=1)
    by_name = {r.contender: r for r in rows}
    assert by_name["boom"].status == "failed" and "boom in round 2" in by_name["boom"].error
    assert by_name["bad-setup"].status == "failed" and "cannot set up" in by_name["bad-setup"].error
    assert by_name["raw"].status == by_name["fastloop-eager"].status == "ok"
    assert len(by_name["fastloop-eager"].us_per_step_rounds) == 3


def test_fastloop_contender_failing_inside_fit_is_reported(monkeypatch):
    from fastloop.bench import fastloop_contender

    def broken_step(self, batch, batch_idx):
        if self.trainer.global_step >= 3:
            raise RuntimeError("step exploded")
        x, y = batch
        return self.loss_fn(self.net(x), y)

    monkeypatch.setattr(fastloop_contender.BenchModule, "training_step", broken_step)
    rows = run_workload(get_workload("tiny-mlp"), ["fastloop-eager", "raw"], CPU, steps=3, rounds=2,
                        warmup_steps=2)
    assert rows[0].status == "failed" and "step exploded" in rows[0].error
    assert rows[1].status == "ok"


def test_benchmark_suite_smoke():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               FASTLOOP_BENCH_STEPS="3", FASTLOOP_BENCH_ROUNDS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
         os.path.join(ROOT, "benchmarks", "test_bench_steps.py"), "-k", "tiny-mlp and (raw or fastloop-eager)"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 passed" in proc.stdout
