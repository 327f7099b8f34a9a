"""Fetch batches one ahead of the loop, so the loop knows which batch is the last one.

Knowing the last batch in advance matters for loaders without ``len()``: end-of-epoch work
(the final accumulation step, end-of-epoch validation and schedulers) happens on that batch.

With a ``copier`` (``DeviceCopier``, CUDA only) the batch in hand is already being copied to
the device on a side stream while the loop works on the current one; ``next()`` hands out
the current batch after making the compute stream wait for its copy. Without one (CPU, or
user transfer hooks) batches pass through untouched.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Iterator, Optional, Union

from fastloop.seed import isolate_rng

_END = object()


class DataFetcher(Iterator[Any]):
    """Iterates ``iterable`` for at most ``limit`` batches, keeping one batch in hand."""

    def __init__(self, iterable: Iterable[Any], limit: Union[int, float] = math.inf, copier: Any = None,
                 name: str = "") -> None:
        self.iterable = iterable
        self.name = name  # the loader's hook (``train_dataloader``): an epoch without batches is warned about
        self.copier = copier
        self.limit = limit
        self.fetched = 0
        self.done = False
        self._iterator: Optional[Iterator[Any]] = None
        self._next: Any = _END

    def start(self, skip: int = 0) -> "DataFetcher":
        """Begin an epoch; discard the first ``skip`` batches (resuming a plain iterable)."""
        self._iterator = iter(self.iterable)
        self.fetched = 0
        if skip:
            # Fetching to discard must not shift the run's random draws (augmentations).
            with isolate_rng():
                for _ in range(skip):
                    if self._fetch(copy=False) is _END:
                        break
        self._next = self._fetch()
        self.done = self._next is _END
        if self.done and not skip and self.name and self.limit:
            # A loader of zero length was warned about (and skipped) already; this one has no len().
            warnings.warn(f"`{self.name}` ({type(self.iterable).__name__}) yielded no batch this epoch. Please make "
                          "sure this was your intention.", UserWarning, stacklevel=4)
        return self

    def _fetch(self, copy: bool = True) -> Any:
        if self.fetched >= self.limit:
            return _END
        if self.copier is not None:
            self.copier.before_next_fetch()
        try:
            batch = next(self._iterator)  # type: ignore[arg-type]
        except StopIteration:
            return _END
        self.fetched += 1
        if copy and self.copier is not None:
            return self.copier.start(batch)  # copies run while the current batch is processed
        return batch

    def __iter__(self) -> "DataFetcher":
        return self

    def __next__(self) -> Any:
        if self._next is _END:
            raise StopIteration
        batch, self._next = self._next, self._fetch()
        self.done = self._next is _END
        if self.copier is not None:
            batch = self.copier.finish(batch)
        return batch

    def close(self) -> None:
        """Drop the iterator so loader workers (threads, processes) can shut down."""
        self._iterator = None
        self._next = _END
