"""Register an opaque forward/backward operator pair that keeps its gradient inside the fused step.

Used by the LSTM layers (``onednn_lstm.py``, ``lstm_kernel.py``). ``torch.library.custom_op`` with
``register_autograd`` fails under functorch (its generated autograd.Function has no
``setup_context``), and an autograd.Function called from user code is inlined by Dynamo under
functorch, losing its backward. So the forward op gets its own Autograd kernel that applies a
``setup_context``-style Function as a single-level function: when functorch dispatches to that
kernel it has already unwrapped the tensors to this level, as for a built-in op. Dynamo and
AOTAutograd then see one opaque forward op and one opaque backward op.
"""
from __future__ import annotations

from typing import Any, Callable, Tuple

import torch
from torch import Tensor
from torch.library import Library

__all__ = ["register_differentiable_op"]


def register_differentiable_op(lib: Library, name: str, function: type, forward: Callable, forward_fake: Callable,
                               backward: Callable, backward_fake: Callable) -> None:
    """Give ``lib``'s ops ``name`` and ``name_backward`` (already defined) their CPU, fake and
    Autograd kernels. ``function`` is the autograd.Function whose ``forward`` calls
    ``name`` below autograd and whose ``backward`` calls ``name_backward``."""
    forward_op = getattr(torch.ops.fastloop, name).default
    backward_op = getattr(torch.ops.fastloop, f"{name}_backward").default

    def forward_autograd(*args: Any) -> Tuple[Tensor, ...]:
        from torch._functorch.utils import enable_single_level_autograd_function

        if not (torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)):
            # nothing to record (the compiled graph calls the op this way): skip the Function's overhead
            with torch._C._AutoDispatchBelowAutograd():
                return forward_op(*args)
        # Function.apply would hand over to functorch's custom_function_call while transforms are
        # active; here functorch has already unwrapped to this level, so plain autograd is right.
        with enable_single_level_autograd_function():
            return super(torch.autograd.Function, function).apply(*args)  # type: ignore[misc]

    def backward_autograd(*args: Any) -> Tuple[Tensor, ...]:
        with torch._C._AutoDispatchBelowAutograd():  # no gradient of the gradient
            return backward_op(*args)

    lib.impl(name, forward, "CPU")
    lib.impl(name, forward_autograd, "Autograd")
    lib.impl(f"{name}_backward", backward, "CPU")
    lib.impl(f"{name}_backward", backward_autograd, "Autograd")
    torch.library.register_fake(f"fastloop::{name}", forward_fake, lib=lib)
    torch.library.register_fake(f"fastloop::{name}_backward", backward_fake, lib=lib)
