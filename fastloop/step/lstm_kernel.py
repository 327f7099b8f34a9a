"""One LSTM layer's time loop as fastloop's own C++ kernel (csrc/lstm.cpp, module ``fastloop._lstm``),
an opaque operator of the fused step; faster than oneDNN for small layers.

At hidden 20 / batch 30 oneDNN's per-time-step overhead dominates an LSTM layer (benchmarks/RESULTS.md).
Here the layer is split where each part runs best:

* the input projection of the whole sequence, ``x @ W_ih^T + b_ih + b_hh``, is ordinary torch code
  in the graph (one GEMM; autograd gives dx, dW_ih and the bias gradients from its gradient);
* the recurrence is ``fastloop::lstm_loop(xproj, w_hh, h0, c0, reverse)`` -> (y, hy, cy, gates, cs,
  tcs): the C++ loop over time steps, which also returns the activated gates, the cell states and
  their tanh that its backward ``fastloop::lstm_loop_backward`` needs (exact shapes, so the fake
  kernels are plain);
* the backward's GEMMs (dW_hh = dgates^T @ h_prev) run in torch inside the backward op.

The Autograd kernel follows onednn_lstm.py (read its docstring: why not ``custom_op`` with
``register_autograd``, and why the Function is applied as a single-level function).
Gradients equal eager ``nn.LSTM``'s to ~1e-6 relative (own exp/tanh, another summation order).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor
from torch.library import Library
from torch.nn import functional as F

from fastloop import _ext
from fastloop.step.opaque_op import register_differentiable_op

__all__ = ["lstm_layer_cpp", "cpp_lstm_unavailable"]

_lib = Library("fastloop", "FRAGMENT")
_lib.define("lstm_loop(Tensor xproj, Tensor w_hh, Tensor h0, Tensor c0, bool reverse) "
            "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
_lib.define("lstm_loop_backward(Tensor w_hh, Tensor h0, Tensor c0, Tensor y, Tensor gates, Tensor cs, Tensor tcs, "
            "Tensor grad_y, Tensor grad_hy, Tensor grad_cy, bool reverse) -> (Tensor, Tensor, Tensor, Tensor)")


def _ptr(t: Tensor) -> int:
    # the C++ side reads raw float32 memory: anything else would be garbage, not an error
    assert t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous(), (t.dtype, t.device)
    return t.data_ptr()


def _forward(xproj: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor,
             reverse: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    steps, batch, gates4 = xproj.shape
    hidden = gates4 // 4
    xproj, w_hh, h0, c0 = (t.contiguous() for t in (xproj, w_hh, h0, c0))
    y, cs, tcs = (xproj.new_empty(steps, batch, hidden) for _ in range(3))
    hy, cy = h0.new_empty(batch, hidden), c0.new_empty(batch, hidden)
    gates = torch.empty_like(xproj)
    _ext.lstm_ext.load().forward(_ptr(xproj), _ptr(w_hh), _ptr(h0), _ptr(c0), _ptr(y), _ptr(hy), _ptr(cy),
                                 _ptr(gates), _ptr(cs), _ptr(tcs), steps, batch, hidden, reverse)
    return y, hy, cy, gates, cs, tcs


def _forward_fake(xproj: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor,
                  reverse: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    steps, batch, gates4 = xproj.shape
    hidden = gates4 // 4
    return (xproj.new_empty(steps, batch, hidden), h0.new_empty(batch, hidden), c0.new_empty(batch, hidden),
            xproj.new_empty(steps, batch, gates4), xproj.new_empty(steps, batch, hidden),
            xproj.new_empty(steps, batch, hidden))


def _backward(w_hh: Tensor, h0: Tensor, c0: Tensor, y: Tensor, gates: Tensor, cs: Tensor, tcs: Tensor,
              grad_y: Tensor, grad_hy: Tensor, grad_cy: Tensor, reverse: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    steps, batch, hidden = y.shape
    w_hh, c0, gates, cs, tcs, grad_y, grad_hy, grad_cy = (
        t.contiguous() for t in (w_hh, c0, gates, cs, tcs, grad_y, grad_hy, grad_cy))
    dgates = torch.empty_like(gates)
    dh0, dc0 = c0.new_empty(batch, hidden), c0.new_empty(batch, hidden)
    _ext.lstm_ext.load().backward(_ptr(gates), _ptr(cs), _ptr(tcs), _ptr(c0), _ptr(w_hh), _ptr(grad_y),
                                  _ptr(grad_hy), _ptr(grad_cy), _ptr(dgates), _ptr(dh0), _ptr(dc0), steps, batch,
                                  hidden, reverse)
    # dW_hh = sum over t of dgates[t]^T @ h_{t-1}: the first step of the direction starts from h0,
    # the others from y of the step before (no concatenated copy of y)
    first, rest, before = (steps - 1, slice(0, steps - 1), slice(1, steps)) if reverse else \
        (0, slice(1, steps), slice(0, steps - 1))
    dw_hh = dgates[first].t().mm(h0)
    if steps > 1:
        dw_hh.addmm_(dgates[rest].reshape(-1, 4 * hidden).t(), y[before].reshape(-1, hidden))
    return dgates, dw_hh, dh0, dc0


def _backward_fake(w_hh: Tensor, h0: Tensor, c0: Tensor, y: Tensor, gates: Tensor,
                   *rest: Any) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return torch.empty_like(gates), torch.empty_like(w_hh), torch.empty_like(h0), torch.empty_like(c0)


class _LSTMLoop(torch.autograd.Function):
    """The autograd of ``fastloop::lstm_loop`` (first order only)."""

    @staticmethod
    def forward(*args: Any) -> Tuple[Tensor, ...]:  # type: ignore[override]
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.fastloop.lstm_loop.default(*args)

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, ...]) -> None:
        _, w_hh, h0, c0, reverse = inputs
        y, _, _, gates, cs, tcs = output
        ctx.save_for_backward(w_hh, h0, c0, y, gates, cs, tcs)
        ctx.reverse = reverse
        ctx.mark_non_differentiable(gates, cs, tcs)

    @staticmethod
    def backward(ctx: Any, grad_y: Optional[Tensor], grad_hy: Optional[Tensor], grad_cy: Optional[Tensor],
                 *_grad_saved: Any) -> Tuple[Optional[Tensor], ...]:
        w_hh, h0, c0, y, gates, cs, tcs = ctx.saved_tensors
        grads = [torch.zeros_like(like) if g is None else g for g, like in
                 ((grad_y, y), (grad_hy, h0), (grad_cy, c0))]
        dxproj, dw_hh, dh0, dc0 = torch.ops.fastloop.lstm_loop_backward(
            w_hh, h0, c0, y, gates, cs, tcs, *grads, ctx.reverse)
        return dxproj, dw_hh, dh0, dc0, None


register_differentiable_op(_lib, "lstm_loop", _LSTMLoop, _forward, _forward_fake, _backward, _backward_fake)


def lstm_layer_cpp(x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
                   h0: Tensor, c0: Tensor, reverse: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer and direction over time-major ``x`` (T, B, I) from ``h0``/``c0`` (B, H):
    (outputs (T, B, H), last h (B, H), last c (B, H)), the recurrence on the C++ loop."""
    bias = None if b_ih is None else b_ih + b_hh
    xproj = F.linear(x, w_ih, bias)  # the whole sequence's input projection: one GEMM, in the graph
    y, hy, cy = torch.ops.fastloop.lstm_loop(xproj, w_hh, h0, c0, reverse)[:3]
    return y, hy, cy


def cpp_lstm_unavailable() -> Optional[str]:
    """Why the C++ loop cannot serve at all (None: it can). Host side: read outside tracing."""
    if not _ext.lstm_ext.available():
        return f"the C++ LSTM loop is unavailable: {_ext.lstm_ext.reason()}"
    return None
