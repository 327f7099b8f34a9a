"""The fused kernels as ``torch.library`` operators, callable inside ``torch.compile``.

``torch.library.triton_op`` (torch >= 2.6) makes the launch visible to torch.compile
(the kernels are wrapped with ``torch.library.wrap_triton``), so a compiled training step
can contain the fused update without a graph break; :data:`MODE` is ``"triton_op"``.

Under the Triton interpreter (CPU tests) the kernels are interpreted functions that
cannot be traced, so the same ops are registered as opaque ``torch.library.custom_op``
with fake implementations (:data:`MODE` ``"custom_op"``): torch.compile then calls them
as black boxes. On torch without ``custom_op`` nothing is registered (:data:`MODE` is
None); the plain launchers in ``optim_kernels``/``grad_norm`` still work.

Operators (all mutate their buffers in place; arguments as in the plain launchers):

- ``torch.ops.fastloop.fused_sgd(param, grad, momentum_buffer, step_t, lr, momentum,
  dampening, weight_decay, nesterov, maximize) -> ()``
- ``torch.ops.fastloop.fused_adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq,
  step_t, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize) -> ()``
- ``torch.ops.fastloop.clip_grads(grad, max_norm, clip_value) -> (norm, found_inf)``
"""
# No ``from __future__ import annotations``: torch.library infers the schema from the
# annotation objects.
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

import fastloop.kernels.grad_norm as _gn
import fastloop.kernels.optim_kernels as _ok


def _interpreted() -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - older triton
        return False
    return isinstance(_ok._sgd_kernel, InterpretedFunction)


if hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton") and not _interpreted():
    MODE: Optional[str] = "triton_op"
elif hasattr(torch.library, "custom_op"):
    MODE = "custom_op"
else:  # pragma: no cover - torch < 2.4
    MODE = None
REGISTERED: bool = MODE is not None

_SGD_MUTATES = ("param", "momentum_buffer", "step_t")
_ADAM_MUTATES = ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step_t")


def _wrap_kernel() -> Callable:
    return torch.library.wrap_triton if MODE == "triton_op" else _ok._identity


def _fused_sgd(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Optional[Tensor],
    step_t: Tensor,
    lr: Tensor,
    momentum: Tensor,
    dampening: Tensor,
    weight_decay: Tensor,
    nesterov: bool,
    maximize: bool,
) -> None:
    _ok.sgd_update_(
        param, grad, momentum_buffer, step_t, lr, momentum, dampening, weight_decay,
        nesterov=nesterov, maximize=maximize, wrap=_wrap_kernel(),
    )


def _fused_adam(
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
    decoupled: bool,
    amsgrad: bool,
    maximize: bool,
) -> None:
    _ok.adam_update_(
        param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step_t,
        lr, beta1, beta2, eps, weight_decay,
        decoupled=decoupled, amsgrad=amsgrad, maximize=maximize, wrap=_wrap_kernel(),
    )


def _clip_grads(
    grad: Tensor, max_norm: Optional[float], clip_value: Optional[float]
) -> Tuple[Tensor, Tensor]:
    return _gn.clip_grads_(grad, max_norm=max_norm, clip_value=clip_value, wrap=_wrap_kernel())


if MODE == "triton_op":
    # the implementation itself serves as the fake (meta) kernel
    fused_sgd = torch.library.triton_op("fastloop::fused_sgd", mutates_args=_SGD_MUTATES)(_fused_sgd)
    fused_adam = torch.library.triton_op("fastloop::fused_adam", mutates_args=_ADAM_MUTATES)(_fused_adam)
    clip_grads = torch.library.triton_op("fastloop::clip_grads", mutates_args=("grad",))(_clip_grads)
elif MODE == "custom_op":
    fused_sgd = torch.library.custom_op("fastloop::fused_sgd", mutates_args=_SGD_MUTATES)(_fused_sgd)
    fused_adam = torch.library.custom_op("fastloop::fused_adam", mutates_args=_ADAM_MUTATES)(_fused_adam)
    clip_grads = torch.library.custom_op("fastloop::clip_grads", mutates_args=("grad",))(_clip_grads)

    @fused_sgd.register_fake
    def _(param, grad, momentum_buffer, step_t, lr, momentum, dampening, weight_decay,
          nesterov, maximize):
        return None

    @fused_adam.register_fake
    def _(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step_t, lr, beta1, beta2, eps,
          weight_decay, decoupled, amsgrad, maximize):
        return None

    @clip_grads.register_fake
    def _(grad, max_norm, clip_value):
        return (grad.new_empty((), dtype=torch.float32), grad.new_empty((), dtype=torch.float32))
