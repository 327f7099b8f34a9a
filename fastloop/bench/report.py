"""Render results: the terminal table and the optional PNG bar chart."""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Dict, List, Optional, Sequence

from fastloop.bench.runner import Row, rank

COLUMNS = ("workload", "contender", "mode used", "µs/step", "spread", "steps/s", "ratio", "speedup", "first step",
           "final loss", "Δloss", "peak mem", "rank", "status")


def _num(value: Optional[float], fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _bytes(n: Optional[int]) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**20:.1f} MiB"


def _spread(rounds: Sequence[float]) -> str:
    """Spread of the per-round µs/step around the median, as ±half the min-max range in %."""
    if len(rounds) < 2:
        return "-"
    mid = sorted(rounds)[len(rounds) // 2]
    return f"±{(max(rounds) - min(rounds)) / 2 / mid * 100:.1f}%"


def _mode(row: Row) -> str:
    """The mode used; a fastloop fallback shows what was asked for."""
    if row.mode_used is None:
        return "-"
    if row.contender.startswith("fastloop-") and row.mode_used != row.mode_requested:
        return f"{row.mode_used} (asked {row.mode_requested})"
    return row.mode_used


def _status(row: Row) -> str:
    if row.status == "ok":
        return "ok"
    if row.status == "flagged":
        return "FLAGGED: " + (row.notes[-1] if row.notes else "loss mismatch")
    text = f"{row.status.upper()}: {row.error or ''}"
    return text if len(text) <= 90 else text[:87] + "..."


def table(rows: List[Row]) -> str:
    """A fixed-width table, one line per row, workloads in their order."""
    ranks: Dict[str, Dict[str, int]] = {}
    for row in rows:
        ranks.setdefault(row.workload, {})
    for workload in ranks:
        ranks[workload] = rank([r for r in rows if r.workload == workload])
    cells = [COLUMNS]
    for r in rows:
        cells.append((
            r.workload, r.contender, _mode(r), _num(r.us_per_step, ".1f"), _spread(r.us_per_step_rounds),
            _num(r.steps_per_s, ".0f"), _num(r.ratio_vs_raw, ".3f"), _num(r.speedup_vs_raw, ".2f"), _num(r.first_step_s, ".3f") + ("s" if r.first_step_s else ""),
            _num(r.final_loss, ".6f"), _num(r.loss_rel_diff, ".1e"),
            _bytes(r.peak_mem_bytes) if r.status in ("ok", "flagged") else "-",
            str(ranks[r.workload].get(r.contender, "-")), _status(r),
        ))
    widths = [max(len(str(line[i])) for line in cells) for i in range(len(COLUMNS) - 1)]
    lines = []
    for j, line in enumerate(cells):
        text = "  ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
        lines.append(f"{text}  {line[-1]}")
        if j == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def legend() -> str:
    return ("µs/step: median over rounds; spread: ±half the min-max range of the rounds; ratio: median of per-round "
            "µs/step ÷ raw's in the same round (1.050 = 5 % slower), speedup = 1/ratio; first step: seconds incl. set-up/compile/capture (excluded from µs/step); "
            "Δloss: |final loss - raw's| / |raw's| (the parity flag uses the loss after warm-up); flagged and failed rows are not ranked.")


def matplotlib_available() -> bool:
    """Whether ``plot`` can draw (matplotlib is importable), without importing it."""
    return importlib.util.find_spec("matplotlib") is not None


def plot(rows: List[Row], path: str) -> Optional[str]:
    """Write a bar chart of µs/step per workload and contender (atomically: a temporary file
    renamed over ``path``); returns an error message when matplotlib is missing (nothing is
    written then)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "--plot needs matplotlib (pip install matplotlib); no plot written"
    measured = [r for r in rows if r.us_per_step is not None]
    workloads = list(dict.fromkeys(r.workload for r in measured))
    fig, axes = plt.subplots(1, max(1, len(workloads)), figsize=(4.5 * max(1, len(workloads)), 3.8), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        sub = [r for r in measured if r.workload == workload]
        colors = ["tab:red" if r.status == "flagged" else "tab:gray" if r.contender == "raw" else "tab:blue"
                  for r in sub]
        ax.bar([r.contender for r in sub], [r.us_per_step for r in sub], color=colors)
        ax.set_title(workload)
        ax.set_ylabel("µs/step (median, lower is better)")
        ax.tick_params(axis="x", rotation=35, labelsize=8)
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return None


def extras_lines(extras: Dict[str, Any]) -> List[str]:
    return [f"{name}: {value}" for name, value in extras.items()]
