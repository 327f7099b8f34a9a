"""What every contender implements, and the shared pieces: run spec, batch cycling, device sync.

A contender trains its own copy of the workload's model on the same batches as every other
contender, in four phases the runner drives: ``setup`` (untimed), ``warmup(steps)`` (returns the
first step's seconds, compile/capture included), ``run(steps)`` (returns the seconds of ``steps``
steady-state steps; called once per round) and ``finish()`` (final loss, mode used).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, List, Optional

import torch
from torch import nn

from fastloop.bench.workloads import Batch, Workload


@dataclass
class RunSpec:
    """Everything a contender needs; identical for all contenders of one workload."""

    workload: Workload
    device: torch.device
    model: nn.Module  # initial weights: contenders train ``copy.deepcopy(model)``
    batches: List[Batch]  # a pool of pre-generated batches, cycled: step i uses batches[i % len]
    total_steps: int  # warm-up + all timed steps; frameworks plan their fit with it


@dataclass
class Outcome:
    final_loss: Optional[float]
    mode_used: str
    notes: List[str] = field(default_factory=list)


class Contender:
    """Base class. ``name`` is the table label; ``mode_requested`` what the user asked for."""

    name: str = "contender"
    mode_requested: str = "eager"

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        """Why this contender cannot run here (it is then reported as skipped), else None."""
        return None

    def setup(self, spec: RunSpec) -> None:
        raise NotImplementedError

    def warmup(self, steps: int) -> float:
        raise NotImplementedError

    def run(self, steps: int) -> float:
        raise NotImplementedError

    def finish(self) -> Outcome:
        raise NotImplementedError

    def current_loss(self) -> Optional[float]:
        """The loss of the last step run so far (None if unknown); read after warm-up, untimed."""
        return None

    def close(self) -> None:
        """Release resources after a failure or at the end (idempotent)."""


class BatchCycle:
    """An iterable over ``total`` batches cycling through ``pool``, with ``len()``, for the
    frameworks' fit loops (a plain list would be read as several loaders)."""

    def __init__(self, pool: List[Batch], total: int) -> None:
        self.pool = pool
        self.total = total

    def __len__(self) -> int:
        return self.total

    def __iter__(self) -> Iterator[Batch]:
        pool, n = self.pool, len(self.pool)
        for i in range(self.total):
            yield pool[i % n]


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU). Callers mark each call site as a sync."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
