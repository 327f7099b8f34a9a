"""Progress counters for loops.

Every unit of work (an epoch, a batch, an optimizer step) moves through four stages, each
counted: ``ready`` (about to start), ``started`` (its start hooks ran), ``processed`` (its main
work is done) and ``completed`` (its end hooks ran). Each counter is kept twice: ``total`` over
the life of the loop and ``current`` within the present run (epoch). A unit counts as done once
``processed`` moved, so a run resumed from a checkpoint redoes only work that was not finished.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Type


class BaseProgress:
    """State-dict support shared by the progress dataclasses."""

    def state_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        for f in fields(self):
            if f.name not in state_dict:
                continue
            value = getattr(self, f.name)
            if isinstance(value, BaseProgress):
                value.load_state_dict(state_dict[f.name])
            else:
                setattr(self, f.name, state_dict[f.name])

    @classmethod
    def from_state_dict(cls, state_dict: Dict[str, Any]) -> "BaseProgress":
        obj = cls()
        obj.load_state_dict(state_dict)
        return obj


@dataclass
class ReadyCompletedTracker(BaseProgress):
    ready: int = 0
    completed: int = 0

    def reset(self) -> None:
        self.ready = self.completed = 0

    def reset_on_restart(self) -> None:
        """Roll back to the last completed unit so that an interrupted one is redone."""
        self.ready = self.completed


@dataclass
class StartedTracker(ReadyCompletedTracker):
    started: int = 0

    def reset(self) -> None:
        super().reset()
        self.started = 0

    def reset_on_restart(self) -> None:
        super().reset_on_restart()
        self.started = self.completed


@dataclass
class ProcessedTracker(StartedTracker):
    processed: int = 0

    def reset(self) -> None:
        super().reset()
        self.processed = 0

    def reset_on_restart(self) -> None:
        super().reset_on_restart()
        self.processed = self.completed

    def finish_processed(self) -> None:
        """Count a processed unit as completed: its work is done, only end hooks were pending."""
        self.completed = max(self.completed, self.processed)


@dataclass
class Progress(BaseProgress):
    """A pair of trackers: ``total`` over the loop's life, ``current`` within one run."""

    total: ReadyCompletedTracker = field(default_factory=ProcessedTracker)
    current: ReadyCompletedTracker = field(default_factory=ProcessedTracker)

    def __post_init__(self) -> None:
        if type(self.total) is not type(self.current):
            raise ValueError("`total` and `current` must be trackers of the same class")

    # Direct attribute increments: these run several times per batch.
    def increment_ready(self) -> None:
        self.total.ready += 1
        self.current.ready += 1

    def increment_started(self) -> None:
        try:
            self.total.started += 1  # type: ignore[attr-defined]
            self.current.started += 1  # type: ignore[attr-defined]
        except AttributeError:
            raise TypeError(f"{type(self.total).__name__} has no `started` counter") from None

    def increment_ready_started(self) -> None:
        """``increment_ready`` then ``increment_started``, where no hook runs between them."""
        try:
            total, current = self.total, self.current
            total.ready += 1
            current.ready += 1
            total.started += 1  # type: ignore[attr-defined]
            current.started += 1  # type: ignore[attr-defined]
        except AttributeError:
            raise TypeError(f"{type(self.total).__name__} has no `started` counter") from None

    def increment_processed(self) -> None:
        try:
            self.total.processed += 1  # type: ignore[attr-defined]
            self.current.processed += 1  # type: ignore[attr-defined]
        except AttributeError:
            raise TypeError(f"{type(self.total).__name__} has no `processed` counter") from None

    def increment_completed(self) -> None:
        self.total.completed += 1
        self.current.completed += 1

    @classmethod
    def from_defaults(cls, tracker_cls: Type[ReadyCompletedTracker], **kwargs: int) -> "Progress":
        return cls(total=tracker_cls(**kwargs), current=tracker_cls(**kwargs))

    def reset(self) -> None:
        self.total.reset()
        self.current.reset()

    def reset_on_run(self) -> None:
        self.current.reset()

    def reset_on_restart(self) -> None:
        self.current.reset_on_restart()

    def finish_processed(self) -> None:
        for tracker in (self.total, self.current):
            if isinstance(tracker, ProcessedTracker):
                tracker.finish_processed()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.total.load_state_dict(state_dict["total"])
        self.current.load_state_dict(state_dict["current"])


@dataclass
class DataLoaderProgress(Progress):
    total: ReadyCompletedTracker = field(default_factory=ReadyCompletedTracker)
    current: ReadyCompletedTracker = field(default_factory=ReadyCompletedTracker)


@dataclass
class BatchProgress(Progress):
    """Batch counters plus whether the last fetched batch was the last of its epoch."""

    is_last_batch: bool = False

    def reset(self) -> None:
        super().reset()
        self.is_last_batch = False

    def reset_on_run(self) -> None:
        super().reset_on_run()
        self.is_last_batch = False

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.is_last_batch = state_dict.get("is_last_batch", False)


@dataclass
class SchedulerProgress(Progress):
    total: ReadyCompletedTracker = field(default_factory=ReadyCompletedTracker)
    current: ReadyCompletedTracker = field(default_factory=ReadyCompletedTracker)


@dataclass
class OptimizerProgress(BaseProgress):
    """Counts optimizer ``step`` and ``zero_grad`` calls."""

    step: Progress = field(default_factory=lambda: Progress.from_defaults(ReadyCompletedTracker))
    zero_grad: Progress = field(default_factory=lambda: Progress.from_defaults(StartedTracker))

    def reset(self) -> None:
        self.step.reset()
        self.zero_grad.reset()

    def reset_on_run(self) -> None:
        self.step.reset_on_run()
        self.zero_grad.reset_on_run()

    def reset_on_restart(self) -> None:
        self.step.reset_on_restart()
        self.zero_grad.reset_on_restart()


@dataclass
class OptimizationProgress(BaseProgress):
    """Optimizer counters plus the position among the optimizers active for this batch."""

    optimizer: OptimizerProgress = field(default_factory=OptimizerProgress)
    optimizer_position: int = 0

    @property
    def optimizer_steps(self) -> int:
        return self.optimizer.step.total.completed

    def reset(self) -> None:
        self.optimizer.reset()
        self.optimizer_position = 0

    def reset_on_run(self) -> None:
        self.optimizer.reset_on_run()
        self.optimizer_position = 0

    def reset_on_restart(self) -> None:
        self.optimizer.reset_on_restart()
