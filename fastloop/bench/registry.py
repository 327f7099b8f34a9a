"""Contender names -> factories. Tests may add entries (for example a contender that raises)."""
from __future__ import annotations

from typing import Callable, Dict, List

import torch

from fastloop.bench.contender import Contender
from fastloop.bench.fastloop_contender import FastloopContender
from fastloop.bench.lightning_contender import LightningContender
from fastloop.bench.raw import RawLoop, TorchCompileReduceOverhead

REFERENCE = "raw"
CONTENDERS: Dict[str, Callable[[], Contender]] = {
    "raw": RawLoop,
    "fastloop-eager": lambda: FastloopContender("eager"),
    "fastloop-compiled": lambda: FastloopContender("compiled"),
    "fastloop-cudagraph": lambda: FastloopContender("cudagraph"),
    # The cost of Lightning's default callbacks and logger: both log the loss every step.
    "fastloop-compiled+log": lambda: FastloopContender("compiled", log_loss=True),
    "fastloop-compiled+defaults": lambda: FastloopContender("compiled", log_loss=True, lightning_defaults=True),
    "torch-compile-ro": TorchCompileReduceOverhead,
    "lightning": LightningContender,
}


def default_contenders(device: torch.device) -> List[str]:
    """raw, fastloop eager and compiled, Lightning (reported as skipped when not installed);
    on CUDA also the CUDA-graph contenders."""
    names = ["raw", "fastloop-eager", "fastloop-compiled"]
    if device.type == "cuda":
        names += ["fastloop-cudagraph", "torch-compile-ro"]
    return names + ["lightning"]


def make_contender(name: str) -> Contender:
    try:
        factory = CONTENDERS[name]
    except KeyError:
        raise ValueError(f"unknown contender {name!r}; choose from {', '.join(CONTENDERS)}") from None
    return factory()
