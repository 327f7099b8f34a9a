"""Output buffers that the gatherers fill: a fresh set per batch, or a reused (pinned) ring."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch


def _row_specs(sources: Sequence[torch.Tensor]) -> List[Tuple[Tuple[int, ...], torch.dtype]]:
    return [(tuple(t.shape[1:]), t.dtype) for t in sources]


class FreshBuffers:
    """Allocates new output tensors for every batch, so a yielded batch is never overwritten."""

    def __init__(self, sources: Sequence[torch.Tensor]) -> None:
        self._specs = _row_specs(sources)

    def take(self, n: int) -> List[torch.Tensor]:
        """Output tensors for a batch of ``n`` rows."""
        return [torch.empty((n, *shape), dtype=dtype) for shape, dtype in self._specs]


class RingBuffers:
    """A ring of ``2 * prefetch + 1`` preallocated buffer sets, reused in turn.

    At most ``prefetch`` batches are in flight while the consumer holds earlier ones, so the
    buffers of batch ``i`` are rewritten when batch ``i + prefetch + 1`` is requested. This is
    meant for pinned memory whose batches are copied to the GPU at once.
    """

    def __init__(self, sources: Sequence[torch.Tensor], batch_size: int, prefetch: int,
                 pin: bool) -> None:
        self.slots = [
            [torch.empty((batch_size, *shape), dtype=dtype, pin_memory=pin)
             for shape, dtype in _row_specs(sources)]
            for _ in range(2 * prefetch + 1)
        ]
        self._next = 0

    def take(self, n: int) -> List[torch.Tensor]:
        """Views of the next slot's first ``n`` rows."""
        slot = self.slots[self._next]
        self._next = (self._next + 1) % len(self.slots)
        return [buf[:n] for buf in slot]
