"""Frozen run configuration, grouped by concern and validated once at construction."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Union

Number = Union[int, float]
MODES = ("auto", "eager", "compiled", "cudagraph")
PRECISIONS = ("32", "bf16-mixed", "16-mixed")
# What a non-finite loss or gradient does to its optimizer step (see fastloop/step/nonfinite.py).
NONFINITE_POLICIES = ("raise", "skip", "ignore")


def _check_limit(name: str, value: Number) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int or a float in [0, 1], got {value!r}")
    if isinstance(value, float) and value > 1.0:
        raise ValueError(f"{name}={value} is a fraction above 1.0; pass an int to count batches")


def _check_count(name: str, value: Any, minimum: int, optional: bool = True) -> None:
    """An int (not a bool) >= ``minimum``, or None where ``optional``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"None or an int >= {minimum}" if optional else f"an int >= {minimum}"
        extra = " (-1: no limit)" if minimum == -1 else ""
        raise ValueError(f"{name} must be {allowed}{extra}, got {value!r}")


@dataclass(frozen=True)
class Limits:
    """How long to train and how many batches each stage may use."""

    max_epochs: Optional[int] = None
    min_epochs: Optional[int] = None
    max_steps: int = -1
    min_steps: Optional[int] = None
    limit_train_batches: Number = 1.0
    limit_val_batches: Number = 1.0
    limit_test_batches: Number = 1.0
    limit_predict_batches: Number = 1.0

    def __post_init__(self) -> None:
        for name in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches"):
            _check_limit(name, getattr(self, name))
        _check_count("max_steps", self.max_steps, minimum=-1, optional=False)
        _check_count("max_epochs", self.max_epochs, minimum=-1)
        _check_count("min_epochs", self.min_epochs, minimum=0)
        _check_count("min_steps", self.min_steps, minimum=0)


@dataclass(frozen=True)
class ValidationSchedule:
    """When validation runs during fit."""

    val_check_interval: Number = 1.0
    check_val_every_n_epoch: Optional[int] = 1
    num_sanity_val_steps: int = 2

    def __post_init__(self) -> None:
        v = self.val_check_interval
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ValueError(f"val_check_interval must be a positive int or a float in (0, 1], got {v!r}")
        if isinstance(v, float) and v > 1.0:
            raise ValueError(f"val_check_interval={v} is a fraction above 1.0; pass an int to count batches")
        n = self.check_val_every_n_epoch
        if n is not None and (not isinstance(n, int) or n < 1):
            raise ValueError(f"check_val_every_n_epoch must be None or a positive int, got {n!r}")
        if isinstance(self.num_sanity_val_steps, bool) or not isinstance(self.num_sanity_val_steps, int):
            raise ValueError(f"num_sanity_val_steps must be an int (-1: all), got {self.num_sanity_val_steps!r}")
        if self.num_sanity_val_steps < -1:
            raise ValueError(f"num_sanity_val_steps must be -1 (all) or >= 0, got {self.num_sanity_val_steps}")


@dataclass(frozen=True)
class OptimizationConfig:
    """Gradient accumulation and clipping applied by automatic optimization."""

    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = None
    gradient_clip_algorithm: str = "norm"

    def __post_init__(self) -> None:
        if not isinstance(self.accumulate_grad_batches, int) or self.accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be a positive int, got {self.accumulate_grad_batches!r}")
        if self.gradient_clip_algorithm not in ("norm", "value"):
            raise ValueError(f"gradient_clip_algorithm must be 'norm' or 'value', got {self.gradient_clip_algorithm!r}")
        clip = self.gradient_clip_val
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))):
            raise ValueError(f"gradient_clip_val must be None or a number >= 0, got {clip!r}")
        if self.gradient_clip_val is not None and self.gradient_clip_val < 0:
            raise ValueError(f"gradient_clip_val must be >= 0, got {self.gradient_clip_val}")


@dataclass(frozen=True)
class CompileConfig:
    """Options of the compiled and CUDA-graph steps."""

    max_graphs_per_step: int = 4  # distinct input shapes captured before falling back (cudagraph)
    cudagraph_warmup_steps: int = 3  # real steps per captured graph before capture (at least 1 runs)
    # Fused Triton kernels for the optimizer update and gradient clipping inside the fused step
    # (when triton can run: CUDA, or TRITON_INTERPRET=1). Off: the pure-torch update (default).
    triton_kernels: bool = False
    # Inductor options applied while compiling, e.g. {"fallback_random": True} for dropout
    # masks identical to eager (slower; used by the parity tests).
    inductor_config: Optional[Dict[str, Any]] = None
    # Call a compiled training graph directly while its inputs match (see step/direct_call.py),
    # instead of through torch.compile's guards on every step. False: every call is guarded.
    direct_call: bool = True
    # The fused step checks loss and gradients on the device every step and never applies a
    # non-finite update; under Trainer(nonfinite="raise") the host reads that check once every
    # this many optimizer steps (and at the last batch of an epoch, at max_steps and before a
    # checkpoint), so the error can come up to this many steps late. 1: read every step (a
    # host-device sync per step on a GPU).
    nonfinite_check_interval: int = 20
    # A smaller last batch of an epoch (or of an evaluation dataloader), of a loader with a known
    # length, runs through the eager step instead of compiling a second graph for one call per
    # epoch (see step/last_batch.py). Not under DDP. False: compile it as any other shape.
    eager_last_batch: bool = True

    def __post_init__(self) -> None:
        n = self.nonfinite_check_interval
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"CompileConfig(nonfinite_check_interval={n!r}) must be an int >= 1")


@dataclass(frozen=True)
class RunConfig:
    limits: Limits = field(default_factory=Limits)
    validation: ValidationSchedule = field(default_factory=ValidationSchedule)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    mode: str = "auto"
    accelerator: str = "auto"
    precision: str = "32"
    default_root_dir: Optional[str] = None
    enable_progress_bar: bool = True
    nonfinite: str = "raise"

    def __post_init__(self) -> None:
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {self.nonfinite!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


def resolve_mode(requested: str) -> str:
    """``FASTLOOP_MODE`` overrides the argument, so any script can be debugged eagerly."""
    override = os.environ.get("FASTLOOP_MODE")
    mode = override.strip().lower() if override else requested
    if mode not in MODES:
        source = "FASTLOOP_MODE" if override else "mode"
        raise ValueError(f"{source} must be one of {MODES}, got {mode!r}")
    return mode
