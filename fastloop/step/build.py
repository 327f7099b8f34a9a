"""The one place that turns a mode into step functions. Loops never branch on the mode.

``build_train_step(loop)`` returns the automatic-optimization step for an ``OptimizerLoop``;
``build_eval_step(loop)`` the forward step for evaluation and prediction loops. Each records a
``StepReport`` on the loop: the mode requested, the mode used and, for a fallback, why.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List

from fastloop.step.eager import EagerEvalStep, EagerTrainStep

MODES = ("auto", "eager", "compiled", "cudagraph")


@dataclass
class StepReport:
    requested: str
    used: str
    reasons: List[str] = field(default_factory=list)

    def describe(self) -> str:
        text = f"{self.used}"
        if self.used != self.requested:
            text += f" (requested {self.requested})"
        for reason in self.reasons:
            text += f"\n    fallback: {reason}"
        return text


def build_train_step(loop: Any) -> Callable[..., Any]:
    trainer = loop.trainer
    requested = trainer.mode
    reasons: List[str] = []
    if requested != "eager":
        reasons.append(f"{requested} mode is not available yet in this build")
    loop.step_report = StepReport(requested, "eager", reasons)
    return EagerTrainStep(loop)


def build_eval_step(loop: Any) -> Callable[..., Any]:
    trainer = loop.trainer
    requested = trainer.mode
    reasons: List[str] = []
    if requested != "eager":
        reasons.append(f"{requested} mode is not available yet in this build")
    loop.step_report = StepReport(requested, "eager", reasons)
    return EagerEvalStep(loop)
