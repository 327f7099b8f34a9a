"""Mixed precision for the fused and eager steps: autocast, and a loss scale kept on the device.

``precision="bf16-mixed"``: the forward (``training_step``) runs under
``torch.autocast(dtype=torch.bfloat16)``; parameters, gradients and optimizer state stay fp32.
No loss scaling is needed.

``precision="16-mixed"``: the forward runs under fp16 autocast and the loss is multiplied by a
scale. :class:`DeviceLossScaler` is ``torch.amp.GradScaler``'s algorithm written with tensor
ops so that it can live inside the fused (and captured) step: unscale the gradients, detect
inf/nan on the device, skip the update with ``torch.where`` and grow/back off the scale, all
without reading a value on the host. The eager step uses ``torch.amp.GradScaler`` itself
(see :func:`make_grad_scaler`), which is the reference for parity.
"""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Optional

import torch
from torch import Tensor

__all__ = ["autocast_dtype", "autocast", "DeviceLossScaler", "make_grad_scaler"]

# torch.amp.GradScaler defaults
INIT_SCALE = 2.0 ** 16
GROWTH_FACTOR = 2.0
BACKOFF_FACTOR = 0.5
GROWTH_INTERVAL = 2000


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """The autocast dtype of a ``RunConfig.precision`` value (None for full precision)."""
    return {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}[precision]


def autocast(device_type: str, precision: str) -> ContextManager[Any]:
    """``torch.autocast`` for ``precision``, or a no-op context for ``"32"``.

    ``cache_enabled=False``: the autocast weight-cast cache must not outlive a captured
    region (``make_graphed_callables`` refuses it for that reason).
    """
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, cache_enabled=False)


def make_grad_scaler(device_type: str, precision: str) -> Optional["torch.amp.GradScaler"]:
    """The eager step's ``torch.amp.GradScaler`` for ``"16-mixed"``, else None."""
    if precision != "16-mixed":
        return None
    return torch.amp.GradScaler(device_type, init_scale=INIT_SCALE, growth_factor=GROWTH_FACTOR,
                                backoff_factor=BACKOFF_FACTOR, growth_interval=GROWTH_INTERVAL)


class DeviceLossScaler:
    """GradScaler state as two device tensors, updated in place inside the fused step.

    ``scale`` (0-d float32) and ``growth_tracker`` (0-d int32) are persistent graph inputs
    (the same tensors every call, so a captured graph updates them on replay). The
    semantics follow ``torch._amp_update_scale_``: on overflow the scale is multiplied by
    ``backoff_factor`` and the tracker reset; otherwise the tracker counts up and the scale
    grows by ``growth_factor`` every ``growth_interval`` clean steps.
    """

    def __init__(self, device: torch.device, init_scale: float = INIT_SCALE, growth_factor: float = GROWTH_FACTOR,
                 backoff_factor: float = BACKOFF_FACTOR, growth_interval: int = GROWTH_INTERVAL) -> None:
        self.scale = torch.full((), init_scale, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval

    def tensors(self) -> tuple[Tensor, Tensor]:
        """The persistent state, to be passed into the compiled function as arguments."""
        return self.scale, self.growth_tracker

    @staticmethod
    def unscale(grads: list[Tensor], scale: Tensor) -> tuple[list[Tensor], Tensor]:
        """Gradients divided by ``scale`` (fp32 math, as GradScaler.unscale_) and a bool found_inf."""
        inv = scale.double().reciprocal().float()
        out = [(g.float() * inv).to(g.dtype) for g in grads]
        bad = torch.stack([torch.logical_not(torch.isfinite(g).all()) for g in out]).any()
        return out, bad

    def update(self, scale: Tensor, tracker: Tensor, found_inf: Tensor) -> None:
        """In place: back off on overflow, else count and maybe grow (no host sync)."""
        grown = tracker + 1
        grow_now = grown >= self.growth_interval
        new_scale = torch.where(found_inf, scale * self.backoff_factor,
                                torch.where(grow_now, scale * self.growth_factor, scale))
        new_tracker = torch.where(found_inf | grow_now, torch.zeros_like(tracker), grown)
        scale.copy_(new_scale)
        tracker.copy_(new_tracker)

    def state_dict(self) -> dict:
        """The GradScaler-compatible state (reads the device values: call outside the hot path)."""
        return {"scale": float(self.scale), "growth_tracker": int(self.growth_tracker),  # host sync: checkpointing only
                "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval}
