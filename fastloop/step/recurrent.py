"""``nn.LSTM``/``nn.GRU``/``nn.RNN`` inside the fused step: long LSTM layers as one C++ loop or oneDNN
call each, the rest as an unrolled cell loop.

Dynamo refuses to trace torch's recurrent modules ("Attempted to wrap RNN, GRU, or LSTM"), and
its ``allow_rnn`` switch fails under ``torch.func.grad_and_value`` in torch 2.13 (a shape error
in the traced backward of ``_VF.lstm``). So while the fused step runs through torch.compile,
``RecurrentSwap`` puts an ``UnrolledRecurrent`` twin in each recurrent module's place: a plain
module holding the *same* ``Parameter`` objects under the same names. The eager path, and the
user's module outside the fused call, keep the original module; the swap lasts one call.

How the twin runs each layer and direction:

* Up to ``MAX_UNROLLED_STEPS`` cell calls (time steps x layers x directions): the math of ATen's
  CPU implementation written out: input projections of the whole sequence in one ``linear``, then
  one cell per time step, gates in ATen's order, which inductor fuses (the fastest per step for
  small layers). RNN and one-layer GRU equal eager bit for bit, deeper GRUs to ~1e-6, LSTM to
  ~2e-6 (eager's LSTM runs on oneDNN). Compile time grows with each traced cell.
* Beyond, an LSTM (float32 on the CPU, no ``proj_size``, no autocast) runs one opaque call per
  layer and direction, whatever the sequence length, so compile time does not grow with it:
  up to ``CPP_MAX_HIDDEN`` hidden units, fastloop's C++ time loop ``fastloop::lstm_loop`` (see
  lstm_kernel.py; the input projection stays in the graph), which equals eager to ~1e-6 and beats
  oneDNN's per-step overhead at such sizes; larger layers, or without the extension
  (``FASTLOOP_NO_EXT=1``, not built), ``fastloop::lstm_layer`` (see onednn_lstm.py): the oneDNN
  kernels eager ``nn.LSTM`` runs, forward and backward, equal to eager bit for bit before compiling.
  ``UnrolledRecurrent.lstm_kernel`` says which one the last traced call chose, and why.
* Anything else beyond ``MAX_UNROLLED_STEPS`` makes the step run eagerly, with the reason (for an
  LSTM, also why oneDNN could not serve).

Supported: every mode (LSTM, GRU, RNN tanh/relu), ``num_layers``, ``bias``, ``batch_first``,
``bidirectional``, ``dropout`` between layers (``F.dropout`` in the graph, as before: the same
probability, not eager's random stream), ``proj_size``, unbatched input, an initial state.
Not fused (the step runs eagerly, with the reason): a subclass with its own ``forward``, a
module with hooks, a ``PackedSequence`` input, and the unrolled loop beyond ``MAX_UNROLLED_STEPS``.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .lstm_kernel import cpp_lstm_unavailable, lstm_layer_cpp
from .onednn_lstm import lstm_layer, onednn_lstm_reason, onednn_unavailable

__all__ = ["UnrolledRecurrent", "RecurrentSwap", "recurrent_blockers", "MAX_UNROLLED_STEPS", "CPP_MAX_HIDDEN"]

_RECURRENT = (nn.LSTM, nn.GRU, nn.RNN)
# Cell calls (time steps x layers x directions) one fused graph may unroll. Compile time grows
# with them: on the 2-core CPU VM of benchmarks/RESULTS.md, 10 LSTM steps took about 1 minute to
# compile under load, 100 steps over 10 minutes. Longer sequences run eagerly, with the reason.
MAX_UNROLLED_STEPS = 32
# Largest hidden size for which long LSTM layers run on fastloop's C++ loop (lstm_kernel.py) rather
# than oneDNN: its per-step GEMM is a plain vectorized loop, which loses to oneDNN's blocked GEMM
# as the layer grows, while oneDNN's per-step overhead dominates small layers (layer alone, batch
# 30, 100 steps, forward+backward, CPU time on a busy 2-core VM: 1.7-2.0x oneDNN's speed at hidden
# 20, 1.5x at 32, 1.2-1.3x at 48, 1.1-1.4x at 64 (once 0.68x), 1.0x at 96, 0.86-0.88x at 128,
# 0.45x at 256; benchmarks/RESULTS.md). Per step, its cost grows with batch x hidden^2 and
# oneDNN's overhead does not: for much larger batches the crossover moves down.
CPP_MAX_HIDDEN = 64


def _not_fusable_error() -> type:
    """``compiled.NotFusable`` (imported late: ``compiled`` imports the fused step, which imports this)."""
    try:
        from fastloop.step.compiled import NotFusable
    except ImportError:  # pragma: no cover - a partial install
        return RuntimeError
    return NotFusable


def _own_forward(rnn: nn.Module) -> bool:
    """The module runs torch's own ``forward`` (a subclass may compute something else)."""
    return any(type(rnn).forward is cls.forward for cls in _RECURRENT)


def _has_hooks(rnn: nn.Module) -> bool:
    return bool(rnn._forward_hooks or rnn._forward_pre_hooks or getattr(rnn, "_backward_hooks", None)
                or getattr(rnn, "_backward_pre_hooks", None))


def recurrent_blockers(module: nn.Module) -> List[str]:
    """Why a recurrent submodule of ``module`` cannot run inside the fused step (empty: all can)."""
    reasons = []
    for name, sub in module.named_modules():
        if not isinstance(sub, nn.RNNBase):
            continue
        kind = type(sub).__name__
        if not isinstance(sub, _RECURRENT) or not _own_forward(sub):
            reasons.append(f"{name} ({kind}) defines its own forward; only torch's nn.LSTM/GRU/RNN are unrolled "
                           "for the fused step")
        elif _has_hooks(sub):
            reasons.append(f"{name} ({kind}) has hooks, which the unrolled recurrent layer of the fused step "
                           "would not call")
    return reasons


class UnrolledRecurrent(nn.Module):
    """``rnn``'s math over ``rnn``'s own parameter objects: one cell per time step, or (long LSTMs)
    one oneDNN call per layer and direction."""

    # LSTMs with fewer cell calls stay unrolled: inductor's fused cells beat oneDNN per step on small
    # LSTMs (short-lstm: 2.36x raw unrolled, 1.44x on oneDNN; benchmarks/RESULTS.md), at a compile
    # time that grows with the steps; beyond MAX_UNROLLED_STEPS one opaque call per layer (the C++
    # loop, or oneDNN) is the only compiled way. The name predates the C++ loop: it gates both.
    onednn_from_cells = MAX_UNROLLED_STEPS + 1

    def __init__(self, rnn: nn.RNNBase, not_fusable: type = RuntimeError, use_onednn: bool = True,
                 use_cpp: bool = True) -> None:
        """``not_fusable``: the exception raised while tracing for input the loop does not unroll;
        ``use_onednn``: run LSTM layers as oneDNN calls where they apply (see onednn_lstm.py);
        ``use_cpp``: prefer fastloop's C++ loop for small LSTM layers (see lstm_kernel.py)."""
        super().__init__()
        self.mode = rnn.mode  # "LSTM", "GRU", "RNN_TANH" or "RNN_RELU"
        for attr in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                     "bidirectional", "proj_size"):
            setattr(self, attr, getattr(rnn, attr))
        self._flat_weights_names = list(rnn._flat_weights_names)
        for name in rnn._flat_weights_names:
            self.register_parameter(name, getattr(rnn, name))
        self.use_onednn = use_onednn
        self.use_cpp = use_cpp
        self.onednn_off = onednn_unavailable()  # refreshed on each swap (read outside tracing)
        self.cpp_off = cpp_lstm_unavailable()  # likewise
        self.lstm_kernel: Optional[str] = None  # which kernel the last traced call chose for its long LSTM, and why
        self._not_fusable = not_fusable  # raised while tracing for what the loop cannot express
        self.training = rnn.training

    def _weights(self, layer: int, suffix: str) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor],
                                                          Optional[Tensor]]:
        get = lambda kind: getattr(self, f"{kind}_l{layer}{suffix}", None)  # noqa: E731
        return get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"), get("weight_hr")

    def _cell(self, xw: Tensor, h: Tensor, c: Optional[Tensor], w_hh: Tensor, b_hh: Optional[Tensor],
              w_hr: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """One time step; ``xw`` is this step's input projection (ATen's order of operations)."""
        hw = F.linear(h, w_hh, b_hh)
        if self.mode == "LSTM":
            i, f, g, o = (hw + xw).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            return (F.linear(h, w_hr) if w_hr is not None else h), c
        if self.mode == "GRU":
            xr, xz, xn = xw.chunk(3, 1)
            hr, hz, hn = hw.chunk(3, 1)
            r = torch.sigmoid(hr + xr)
            z = torch.sigmoid(hz + xz)
            n = torch.tanh(xn + hn * r)
            return (h - n) * z + n, None
        pre = hw + xw
        return (torch.tanh(pre) if self.mode == "RNN_TANH" else torch.relu(pre)), None

    def _onednn_reason(self, x: Tensor, h0: Tensor, c0: Optional[Tensor]) -> Optional[str]:
        """Why this call's layers cannot run on oneDNN (None: they can)."""
        if self.mode != "LSTM":
            return "only nn.LSTM runs on oneDNN"
        if self.proj_size > 0:
            return "proj_size is set"
        if not self.use_onednn:
            return "switched off (use_onednn=False)"
        if self.onednn_off:
            return self.onednn_off
        return onednn_lstm_reason(x, h0, c0, *self._flat_weights())

    def _cpp_reason(self, x: Tensor, h0: Tensor, c0: Optional[Tensor]) -> Optional[str]:
        """Why this call's layers cannot run on the C++ loop (None: they can)."""
        if self.mode != "LSTM" or self.proj_size > 0:
            return "only nn.LSTM without proj_size has a C++ loop"
        if not self.use_cpp:
            return "switched off (use_cpp=False)"
        if self.cpp_off:
            return self.cpp_off
        if self.hidden_size > CPP_MAX_HIDDEN:
            return f"hidden_size {self.hidden_size} > CPP_MAX_HIDDEN {CPP_MAX_HIDDEN}, where oneDNN is faster"
        return onednn_lstm_reason(x, h0, c0, *self._flat_weights())  # the same rule: float32 CPU, no autocast

    def _direction_fn(self, x: Tensor, h0: Tensor,
                      c0: Optional[Tensor]) -> Callable[..., Tuple[Tensor, Tensor, Optional[Tensor]]]:
        """How each layer and direction runs on time-major ``x``: the unrolled cells up to
        MAX_UNROLLED_STEPS cell calls; beyond, for an LSTM, one call of the C++ loop (small layers)
        or of oneDNN, where they apply (length-independent), else an error (the step then runs
        eagerly, with the reason)."""
        dirs = 2 if self.bidirectional else 1
        cells = x.shape[0] * self.num_layers * dirs
        why_not = self._onednn_reason(x, h0, c0)
        if cells >= self.onednn_from_cells:
            why_not_cpp = self._cpp_reason(x, h0, c0)
            if why_not_cpp is None:
                self.lstm_kernel = "C++ loop"
                return self._cpp_direction
            if why_not is None:
                self.lstm_kernel = f"oneDNN (not the C++ loop: {why_not_cpp})"
                return self._onednn_direction
        if cells > MAX_UNROLLED_STEPS:
            raise self._not_fusable(
                f"nn.{self.mode.split('_')[0]} over {x.shape[0]} time steps x {self.num_layers} layer(s) x {dirs} "
                f"direction(s) = {cells} cell calls, more than the {MAX_UNROLLED_STEPS} the fused step unrolls "
                "(compile time grows with each; see fastloop.step.recurrent.MAX_UNROLLED_STEPS)"
                + (f"; not on oneDNN: {why_not}" if self.mode == "LSTM" else ""))
        return self._direction

    def _flat_weights(self) -> List[Tensor]:
        return [getattr(self, name) for name in self._flat_weights_names]

    def _onednn_direction(self, x: Tensor, h: Tensor, c: Tensor, layer: int,
                          reverse: bool) -> Tuple[Tensor, Tensor, Tensor]:
        """One LSTM layer in one direction as one oneDNN call (what eager nn.LSTM runs on the CPU)."""
        w_ih, w_hh, b_ih, b_hh, _ = self._weights(layer, "_reverse" if reverse else "")
        if b_ih is None:  # as eager's oneDNN path: zero biases
            b_ih = b_hh = w_ih.new_zeros(w_ih.shape[0])
        return lstm_layer(x, w_ih, w_hh, b_ih, b_hh, h, c, reverse)

    def _cpp_direction(self, x: Tensor, h: Tensor, c: Tensor, layer: int,
                       reverse: bool) -> Tuple[Tensor, Tensor, Tensor]:
        """One LSTM layer in one direction: the input projection in torch, the recurrence on the C++ loop."""
        w_ih, w_hh, b_ih, b_hh, _ = self._weights(layer, "_reverse" if reverse else "")
        return lstm_layer_cpp(x, w_ih, w_hh, b_ih, b_hh, h, c, reverse)

    def _direction(self, x: Tensor, h: Tensor, c: Optional[Tensor], layer: int,
                   reverse: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """One layer in one direction over time-major ``x``: (outputs, last h, last c)."""
        w_ih, w_hh, b_ih, b_hh, w_hr = self._weights(layer, "_reverse" if reverse else "")
        xw = F.linear(x, w_ih, b_ih)  # the whole sequence's input projection at once, as ATen does
        steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
        outputs: List[Tensor] = [h] * x.shape[0]
        for t in steps:
            h, c = self._cell(xw[t], h, c, w_hh, b_hh, w_hr)
            outputs[t] = h
        return torch.stack(outputs), h, c

    def forward(self, input: Any, hx: Any = None) -> Tuple[Tensor, Any]:
        if isinstance(input, nn.utils.rnn.PackedSequence):
            raise self._not_fusable(f"nn.{self.mode.split('_')[0]} on a PackedSequence is not unrolled for the "
                                    "fused step")
        lstm = self.mode == "LSTM"
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(1)
        if batched and self.batch_first:
            x = x.transpose(0, 1)
        dirs = 2 if self.bidirectional else 1
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        if hx is None:
            h0 = x.new_zeros(self.num_layers * dirs, x.shape[1], out_size)
            c0 = x.new_zeros(self.num_layers * dirs, x.shape[1], self.hidden_size) if lstm else None
        else:
            h0, c0 = hx if lstm else (hx, None)
            if not batched:
                h0 = h0.unsqueeze(1)
                c0 = c0.unsqueeze(1) if c0 is not None else None
        direction = self._direction_fn(x, h0, c0)
        last_h, last_c = [], []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout, True)
            outs = []
            for d in range(dirs):
                k = layer * dirs + d
                out, h, c = direction(x, h0[k], c0[k] if lstm else None, layer, reverse=d == 1)
                outs.append(out)
                last_h.append(h)
                last_c.append(c)
            x = outs[0] if dirs == 1 else torch.cat(outs, -1)
        h_n = torch.stack(last_h)
        hidden: Any = (h_n, torch.stack(last_c)) if lstm else h_n
        if not batched:
            x = x.squeeze(1)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1)) if lstm else hidden.squeeze(1)
        elif self.batch_first:
            x = x.transpose(0, 1)
        return x, hidden


class RecurrentSwap:
    """``with swap:`` puts an ``UnrolledRecurrent`` twin in place of each recurrent submodule of
    ``module`` (found once, here) and puts the originals back on exit. Falsy when there are none."""

    def __init__(self, module: nn.Module) -> None:
        self.sites: List[Tuple[nn.Module, str, nn.Module, UnrolledRecurrent]] = []
        not_fusable = _not_fusable_error()
        if not recurrent_blockers(module):
            for parent in module.modules():
                for name, child in parent._modules.items():
                    if isinstance(child, _RECURRENT):
                        self.sites.append((parent, name, child, UnrolledRecurrent(child, not_fusable)))

    def __bool__(self) -> bool:
        return bool(self.sites)

    def __enter__(self) -> "RecurrentSwap":
        for parent, name, original, twin in self.sites:
            twin.training = original.training  # train()/eval() on the user's module reaches the twin
            twin.onednn_off = onednn_unavailable()  # torch.backends.mkldnn.enabled may have changed
            twin.cpp_off = cpp_lstm_unavailable()
            parent._modules[name] = twin
        return self

    def __exit__(self, *exc: Any) -> None:
        for parent, name, original, _ in self.sites:
            parent._modules[name] = original

