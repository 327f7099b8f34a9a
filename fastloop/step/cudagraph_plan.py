"""Host-side bookkeeping of the CUDA-graph step, in pure Python (unit-tested on CPU).

- :func:`batch_signature`: what a captured graph is specialised on (pytree structure, and
  shape/dtype/device/strides of every tensor leaf, values of the other leaves).
- :class:`StaticBatch`: the long-lived input buffers of one signature; each new batch is
  ``copy_``'d into them, because a graph always reads the same addresses.
- :class:`CapturePlanner`: which way a call is served (warm up, capture, replay, or the
  compiled step), with the bound on distinct signatures and on re-captures.
- :func:`persistent_key`: the addresses of the persistent graph inputs (parameters,
  gradients, optimizer state, hyperparameters), to notice that one was replaced.

Nothing here touches CUDA: the tensors may live on any device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Hashable, List, Optional, Set, Tuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["NotCapturable", "batch_signature", "check_batch_device", "StaticBatch", "CapturePlanner", "persistent_key",
           "WARMUP", "CAPTURE", "REPLAY", "COMPILED"]

WARMUP, CAPTURE, REPLAY, COMPILED = "warmup", "capture", "replay", "compiled"

# (optimizer index, stepping call?, batch signature)
GraphKey = Tuple[int, bool, Hashable]


class NotCapturable(Exception):
    """A batch or a step that a CUDA graph cannot serve; the reason is the message."""


def batch_signature(batch: Any) -> Hashable:
    """A hashable key that changes whenever a captured graph could not serve ``batch``.

    Tensor leaves contribute shape, stride, dtype, device and ``requires_grad``; other
    leaves (ints, strings, None) their type and value, since the traced step saw them as
    constants. Raises :class:`NotCapturable` for a leaf that cannot be hashed.
    """
    leaves, spec = tree_flatten(batch)
    parts: List[Hashable] = [str(spec)]
    for leaf in leaves:
        if isinstance(leaf, Tensor):
            if leaf.layout != torch.strided:
                raise NotCapturable(f"a batch holds a {leaf.layout} tensor; only strided tensors can be captured")
            parts.append(("T", tuple(leaf.shape), leaf.stride(), leaf.dtype, str(leaf.device), leaf.requires_grad))
        else:
            try:
                hash(leaf)
            except TypeError:
                raise NotCapturable(f"a batch holds an unhashable {type(leaf).__name__}") from None
            parts.append(("V", type(leaf).__name__, leaf))
    return tuple(parts)


def check_batch_device(batch: Any, device_type: str) -> None:
    """Raise :class:`NotCapturable` unless every tensor of ``batch`` is on ``device_type``."""
    for leaf in tree_flatten(batch)[0]:
        if isinstance(leaf, Tensor) and leaf.device.type != device_type:
            raise NotCapturable(f"a batch tensor is on {leaf.device.type}, not {device_type}")


class StaticBatch:
    """Long-lived copies of one batch signature's tensors; :meth:`load` refills them in place."""

    def __init__(self, example: Any) -> None:
        leaves, self._spec = tree_flatten(example)
        # empty_strided keeps the example's strides (part of the signature)
        self._leaves = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
                        if isinstance(t, Tensor) else t for t in leaves]
        self.batch = tree_unflatten(self._leaves, self._spec)

    def load(self, batch: Any) -> Any:
        """Copy ``batch`` into the static buffers (async on CUDA) and return the static batch."""
        leaves, _ = tree_flatten(batch)
        for static, leaf in zip(self._leaves, leaves):
            if isinstance(static, Tensor):
                static.copy_(leaf, non_blocking=True)  # no sync: device-to-device or pinned copy
        return self.batch


def persistent_key(tree: Any) -> Tuple[Tuple[int, Tuple[int, ...], torch.dtype], ...]:
    """Addresses (``data_ptr``), shapes and dtypes of the tensors in ``tree``; host metadata only."""
    leaves, _ = tree_flatten(tree)
    return tuple((t.data_ptr(), tuple(t.shape), t.dtype) for t in leaves if isinstance(t, Tensor))


@dataclass
class CapturePlanner:
    """Decides how each call is served; never allows unbounded capturing.

    A new batch signature is admitted while fewer than ``max_signatures`` are; each
    admitted ``(optimizer, stepping, signature)`` key runs ``warmup_steps`` real steps
    uncaptured (at least one: the first call compiles, which must not happen during
    capture), is then captured, and replayed from then on. Signatures past the bound run
    the compiled step for good (``rejected`` tells the caller to warn once). When the
    persistent inputs of a step were replaced (e.g. ``optimizer.load_state_dict``),
    :meth:`invalidate` drops its graphs; past ``max_recaptures`` capturing stops.
    """

    max_signatures: int
    warmup_steps: int
    max_recaptures: int = 4
    warmups: Dict[GraphKey, int] = field(default_factory=dict)
    captured: Set[GraphKey] = field(default_factory=set)
    admitted: List[Hashable] = field(default_factory=list)
    rejected: Set[Hashable] = field(default_factory=set)
    recaptures: int = 0
    disabled: Optional[str] = None

    def action(self, key: GraphKey) -> Tuple[str, bool]:
        """``(action, newly_rejected)`` for a call with ``key``; records the warm-up."""
        if self.disabled is not None:
            return COMPILED, False
        if key in self.captured:
            return REPLAY, False
        signature = key[2]
        if signature not in self.admitted:
            if len(self.admitted) >= self.max_signatures:
                newly = signature not in self.rejected
                self.rejected.add(signature)
                return COMPILED, newly
            self.admitted.append(signature)
        done = self.warmups.get(key, 0)
        if done < max(1, self.warmup_steps):
            self.warmups[key] = done + 1
            return WARMUP, False
        return CAPTURE, False

    def mark_captured(self, key: GraphKey) -> None:
        self.captured.add(key)

    def invalidate(self, opt_idx: int) -> bool:
        """Forget the graphs of ``opt_idx``; False (and capturing disabled) past the bound."""
        self.recaptures += 1
        self.captured = {k for k in self.captured if k[0] != opt_idx}
        if self.recaptures > self.max_recaptures:
            self.disable(f"the persistent inputs of the step were replaced {self.recaptures} times "
                         f"(more than {self.max_recaptures}); not capturing again")
            return False
        return True

    def disable(self, reason: str) -> None:
        if self.disabled is None:
            self.disabled = reason
        self.captured.clear()

    @property
    def graph_count(self) -> int:
        return len(self.captured)
