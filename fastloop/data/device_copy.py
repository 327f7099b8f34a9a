"""Copy the next batch to the GPU on a side stream while the current step runs.

:class:`DeviceCopier` is driven by ``DataFetcher``, which keeps one batch in hand: when a
batch is fetched, :meth:`DeviceCopier.start` enqueues its host-to-device copies on a side
stream (``non_blocking=True`` from pinned memory; pageable tensors are pinned first) and
records an event; when the loop takes the batch, :meth:`DeviceCopier.finish` makes the
compute stream wait for that event (a device-side wait, no host sync) and marks the device
tensors with ``record_stream`` so the caching allocator does not hand their memory to the
side stream while the compute stream may still read it. The pattern is torchrec's (see
``perf_anchors.md`` 5.2).

Host buffers that the loader reuses (``TensorLoader(pin_memory=True)``'s pinned ring) must
not be rewritten before their copy has run: before the fetcher asks the loader for the
next batch, :meth:`DeviceCopier.before_next_fetch` waits on the host for the previous copy
of such a buffer only (the copy was issued a step earlier, so this rarely blocks). Tensors
pinned here are safe without it: the caching host allocator keeps them until their copy is
done.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["DeviceCopier", "InFlight"]


@dataclass
class InFlight:
    """A batch whose device copies were enqueued; ``event`` marks their completion."""

    batch: Any
    event: Any
    reuses_host_buffers: bool


class DeviceCopier:
    """Side-stream host-to-device copies of batches (CUDA only)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self._host_reuse_event: Optional[Any] = None

    def start(self, batch: Any) -> InFlight:
        """Enqueue the copies of ``batch``'s CPU tensors; returns at once."""
        leaves, spec = tree_flatten(batch)
        # No wait on the compute stream: the copies write fresh memory (allocated on the side
        # stream; record_stream in finish() keeps it from being reused too early).
        external = False
        out: List[Any] = []
        with torch.cuda.stream(self.stream):
            for leaf in leaves:
                if isinstance(leaf, Tensor) and leaf.device.type == "cpu":
                    pinned = leaf.is_pinned()
                    external = external or pinned
                    source = leaf if pinned else leaf.pin_memory()
                    out.append(source.to(self.device, non_blocking=True))
                else:
                    out.append(leaf)
            event = torch.cuda.Event()
            event.record(self.stream)
        if external:
            self._host_reuse_event = event
        return InFlight(tree_unflatten(out, spec), event, external)

    def finish(self, inflight: InFlight) -> Any:
        """Make the current stream wait for the copies (no host sync) and hand the batch over."""
        current = torch.cuda.current_stream(self.device)
        current.wait_event(inflight.event)
        for leaf in tree_flatten(inflight.batch)[0]:
            if isinstance(leaf, Tensor) and leaf.device.type == "cuda":
                leaf.record_stream(current)
        return inflight.batch

    def before_next_fetch(self) -> None:
        """Wait until the last copy out of a loader-owned pinned buffer has run."""
        event, self._host_reuse_event = self._host_reuse_event, None
        if event is not None and not event.query():  # query() does not block
            # Host sync on the copy stream only (not on compute), for loader-reused pinned
            # buffers whose copy, issued one batch ago, has not run yet; normally skipped.
            event.synchronize()
