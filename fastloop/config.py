"""Frozen run configuration, grouped by concern and validated once at construction."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Union

Number = Union[int, float]
MODES = ("auto", "eager", "compiled", "cudagraph")
PRECISIONS = ("32", "bf16-mixed", "16-mixed")


def _check_limit(name: str, value: Number) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int or a float in [0, 1], got {value!r}")
    if isinstance(value, float) and value > 1.0:
        raise ValueError(f"{name}={value} is a fraction above 1.0; pass an int to count batches")


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
        if self.max_steps < -1:
            raise ValueError(f"max_steps must be -1 (no limit) or >= 0, got {self.max_steps}")
        if self.max_epochs is not None and self.max_epochs < -1:
            raise ValueError(f"max_epochs must be None, -1 or >= 0, got {self.max_epochs}")


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

    def __post_init__(self) -> None:
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
