"""``StepLoop``: what a training step needs from the optimizer loop that runs it.

The steps are built for ``fastloop.loops.OptimizerLoop`` (and its subclasses) but only use this
surface, so the step package depends on the loops through this Protocol, never by import.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Protocol, Tuple


class StepLoop(Protocol):
    trainer: Any
    optim_progress: Any
    train_step: Optional[Callable[..., Any]]
    step_report: Any

    def make_step_fn(self, batch: Any, batch_idx: int, optimizer_idx: int) -> Callable[[], Any]: ...

    def backward_kwargs(self, optimizer_idx: int) -> Dict[str, Any]: ...

    @property
    def toggle_parameters(self) -> bool: ...

    def overridden_extension_points(self) -> Tuple[str, ...]:
        """The ``OptimizerLoop`` extension points this loop's class overrides (its own step)."""
        ...
