"""One LSTM layer on oneDNN as an opaque operator of the fused step: compile time no longer grows
with the sequence. (Small layers run on fastloop's own C++ loop instead, lstm_kernel.py, which
avoids oneDNN's per-step overhead; this op serves the others, and all of them without the extension.)

Eager ``nn.LSTM`` on the CPU runs ``aten.mkldnn_rnn_layer`` per layer and direction, and
``aten.mkldnn_rnn_layer_backward`` in backward. Neither can be traced as they are inside
``torch.func.grad_and_value`` under Dynamo (see benchmarks/RESULTS.md), so this file wraps them in two
operators of the ``fastloop`` library:

* ``fastloop::lstm_layer(x, w_ih, w_hh, b_ih, b_hh, h0, c0, reverse, train)``: time-major
  ``x`` (T, B, I), ``h0``/``c0`` (1, B, H) -> (y, hy, cy, workspace). ``train=True`` keeps oneDNN's
  workspace, which the backward needs (oneDNN keeps it only with grad mode on, hence the
  ``enable_grad`` below: this kernel may run under the no-grad of a compiled graph).
* ``fastloop::lstm_layer_backward(...)``: the oneDNN backward from that workspace.

Why not ``torch.library.custom_op`` with ``register_autograd``: its generated autograd.Function has
no ``setup_context``, which functorch (``grad_and_value``) refuses; and an autograd.Function
around the op, called from the user's code, is inlined by Dynamo under functorch and loses its
backward (all-zero gradients). So the forward op gets its own Autograd kernel that applies a
``setup_context``-style Function directly, as a single-level function: when functorch dispatches
to that kernel it has already unwrapped the tensors to this level, exactly as for a built-in op.
Dynamo and AOTAutograd then see one opaque op forward and one backward; inductor calls them as
extern kernels. Gradients equal eager ``nn.LSTM``'s bit for bit (same oneDNN calls).

The fake (meta) kernel must give the workspace's true size: it is oneDNN's business, so it is
measured once per shape by running the real op on zeros (milliseconds) and cached.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

import torch
from torch import Tensor
from torch.library import Library

from fastloop.step.opaque_op import register_differentiable_op

__all__ = ["lstm_layer", "onednn_lstm_reason", "onednn_unavailable"]

_LSTM = 2  # ideep::rnn_kind::LSTM, the ``mode`` argument of aten.mkldnn_rnn_layer

_lib = Library("fastloop", "FRAGMENT")
_lib.define("lstm_layer(Tensor x, Tensor w_ih, Tensor w_hh, Tensor b_ih, Tensor b_hh, Tensor h0, Tensor c0, "
            "bool reverse, bool train) -> (Tensor, Tensor, Tensor, Tensor)")
_lib.define("lstm_layer_backward(Tensor x, Tensor w_ih, Tensor w_hh, Tensor b_ih, Tensor b_hh, Tensor h0, "
            "Tensor c0, Tensor y, Tensor hy, Tensor cy, Tensor grad_y, Tensor grad_hy, Tensor grad_cy, "
            "Tensor workspace, bool reverse) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


def _forward(x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor, h0: Tensor, c0: Tensor,
             reverse: bool, train: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    with torch.enable_grad() if train else torch.no_grad():  # workspace kept only with grad mode on
        y, hy, cy, ws = torch.ops.aten.mkldnn_rnn_layer(
            x, w_ih, w_hh, b_ih, b_hh, h0, c0, reverse, [], _LSTM, w_hh.shape[1], 1, True, False, False, train)
    if ws is None or not train:
        ws = x.new_empty(0, dtype=torch.uint8)
    return y, hy, cy, ws


@functools.lru_cache(maxsize=None)
def _workspace_numel(steps: int, batch: int, inputs: int, hidden: int, dtype: torch.dtype, reverse: bool) -> int:
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():  # real tensors, even while tracing (fake, proxy, functional modes)
        z = functools.partial(torch.zeros, dtype=dtype)
        ws = _forward(z(steps, batch, inputs), z(4 * hidden, inputs), z(4 * hidden, hidden), z(4 * hidden),
                      z(4 * hidden), z(1, batch, hidden), z(1, batch, hidden), reverse, True)[3]
    return ws.numel()


def _forward_fake(x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor, h0: Tensor, c0: Tensor,
                  reverse: bool, train: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    steps, batch, inputs = x.shape
    hidden = w_hh.shape[1]
    numel = _workspace_numel(steps, batch, inputs, hidden, x.dtype, reverse) if train else 0
    return (x.new_empty(steps, batch, hidden), h0.new_empty(h0.shape), c0.new_empty(c0.shape),
            x.new_empty(numel, dtype=torch.uint8))


def _backward(x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor, h0: Tensor, c0: Tensor,
              y: Tensor, hy: Tensor, cy: Tensor, grad_y: Tensor, grad_hy: Tensor, grad_cy: Tensor, ws: Tensor,
              reverse: bool) -> Tuple[Tensor, ...]:
    dx, dw_ih, dw_hh, db, _, dh0, dc0 = torch.ops.aten.mkldnn_rnn_layer_backward(
        x, w_ih, w_hh, b_ih, b_hh, h0, c0, y, hy, cy, grad_y, grad_hy, grad_cy, reverse, _LSTM, w_hh.shape[1], 1,
        True, True, False, [], False, ws)
    return dx, dw_ih, dw_hh, db, dh0, dc0  # oneDNN has one bias gradient: b_ih's and b_hh's are equal


def _backward_fake(x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor, h0: Tensor, c0: Tensor,
                   *rest: Any) -> Tuple[Tensor, ...]:
    return tuple(torch.empty_like(t) for t in (x, w_ih, w_hh, b_ih, h0, c0))


class _LSTMLayer(torch.autograd.Function):
    """The autograd of ``fastloop::lstm_layer`` (first order only)."""

    @staticmethod
    def forward(*args: Any) -> Tuple[Tensor, Tensor, Tensor, Tensor]:  # type: ignore[override]
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.fastloop.lstm_layer.default(*args)

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, ...]) -> None:
        x, w_ih, w_hh, b_ih, b_hh, h0, c0, reverse, _ = inputs
        y, hy, cy, ws = output
        ctx.save_for_backward(x, w_ih, w_hh, b_ih, b_hh, h0, c0, y, hy, cy, ws)
        ctx.reverse = reverse
        ctx.mark_non_differentiable(ws)

    @staticmethod
    def backward(ctx: Any, grad_y: Optional[Tensor], grad_hy: Optional[Tensor], grad_cy: Optional[Tensor],
                 _grad_ws: Any) -> Tuple[Optional[Tensor], ...]:
        x, w_ih, w_hh, b_ih, b_hh, h0, c0, y, hy, cy, ws = ctx.saved_tensors
        grads = [torch.zeros_like(out) if g is None else g.contiguous() for g, out in
                 ((grad_y, y), (grad_hy, hy), (grad_cy, cy))]
        dx, dw_ih, dw_hh, db, dh0, dc0 = torch.ops.fastloop.lstm_layer_backward(
            x, w_ih, w_hh, b_ih, b_hh, h0, c0, y, hy, cy, *grads, ws, ctx.reverse)
        return dx, dw_ih, dw_hh, db, db, dh0, dc0, None, None


register_differentiable_op(_lib, "lstm_layer", _LSTMLayer, _forward, _forward_fake, _backward, _backward_fake)


def lstm_layer(x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor, h0: Tensor, c0: Tensor,
               reverse: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer and direction over time-major ``x`` (T, B, I) from ``h0``/``c0`` (B, H):
    (outputs (T, B, H), last h (B, H), last c (B, H)); the workspace is kept when grad mode is on."""
    y, hy, cy, _ = torch.ops.fastloop.lstm_layer(x.contiguous(), w_ih, w_hh, b_ih, b_hh,
                                                 h0.unsqueeze(0).contiguous(), c0.unsqueeze(0).contiguous(),
                                                 reverse, torch.is_grad_enabled())
    return y, hy[0], cy[0]


def onednn_unavailable() -> Optional[str]:
    """Why oneDNN cannot serve at all (None: it can). Host side: Dynamo does not trace torch.backends."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    if not torch.backends.mkldnn.enabled:
        return "oneDNN is disabled (torch.backends.mkldnn.enabled is False)"
    return None


def onednn_lstm_reason(input: Tensor, *tensors: Optional[Tensor]) -> Optional[str]:
    """Why the oneDNN layer cannot serve this call's tensors (None: it can). Float32 on the CPU only:
    eager uses oneDNN for bf16 too, but that path is not tested here."""
    if torch.is_autocast_enabled(input.device.type):
        return "autocast is on"
    for t in (input, *tensors):
        if t is not None and (t.device.type != "cpu" or t.dtype != torch.float32):
            return f"a {t.dtype} tensor on {t.device.type} (the oneDNN layer takes float32 on the CPU)"
    return None
