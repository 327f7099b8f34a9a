"""Fused gradient L2 norm, non-finite check and clipping over a flat grad buffer.

Three launches, no host synchronisation:

1. ``_partials_kernel``: each program writes the sum of squares of its block (fp32) and
   whether the block holds a non-finite value.
2. ``_finalize_kernel``: one program reduces the partials in a fixed order (deterministic,
   unlike atomics), writes ``norm = sqrt(sum)``, ``found_inf`` and the clip coefficient
   ``min(1, max_norm / (norm + 1e-6))`` (``torch.nn.utils.clip_grad_norm_``'s formula).
3. ``_scale_clamp_kernel`` (only when clipping): ``g *= coef`` and/or
   ``g = clamp(g, -clip_value, clip_value)`` (``clip_grad_value_``), in place.

Non-finite gradients behave as in torch: the norm becomes inf/nan, the coefficient 0/nan,
and scaling turns the gradients into 0/nan. Callers that skip the update on overflow read
``found_inf`` (on the device) instead.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

DEFAULT_BLOCK = 1024
_FINAL_BLOCK = 1024  # partials reduced per loop iteration in the finalize kernel


def _identity(kernel: Callable) -> Callable:
    return kernel


Wrap = Callable[[Callable], Callable]


@triton.jit
def _partials_kernel(grad_ptr, partial_ptr, n_elements, n_blocks, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    g = tl.load(grad_ptr + offs, mask=offs < n_elements, other=0.0).to(tl.float32)
    tl.store(partial_ptr + pid, tl.sum(g * g, axis=0))
    # |g| < inf is false for inf and nan; squares could overflow for finite g, so the
    # check cannot be read off the sum.
    bad = tl.max(tl.where(tl.abs(g) < float("inf"), 0.0, 1.0), axis=0)
    tl.store(partial_ptr + n_blocks + pid, bad)


@triton.jit
def _finalize_kernel(
    partial_ptr, n_blocks, norm_ptr, found_inf_ptr, coef_ptr, max_norm,
    BLOCK: tl.constexpr,
):
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    bad = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n_blocks, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n_blocks
        acc += tl.load(partial_ptr + offs, mask=mask, other=0.0)
        bad = tl.maximum(bad, tl.load(partial_ptr + n_blocks + offs, mask=mask, other=0.0))
    norm = tl.sqrt(tl.sum(acc, axis=0))
    tl.store(norm_ptr, norm)
    tl.store(found_inf_ptr, tl.max(bad, axis=0))
    coef = max_norm / (norm + 1e-6)
    # written so that a nan coefficient stays nan, as torch.clamp(coef, max=1) does
    tl.store(coef_ptr, tl.where(coef > 1.0, 1.0, coef))


@triton.jit
def _scale_clamp_kernel(
    grad_ptr, coef_ptr, clip_value, n_elements,
    SCALE: tl.constexpr, CLAMP: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
    if SCALE:
        g = g * tl.load(coef_ptr)
    if CLAMP:
        # nested where keeps nan as nan, like torch.clamp
        g = tl.where(g < -clip_value, -clip_value, tl.where(g > clip_value, clip_value, g))
    tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


def clip_grads_(
    grad: Tensor,
    *,
    max_norm: Optional[float] = None,
    clip_value: Optional[float] = None,
    block: int = DEFAULT_BLOCK,
    wrap: Wrap = _identity,
) -> tuple[Tensor, Tensor]:
    """Total L2 norm of ``grad``, a non-finite flag, and optional in-place clipping.

    ``grad`` is a flat contiguous device buffer (e.g. ``FlatArena.grad``). Returns
    ``(norm, found_inf)``: 0-d fp32 device tensors; ``norm`` is the norm *before*
    clipping (as ``clip_grad_norm_`` returns it) and ``found_inf`` is 1.0 when any
    element is inf or nan, else 0.0.

    ``max_norm``: scale ``grad`` by ``min(1, max_norm / (norm + 1e-6))``.
    ``clip_value``: then clamp ``grad`` to ``[-clip_value, clip_value]``.
    Both are plain floats passed as kernel scalars (a new value does not recompile).
    """
    if grad.dim() != 1 or not grad.is_contiguous():
        raise ValueError(f"grad must be a contiguous 1-D tensor, got shape {tuple(grad.shape)}")
    if clip_value is not None and clip_value < 0:
        raise ValueError(f"clip_value must be >= 0, got {clip_value}")
    n = grad.numel()
    n_blocks = max(triton.cdiv(n, block), 1)
    # partial sums in [0, n_blocks), non-finite flags in [n_blocks, 2 * n_blocks)
    partials = torch.empty(2 * n_blocks, dtype=torch.float32, device=grad.device)
    # separate tensors, not views of one: custom-op outputs must not alias each other
    norm, found_inf, coef = (
        torch.empty((), dtype=torch.float32, device=grad.device) for _ in range(3)
    )

    wrap(_partials_kernel)[(n_blocks,)](grad, partials, n, n_blocks, BLOCK=block)
    wrap(_finalize_kernel)[(1,)](
        partials, n_blocks, norm, found_inf, coef,
        float(max_norm) if max_norm is not None else 1.0,
        BLOCK=_FINAL_BLOCK,
    )
    scale, clamp = max_norm is not None, clip_value is not None
    if (scale or clamp) and n > 0:
        wrap(_scale_clamp_kernel)[(triton.cdiv(n, block),)](
            grad, coef, float(clip_value) if clamp else 0.0, n,
            SCALE=scale, CLAMP=clamp, BLOCK=block,
        )
    return norm, found_inf


def flat_grad_norm(grad: Tensor, *, block: int = DEFAULT_BLOCK) -> tuple[Tensor, Tensor]:
    """``(norm, found_inf)`` of a flat grad buffer without modifying it (see :func:`clip_grads_`)."""
    return clip_grads_(grad, block=block)
