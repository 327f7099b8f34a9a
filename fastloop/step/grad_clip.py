"""Traceable gradient clipping with ``torch.nn.utils`` semantics (no host sync)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["clip_grads", "clip_grads_triton", "found_inf"]


def clip_grads(grads: Sequence[Tensor], clip_val: float, algorithm: str) -> list[Tensor]:
    """Return clipped copies of ``grads``.

    ``"norm"``: ``clip_grad_norm_(max_norm=clip_val, norm_type=2)``: scale all
    gradients by ``min(1, clip_val / (total_norm + 1e-6))``, computed as a tensor
    (no ``if`` on its value, hence no synchronisation).
    ``"value"``: ``clip_grad_value_``: clamp every entry to ``[-clip_val, clip_val]``.
    """
    if algorithm == "value":
        return [g.clamp(min=-clip_val, max=clip_val) for g in grads]
    if algorithm != "norm":
        raise ValueError(f"clip_algorithm must be 'norm' or 'value', got {algorithm!r}")
    norms = [torch.linalg.vector_norm(g, 2.0) for g in grads]
    total_norm = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    coef = torch.clamp(clip_val / (total_norm + 1e-6), max=1.0)
    return [g * coef for g in grads]


def clip_grads_triton(grads: Sequence[Tensor], clip_val: Optional[float], algorithm: str) -> tuple[list[Tensor], Tensor]:
    """Clip with the fused Triton kernel (``torch.ops.fastloop.clip_grads``); also returns ``found_inf``.

    The kernel works on one flat buffer, so the gradients are concatenated (one copy) and
    split back as views. ``found_inf`` is a 0-d float32 device tensor (1.0: some entry is
    inf/nan). ``clip_val=None`` only measures. Same formulas as :func:`clip_grads`.
    """
    flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
    max_norm = clip_val if clip_val is not None and algorithm == "norm" else None
    clip_value = clip_val if clip_val is not None and algorithm == "value" else None
    _, found_inf = torch.ops.fastloop.clip_grads(flat, max_norm, clip_value)
    out, start = [], 0
    for g in grads:
        n = g.numel()
        out.append(flat[start:start + n].view(g.shape).to(g.dtype))
        start += n
    return out, found_inf


def found_inf(grads: Sequence[Tensor]) -> Tensor:
    """0-d bool device tensor: whether any gradient entry is inf or nan (no host sync)."""
    flags = torch.stack([torch.logical_not(torch.isfinite(g).all()) for g in grads])
    return flags.any()
