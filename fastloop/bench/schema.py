"""The JSON document ``python -m fastloop.bench --json PATH`` writes, and a hand-written check.

Schema (version ``SCHEMA_VERSION``)::

    {
      "schema_version": 1,
      "env": {                        # where it ran
        "date": str (ISO 8601, UTC), "python": str, "platform": str, "torch": str,
        "fastloop": str, "git_sha": str | null, "device": "cpu" | "cuda",
        "device_name": str, "cpu_count": int | null, "torch_threads": int,
        "cuda": str | null, "load_avg": [float] | null (1/5/15 min at the end), "argv": [str]
      },
      "config": {
        "workloads": [str], "contenders": [str], "steps": int (steps per timed round),
        "rounds": int (requested; fewer may run, see notes), "time_budget_s": float,
        "warmup_steps": int, "seed": int, "loss_rtol": float
      },
      "results": [                    # one row per (workload, contender)
        {
          "workload": str, "contender": str,
          "status": "ok" | "flagged" | "failed" | "skipped",
          "mode_requested": str, "mode_used": str | null,
          "us_per_step": float | null,          # median over rounds of (round seconds / steps)
          "us_per_step_rounds": [float],        # each round's mean µs/step, in round order
          "steps_per_s": float | null, "samples_per_s": float | null,
          "ratio_vs_raw": float | null,         # median over rounds of this round's µs/step / raw's
                                                # in the same round (1.05 = 5 % slower)
          "speedup_vs_raw": float | null,       # raw's us_per_step / this one's
          "first_step_s": float | null,         # first step incl. set-up, compile and capture
          "final_loss": float | null,           # loss of the last training step
          "loss_rel_diff": float | null,        # |loss - raw loss| / |raw loss|
          "warmup_loss": float | null,          # loss of the last warm-up step
          "warmup_loss_rel_diff": float | null, # the same difference, at the end of warm-up
          "peak_mem_bytes": int | null,         # CUDA: peak allocated during rounds above the
                                                # round-start level; null on CPU
          "error": str | null,                  # failed: "Type: message"; skipped: reason
          "notes": [str]
        }
      ],
      "extras": {str: any}            # e.g. "data-loading": what measure_loader_throughput returned
    }

``status`` is ``flagged`` when ``warmup_loss_rel_diff`` (``loss_rel_diff`` where the warm-up loss
is unknown) exceeds ``loss_rtol``, or the loss is not finite: such a row is reported but not
ranked against the others. A final-loss difference past ``loss_rtol`` alone is a note (fp32
rounding compounds over hundreds of steps).
"""
from __future__ import annotations

from typing import Any, Dict, List

SCHEMA_VERSION = 1
STATUSES = ("ok", "flagged", "failed", "skipped")

_ENV_KEYS = {"date": str, "python": str, "platform": str, "torch": str, "fastloop": str, "device": str,
             "device_name": str, "torch_threads": int, "argv": list}
_CONFIG_KEYS = {"workloads": list, "contenders": list, "steps": int, "rounds": int, "warmup_steps": int,
                "time_budget_s": float, "seed": int, "loss_rtol": float}
_ROW_REQUIRED = {"workload": str, "contender": str, "status": str, "mode_requested": str,
                 "us_per_step_rounds": list, "notes": list}
_ROW_OPTIONAL = {"mode_used": str, "us_per_step": float, "steps_per_s": float, "samples_per_s": float,
                 "ratio_vs_raw": float, "speedup_vs_raw": float, "first_step_s": float, "final_loss": float,
                 "loss_rel_diff": float, "warmup_loss": float, "warmup_loss_rel_diff": float,
                 "peak_mem_bytes": int, "error": str}


def _check(obj: Dict[str, Any], keys: Dict[str, type], where: str, nullable: bool, errors: List[str]) -> None:
    for key, kind in keys.items():
        if key not in obj:
            errors.append(f"{where}: missing {key!r}")
            continue
        value = obj[key]
        if value is None and nullable:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else \
            isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not ok:
            errors.append(f"{where}: {key!r} should be {kind.__name__}, got {type(value).__name__}")


def validate(doc: Any) -> List[str]:
    """Problems with a results document (an empty list means it matches the schema)."""
    errors: List[str] = []
    if not isinstance(doc, dict):
        return [f"document should be an object, got {type(doc).__name__}"]
    if doc.get("schema_version") != SCHEMA_VERSION:
        errors.append(f"schema_version should be {SCHEMA_VERSION}, got {doc.get('schema_version')!r}")
    for section, keys in (("env", _ENV_KEYS), ("config", _CONFIG_KEYS)):
        if not isinstance(doc.get(section), dict):
            errors.append(f"{section} should be an object")
        else:
            _check(doc[section], keys, section, nullable=False, errors=errors)
    if not isinstance(doc.get("extras", {}), dict):
        errors.append("extras should be an object")
    rows = doc.get("results")
    if not isinstance(rows, list):
        return errors + ["results should be a list"]
    for i, row in enumerate(rows):
        where = f"results[{i}]"
        if not isinstance(row, dict):
            errors.append(f"{where} should be an object")
            continue
        _check(row, _ROW_REQUIRED, where, nullable=False, errors=errors)
        _check(row, _ROW_OPTIONAL, where, nullable=True, errors=errors)
        if row.get("status") not in STATUSES:
            errors.append(f"{where}: status should be one of {STATUSES}, got {row.get('status')!r}")
        if row.get("status") in ("ok", "flagged") and row.get("us_per_step") is None:
            errors.append(f"{where}: a measured row needs us_per_step")
    return errors
