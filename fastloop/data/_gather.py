"""Two interchangeable batch gatherers with one interface: ``submit`` / ``wait`` / ``close``.

``submit(outs, order, start, n)`` queues "copy rows ``order[start:start + n]`` of every source
into ``outs``"; ``wait()`` finishes the oldest queued job and re-raises its error. Both produce
byte-identical batches.

- :class:`NativeGatherer`: a C++ thread (``fastloop._C``) does the copies with the GIL released
  while the consumer works on earlier batches.
- :class:`InlineNativeGatherer`: the same C++ row copy, run in the caller at ``wait()``; for
  small batches, where handing a few kilobytes to a thread costs more than copying them.
- :class:`PythonGatherer`: thread-free; ``wait()`` runs ``torch.index_select`` in the caller.
"""
from __future__ import annotations

from collections import deque
from types import ModuleType
from typing import Any, Deque, List, Sequence, Tuple

import torch


def _out_of_range_error(order: torch.Tensor, n_rows: int) -> IndexError:
    """The error the C++ worker raises for the first bad index, with the same message."""
    pos = int(((order < 0) | (order >= n_rows)).nonzero()[0, 0])
    return IndexError(f"index {int(order[pos])} at batch position {pos} is out of range for a "
                      f"source with {n_rows} rows")


class PythonGatherer:
    """Pure-torch fallback: gathers with ``index_select`` when the batch is waited for."""

    def __init__(self, sources: Sequence[torch.Tensor], depth: int) -> None:
        self._sources = list(sources)
        self._depth = max(depth, 1)
        self._jobs: Deque[Tuple[List[torch.Tensor], torch.Tensor]] = deque()

    def submit(self, outs: List[torch.Tensor], order: torch.Tensor, start: int, n: int) -> None:
        if len(self._jobs) >= self._depth:
            raise RuntimeError(f"queue is full ({self._depth} jobs outstanding)")
        self._jobs.append((outs, order[start:start + n]))

    def wait(self) -> None:
        outs, idx = self._jobs.popleft()
        n_rows = self._sources[0].shape[0]
        try:
            for src, out in zip(self._sources, outs):
                torch.index_select(src, 0, idx, out=out)
        except (IndexError, RuntimeError):
            if bool(((idx < 0) | (idx >= n_rows)).any()):
                raise _out_of_range_error(idx, n_rows) from None
            raise

    def close(self) -> None:
        self._jobs.clear()


class NativeGatherer:
    """Feeds jobs to a ``fastloop._C.Gatherer`` worker thread as raw pointers.

    Every job hands the C++ side references to its outputs and index tensor, which it keeps
    until the job is collected or the worker has been joined, so no buffer can be freed while
    the thread writes to it, whatever order the garbage collector picks.
    """

    def __init__(self, sources: Sequence[torch.Tensor], depth: int, ext: ModuleType) -> None:
        self._sources = list(sources)  # keep the source memory alive
        n_rows = sources[0].shape[0]
        # (source index, src_ptr, row_bytes, rows); zero-byte rows have nothing to copy.
        self._specs = [(i, t.data_ptr(), (t.numel() // n_rows) * t.element_size(), n_rows)
                       for i, t in enumerate(sources) if t.numel() > 0]
        self._ext = ext
        self._impl = self._start_worker(depth)

    def _start_worker(self, depth: int) -> Any:
        return self._ext.Gatherer(max(depth, 1))

    def _job(self, outs: List[torch.Tensor], order: torch.Tensor, start: int, n: int) -> Tuple[list, int, int]:
        """The raw-pointer description of one batch: ``(copies, idx_ptr, rows_to_copy)``."""
        if order.dtype != torch.int64 or not order.is_contiguous():
            raise ValueError(f"the index tensor must be contiguous int64, got {order.dtype}")
        copies = [(src, outs[i].data_ptr(), row_bytes, rows)
                  for i, src, row_bytes, rows in self._specs]
        idx_ptr = order.data_ptr() + start * 8  # int64 indices
        return copies, idx_ptr, n if copies else 0

    def submit(self, outs: List[torch.Tensor], order: torch.Tensor, start: int, n: int) -> None:
        self._impl.submit(*self._job(outs, order, start, n), (outs, order))

    def wait(self) -> None:
        self._impl.wait()

    def close(self) -> None:
        self._impl.close()


class InlineNativeGatherer(NativeGatherer):
    """``NativeGatherer``'s copies, done synchronously by ``fastloop._C.gather`` in ``wait()``."""

    def __init__(self, sources: Sequence[torch.Tensor], depth: int, ext: ModuleType) -> None:
        super().__init__(sources, depth, ext)
        self._jobs: Deque[Tuple[list, int, int, tuple]] = deque()

    def _start_worker(self, depth: int) -> None:
        return None  # copies run in the caller

    def submit(self, outs: List[torch.Tensor], order: torch.Tensor, start: int, n: int) -> None:
        # outs and order ride along so their memory outlives the copy
        self._jobs.append((*self._job(outs, order, start, n), (outs, order)))

    def wait(self) -> None:
        copies, idx_ptr, n, _keep_alive = self._jobs.popleft()
        self._ext.gather(copies, idx_ptr, n)

    def close(self) -> None:
        self._jobs.clear()

