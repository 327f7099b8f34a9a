"""The ``data-loading`` workload: delegates to ``fastloop.bench.data_throughput`` when present."""
from __future__ import annotations

import importlib
import json
from typing import Any, Dict


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        if isinstance(value, dict):
            return {str(k): _jsonable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [_jsonable(v) for v in value]
        return repr(value)


def loader_throughput() -> Dict[str, Any]:
    """``{"status": "ok", "result": ...}`` from ``measure_loader_throughput()``, or
    ``{"status": "unavailable", "reason": ...}`` when the module is not installed."""
    try:
        module = importlib.import_module("fastloop.bench.data_throughput")
    except ImportError as exc:
        return {"status": "unavailable", "reason": f"fastloop.bench.data_throughput is not installed ({exc})"}
    measure = getattr(module, "measure_loader_throughput", None)
    if measure is None:
        return {"status": "unavailable", "reason": "data_throughput has no measure_loader_throughput()"}
    return {"status": "ok", "result": _jsonable(measure())}
