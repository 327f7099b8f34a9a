"""Interleaved timing of contenders on one workload.

Method: every contender is set up and warmed up (``warmup_steps`` steps, first step timed
separately), then ``rounds`` rounds run; each round runs every contender for ``steps`` steps, in
an order rotated by one each round so no contender always follows the same neighbour. The
reported µs/step is the median over rounds of (round time / steps). Each contender keeps its own
copy of the global RNG state (dropout draws the same masks in every contender whatever the
interleaving). On CUDA each round ends with one device synchronisation; none per step.
"""
from __future__ import annotations

import copy
import math
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from fastloop.bench.contender import Contender, RunSpec, synchronize
from fastloop.bench.registry import REFERENCE, make_contender
from fastloop.bench.workloads import Workload

MIN_ROUNDS = 3
BATCH_POOL = 64  # distinct pre-generated batches, cycled; bounds memory for long runs
Log = Callable[[str], None]


@dataclass
class Row:
    """One (workload, contender) result; ``asdict`` gives the JSON row (see ``schema``)."""

    workload: str
    contender: str
    status: str = "ok"
    mode_requested: str = ""
    mode_used: Optional[str] = None
    us_per_step: Optional[float] = None
    us_per_step_rounds: List[float] = field(default_factory=list)
    steps_per_s: Optional[float] = None
    samples_per_s: Optional[float] = None
    ratio_vs_raw: Optional[float] = None
    speedup_vs_raw: Optional[float] = None
    first_step_s: Optional[float] = None
    final_loss: Optional[float] = None
    loss_rel_diff: Optional[float] = None
    warmup_loss: Optional[float] = None
    warmup_loss_rel_diff: Optional[float] = None
    peak_mem_bytes: Optional[int] = None
    error: Optional[str] = None
    notes: List[str] = field(default_factory=list)

    def as_json(self) -> Dict[str, Any]:
        return asdict(self)


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


class _Slot:
    """A contender with its row, RNG state and peak-memory bookkeeping."""

    def __init__(self, contender: Contender, row: Row, rng: torch.Tensor, cuda_rng: Optional[torch.Tensor]) -> None:
        self.contender, self.row, self.rng, self.cuda_rng = contender, row, rng, cuda_rng

    def call(self, device: torch.device, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` with this contender's RNG state (and peak memory tracking on CUDA)."""
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        try:
            return fn()
        finally:
            self.rng = torch.get_rng_state()
            if self.cuda_rng is not None:
                self.cuda_rng = torch.cuda.get_rng_state(device)
                peak = torch.cuda.max_memory_allocated(device) - base
                self.row.peak_mem_bytes = max(self.row.peak_mem_bytes or 0, peak)

    def fail(self, exc: BaseException, log: Log) -> None:
        self.row.status = "failed"
        self.row.error = _error_text(exc)
        log(f"  {self.row.contender} FAILED: {self.row.error}")
        log("".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-3)).rstrip())
        try:
            self.contender.close()
        except Exception:
            pass


def run_workload(workload: Workload, contender_names: List[str], device: torch.device, steps: int, rounds: int,
                 warmup_steps: int, seed: int = 0, loss_rtol: float = 1e-4, log: Log = lambda s: None,
                 time_budget_s: float = 0.0) -> List[Row]:
    """Time ``contender_names`` on ``workload``; one ``Row`` per contender, in the given order.

    With ``time_budget_s`` > 0, no new round starts once the workload has run that long and at
    least ``MIN_ROUNDS`` rounds are done (every contender then stops after the same step)."""
    if steps < 1 or rounds < 1 or warmup_steps < 1:
        raise ValueError("steps, rounds and warmup_steps must be at least 1")
    total = warmup_steps + rounds * steps
    model = workload.model(seed)
    spec = RunSpec(workload, device, model, workload.batches(min(total, BATCH_POOL), seed, device), total)
    _prime_process(spec)
    torch.manual_seed(seed + 2)
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    rows: List[Row] = []
    slots: List[_Slot] = []
    for name in contender_names:
        row = Row(workload.name, name)
        rows.append(row)
        try:
            contender = make_contender(name)
            row.mode_requested = contender.mode_requested
            reason = contender.unavailable_reason(device)
        except Exception as exc:
            row.status, row.error = "failed", _error_text(exc)
            log(f"  {name} FAILED: {row.error}")
            continue
        if reason:
            row.status, row.error = "skipped", reason
            log(f"  {name}: skipped ({reason})")
            continue
        slot = _Slot(contender, row, rng.clone(), None if cuda_rng is None else cuda_rng.clone())
        log(f"  {name}: set-up and {warmup_steps} warm-up steps")
        try:
            slot.call(device, lambda: contender.setup(spec))
            row.first_step_s = slot.call(device, lambda: contender.warmup(warmup_steps))
            row.warmup_loss = contender.current_loss()
        except Exception as exc:
            slot.fail(exc, log)
            continue
        slots.append(slot)

    started = time.perf_counter()
    for r in range(rounds):
        elapsed = time.perf_counter() - started
        if time_budget_s > 0 and r >= MIN_ROUNDS and elapsed > time_budget_s:
            note = f"time budget {time_budget_s:g}s reached: {r} of {rounds} rounds ran"
            log(f"  {note}")
            for slot in slots:
                slot.row.notes.append(note)
            break
        k = r % len(slots) if slots else 0
        for slot in slots[k:] + slots[:k]:
            if slot.row.status == "failed":
                continue
            try:
                seconds = slot.call(device, lambda: slot.contender.run(steps))
            except Exception as exc:
                slot.fail(exc, log)
                continue
            slot.row.us_per_step_rounds.append(seconds / steps * 1e6)
        done = ", ".join(f"{s.row.contender} {s.row.us_per_step_rounds[-1]:.1f}"
                         for s in slots if s.row.status != "failed")
        log(f"  round {r + 1}/{rounds} (µs/step): {done}")

    for slot in slots:
        if slot.row.status == "failed":
            continue
        try:
            outcome = slot.call(device, slot.contender.finish)
        except Exception as exc:
            slot.fail(exc, log)
            continue
        finally:
            slot.contender.close()
        slot.row.final_loss, slot.row.mode_used = outcome.final_loss, outcome.mode_used
        slot.row.notes.extend(outcome.notes)
        slot.row.us_per_step = statistics.median(slot.row.us_per_step_rounds)
        slot.row.steps_per_s = 1e6 / slot.row.us_per_step
        slot.row.samples_per_s = slot.row.steps_per_s * workload.batch_size
    compare_with_reference(rows, loss_rtol)
    return rows


def _prime_process(spec: RunSpec) -> None:
    """One throwaway step on a copy of the model, so that the first contender's first step does
    not also pay the process's one-time costs (autograd engine start, allocator, first kernel calls)."""
    model = copy.deepcopy(spec.model).to(spec.device)
    optimizer = spec.workload.make_optimizer(list(model.parameters()))
    x, y = spec.batches[0]
    spec.workload.loss_fn(model(x), y).backward()
    optimizer.step()
    synchronize(spec.device)  # host-device sync: untimed, before any contender starts


def compare_with_reference(rows: List[Row], loss_rtol: float) -> None:
    """Fill the ratio/speedup and loss-difference columns; flag rows whose loss disagrees."""
    ref = next((r for r in rows if r.contender == REFERENCE and r.status == "ok"), None)
    for row in rows:
        if row.status != "ok":
            continue
        if row.final_loss is None or not math.isfinite(row.final_loss):
            row.status = "flagged"
            row.notes.append(f"final loss is {row.final_loss}")
            continue
        if ref is None or row is ref or ref.us_per_step is None or ref.final_loss is None:
            if row is ref:
                row.ratio_vs_raw = row.speedup_vs_raw = 1.0
                row.loss_rel_diff = 0.0
            continue
        row.ratio_vs_raw = paired_ratio(row.us_per_step_rounds, ref.us_per_step_rounds)
        row.speedup_vs_raw = 1.0 / row.ratio_vs_raw
        row.loss_rel_diff = _rel_diff(row.final_loss, ref.final_loss)
        row.warmup_loss_rel_diff = _rel_diff(row.warmup_loss, ref.warmup_loss)
        # The parity check is at the end of warm-up (a few steps): over hundreds of fp32 steps,
        # rounding differences compound; eager fp32 itself then drifts as far from a float64 run
        # as the compiled step does (benchmarks/RESULTS.md, "Recurrent models and convolutions").
        if row.warmup_loss_rel_diff is not None:
            if row.warmup_loss_rel_diff > loss_rtol:
                row.status = "flagged"
                row.notes.append(f"loss after the warm-up steps differs from raw by {row.warmup_loss_rel_diff:.2e} "
                                 f"(> rtol {loss_rtol:g})")
            elif row.loss_rel_diff > loss_rtol:
                row.notes.append(f"final loss drifts from raw by {row.loss_rel_diff:.2e} (fp32 rounding compounded "
                                 f"over the run; after warm-up: {row.warmup_loss_rel_diff:.1e})")
        elif row.loss_rel_diff > loss_rtol:
            row.status = "flagged"
            row.notes.append(f"final loss differs from raw by {row.loss_rel_diff:.2e} (> rtol {loss_rtol:g})")


def _rel_diff(value: Optional[float], reference: Optional[float]) -> Optional[float]:
    if value is None or reference is None or not math.isfinite(value):
        return None if value is None or reference is None else math.inf
    return abs(value - reference) / max(abs(reference), 1e-12)


def paired_ratio(rounds: List[float], ref_rounds: List[float]) -> float:
    """Median over rounds of (this round / the reference's same round). Pairing by round cancels
    slow drifts of the machine (other processes, clock changes) that hit both alike."""
    pairs = [a / b for a, b in zip(rounds, ref_rounds) if b > 0]
    if not pairs:
        raise ValueError("no rounds to compare")
    return statistics.median(pairs)


def rank(rows: List[Row]) -> Dict[str, int]:
    """Rank (1 = fastest) of each ``ok`` contender of one workload, by ratio to raw (by µs/step
    without raw); flagged/failed rows are not ranked."""
    ok = [r for r in rows if r.status == "ok" and r.us_per_step is not None]
    # The paired ratio is the more robust order on a noisy machine; it exists when raw ran.
    paired = all(r.ratio_vs_raw is not None for r in ok)
    ok.sort(key=(lambda r: r.ratio_vs_raw) if paired else (lambda r: r.us_per_step))
    return {r.contender: i + 1 for i, r in enumerate(ok)}
