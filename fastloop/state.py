"""Which entry point is running and which stage of it: set with context managers only."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

ENTRY_POINTS = ("fit", "validate", "test", "predict")
STAGES = ("train", "sanity_check", "validate", "test", "predict")


class TrainerState:
    def __init__(self) -> None:
        self.fn: Optional[str] = None
        self.stage: Optional[str] = None

    @contextlib.contextmanager
    def running(self, fn: str) -> Iterator[None]:
        assert fn in ENTRY_POINTS, fn
        previous, self.fn = self.fn, fn
        try:
            yield
        finally:
            self.fn = previous
            self.stage = None

    @contextlib.contextmanager
    def stage_as(self, stage: str) -> Iterator[None]:
        assert stage in STAGES, stage
        previous, self.stage = self.stage, stage
        try:
            yield
        finally:
            self.stage = previous

    @property
    def fitting(self) -> bool:
        return self.fn == "fit"

    @property
    def training(self) -> bool:
        return self.stage == "train"

    @property
    def sanity_checking(self) -> bool:
        return self.stage == "sanity_check"

    @property
    def validating(self) -> bool:
        return self.stage in ("validate", "sanity_check")

    @property
    def testing(self) -> bool:
        return self.stage == "test"

    @property
    def predicting(self) -> bool:
        return self.stage == "predict"

    @property
    def eval_stage(self) -> str:
        """Hook-name stem of the running evaluation: ``validation`` or ``test``."""
        return "test" if self.stage == "test" else "validation"
