"""Fused SGD and Adam/AdamW updates over flat buffers: one Triton launch per update.

All tensors of one update are flat, contiguous and of equal length (see
:class:`fastloop.kernels.FlatArena`). Hyperparameters and the step count are 0-d *device*
tensors read inside the kernel, so changing the learning rate never recompiles and the
launch can be captured in a CUDA graph. Flags (nesterov, amsgrad, ...) are ``tl.constexpr``:
each combination compiles once.

The step count is a 0-d float tensor holding the number of updates done so far; each
launcher increments it in place on the device (``step_t += 1``, one tiny op next to the
kernel, so no kernel reads a value another program is writing) *before* the kernel runs,
as ``torch.optim`` does. Math is done in fp32 whatever the storage dtype.

Semantics match ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` (single-tensor path) except
that every element is updated: a parameter without a gradient must get a zero gradient in
the flat grad buffer, whereas ``torch.optim`` would skip it.
"""
from __future__ import annotations

from typing import Callable, Optional

import triton
import triton.language as tl
from torch import Tensor

DEFAULT_BLOCK = 1024


def _identity(kernel: Callable) -> Callable:
    return kernel


# The public launchers call the kernels directly (least overhead). The torch.library ops in
# ``fastloop.kernels.ops`` pass ``torch.library.wrap_triton`` as ``wrap`` instead, so
# torch.compile can trace the launch.
Wrap = Callable[[Callable], Callable]


@triton.jit
def _sgd_kernel(
    param_ptr, grad_ptr, buf_ptr,  # flat buffers (buf unused without momentum)
    step_ptr, lr_ptr, momentum_ptr, dampening_ptr, weight_decay_ptr,  # 0-d tensors
    n_elements,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: buffers may pass 2**31
    mask = offs < n_elements
    lr = tl.load(lr_ptr).to(tl.float32)
    weight_decay = tl.load(weight_decay_ptr).to(tl.float32)

    p = tl.load(param_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
    if MAXIMIZE:
        g = -g
    g = g + weight_decay * p
    if HAS_MOMENTUM:
        momentum = tl.load(momentum_ptr).to(tl.float32)
        dampening = tl.load(dampening_ptr).to(tl.float32)
        # step was incremented before launch: 1 means this is the first update, where
        # torch initialises the buffer to the gradient (no dampening).
        first = tl.load(step_ptr) == 1
        b = tl.load(buf_ptr + offs, mask=mask).to(tl.float32)
        b = tl.where(first, g, b * momentum + (1.0 - dampening) * g)
        tl.store(buf_ptr + offs, b.to(buf_ptr.dtype.element_ty), mask=mask)
        if NESTEROV:
            g = g + momentum * b
        else:
            g = b
    p = p - lr * g
    tl.store(param_ptr + offs, p.to(param_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adam_kernel(
    param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr,  # flat buffers
    step_ptr, lr_ptr, beta1_ptr, beta2_ptr, eps_ptr, weight_decay_ptr,  # 0-d tensors
    n_elements,
    DECOUPLED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    step = tl.load(step_ptr).to(tl.float32)
    lr = tl.load(lr_ptr).to(tl.float32)
    beta1 = tl.load(beta1_ptr).to(tl.float32)
    beta2 = tl.load(beta2_ptr).to(tl.float32)
    eps = tl.load(eps_ptr).to(tl.float32)
    weight_decay = tl.load(weight_decay_ptr).to(tl.float32)

    p = tl.load(param_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(exp_avg_ptr + offs, mask=mask).to(tl.float32)
    v = tl.load(exp_avg_sq_ptr + offs, mask=mask).to(tl.float32)
    if MAXIMIZE:
        g = -g
    if DECOUPLED:
        p = p * (1.0 - lr * weight_decay)  # AdamW
    else:
        g = g + weight_decay * p  # Adam: L2 penalty folded into the gradient

    # m = lerp(m, g, 1 - beta1), in the form torch's lerp uses for each weight range
    w = 1.0 - beta1
    m = tl.where(w < 0.5, m + w * (g - m), g - (g - m) * (1.0 - w))
    v = v * beta2 + (1.0 - beta2) * g * g

    # beta ** step as exp2(step * log2(beta)): no pow in core triton; fp32, like the
    # capturable/fused torch paths (torch's default path computes this in double).
    bias_correction1 = 1.0 - tl.exp2(step * tl.log2(beta1))
    bias_correction2 = 1.0 - tl.exp2(step * tl.log2(beta2))
    step_size = lr / bias_correction1
    bias_correction2_sqrt = tl.sqrt(bias_correction2)
    if AMSGRAD:
        v_max = tl.maximum(tl.load(max_exp_avg_sq_ptr + offs, mask=mask).to(tl.float32), v)
        tl.store(max_exp_avg_sq_ptr + offs, v_max.to(max_exp_avg_sq_ptr.dtype.element_ty), mask=mask)
        denom = tl.sqrt(v_max) / bias_correction2_sqrt + eps
    else:
        denom = tl.sqrt(v) / bias_correction2_sqrt + eps
    p = p - step_size * (m / denom)

    tl.store(param_ptr + offs, p.to(param_ptr.dtype.element_ty), mask=mask)
    tl.store(exp_avg_ptr + offs, m.to(exp_avg_ptr.dtype.element_ty), mask=mask)
    tl.store(exp_avg_sq_ptr + offs, v.to(exp_avg_sq_ptr.dtype.element_ty), mask=mask)


def _check_flat(name: str, t: Tensor, ref: Tensor) -> None:
    # metadata only: no device synchronisation
    if t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous 1-D tensor, got shape {tuple(t.shape)}")
    if t.numel() != ref.numel() or t.device != ref.device:
        raise ValueError(
            f"{name} has {t.numel()} elements on {t.device}; "
            f"expected {ref.numel()} on {ref.device}"
        )


def _check_scalar(name: str, t: Tensor, ref: Tensor) -> None:
    if not isinstance(t, Tensor) or t.numel() != 1 or t.device != ref.device:
        raise TypeError(f"{name} must be a one-element tensor on {ref.device}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def sgd_update_(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Optional[Tensor],
    step_t: Tensor,
    lr: Tensor,
    momentum: Tensor,
    dampening: Tensor,
    weight_decay: Tensor,
    *,
    nesterov: bool = False,
    maximize: bool = False,
    block: int = DEFAULT_BLOCK,
    wrap: Wrap = _identity,
) -> None:
    """One fused SGD update over flat buffers, in place (``torch.optim.SGD`` semantics).

    With ``g = ±grad + weight_decay * param`` (minus sign when ``maximize``)::

        buf = g                                        if step == 1 (first update)
        buf = momentum * buf + (1 - dampening) * g     otherwise
        g   = g + momentum * buf   if nesterov   else   buf
        param -= lr * g

    Device tensors: ``param``, ``grad``, ``momentum_buffer`` (flat, same length; the
    buffer is ``None`` for plain SGD without momentum, and its contents before the first
    update are ignored), and the 0-d hyperparameter tensors ``step_t`` (float, updates
    done so far; incremented in place here), ``lr``, ``momentum``, ``dampening``,
    ``weight_decay``. With ``momentum_buffer=None`` the momentum and dampening values are
    not read. ``nesterov``/``maximize`` are compile-time flags. ``block`` is the number of
    elements per program; ``wrap`` is applied to the kernel before launch (internal).

    ``torch.optim.SGD`` keeps no step count; here ``step_t`` only marks the first update.
    To resume from a torch momentum buffer, copy it into ``momentum_buffer`` and set
    ``step_t`` to 1 or more. torch's check that nesterov needs ``dampening == 0`` is left
    to the caller: dampening is a device tensor, and reading it would synchronise.
    """
    has_momentum = momentum_buffer is not None
    _check_flat("grad", grad, param)
    _check_flat("param", param, param)
    if has_momentum:
        _check_flat("momentum_buffer", momentum_buffer, param)
    elif nesterov:
        raise ValueError("nesterov momentum needs a momentum buffer")
    for name, t in (("step_t", step_t), ("lr", lr), ("momentum", momentum),
                    ("dampening", dampening), ("weight_decay", weight_decay)):
        _check_scalar(name, t, param)

    step_t.add_(1)  # on the device, before the kernel reads it (as torch.optim does)
    n = param.numel()
    if n == 0:
        return
    buf = momentum_buffer if has_momentum else param  # placeholder pointer, never read
    grid = (triton.cdiv(n, block),)
    wrap(_sgd_kernel)[grid](
        param, grad, buf,
        step_t, lr, momentum, dampening, weight_decay,
        n,
        HAS_MOMENTUM=has_momentum, NESTEROV=nesterov, MAXIMIZE=maximize, BLOCK=block,
    )


def adam_update_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Optional[Tensor],
    step_t: Tensor,
    lr: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    eps: Tensor,
    weight_decay: Tensor,
    *,
    decoupled: bool = False,
    amsgrad: bool = False,
    maximize: bool = False,
    block: int = DEFAULT_BLOCK,
    wrap: Wrap = _identity,
) -> None:
    """One fused Adam (``decoupled=False``) or AdamW (``decoupled=True``) update, in place.

    After ``step += 1`` and ``g = ±grad`` (minus sign when ``maximize``)::

        AdamW: param *= 1 - lr * weight_decay      Adam: g += weight_decay * param
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        v_hat = max(v_max, v) (stored back into v_max)   if amsgrad   else   v
        param -= lr / (1 - beta1**step) * m / (sqrt(v_hat) / sqrt(1 - beta2**step) + eps)

    Device tensors: ``param``, ``grad``, ``exp_avg``, ``exp_avg_sq`` and (only with
    ``amsgrad``) ``max_exp_avg_sq`` are flat buffers of one length, state zero-initialised;
    ``step_t`` (float, updates done so far; incremented in place here), ``lr``, ``beta1``,
    ``beta2``, ``eps`` and ``weight_decay`` are 0-d tensors. ``decoupled``, ``amsgrad`` and
    ``maximize`` are compile-time flags. ``block``/``wrap``: as for :func:`sgd_update_`.
    """
    for name, t in (("grad", grad), ("param", param), ("exp_avg", exp_avg),
                    ("exp_avg_sq", exp_avg_sq)):
        _check_flat(name, t, param)
    if amsgrad:
        if max_exp_avg_sq is None:
            raise ValueError("amsgrad=True needs max_exp_avg_sq")
        _check_flat("max_exp_avg_sq", max_exp_avg_sq, param)
    for name, t in (("step_t", step_t), ("lr", lr), ("beta1", beta1), ("beta2", beta2),
                    ("eps", eps), ("weight_decay", weight_decay)):
        _check_scalar(name, t, param)

    step_t.add_(1)  # on the device, before the kernel reads it (as torch.optim does)
    n = param.numel()
    if n == 0:
        return
    v_max = max_exp_avg_sq if amsgrad else exp_avg_sq  # placeholder pointer, never read
    grid = (triton.cdiv(n, block),)
    wrap(_adam_kernel)[grid](
        param, grad, exp_avg, exp_avg_sq, v_max,
        step_t, lr, beta1, beta2, eps, weight_decay,
        n,
        DECOUPLED=decoupled, AMSGRAD=amsgrad, MAXIMIZE=maximize, BLOCK=block,
    )
