"""Traceable gradient clipping with ``torch.nn.utils`` semantics (no host sync)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["clip_grads"]


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
