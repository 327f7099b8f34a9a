"""TensorLoader: shuffled, sharded, resumable batches from in-memory CPU tensors.

Separation of concerns:

- ``_order.py`` decides which rows each batch holds (seed, epoch, rank, world size);
- ``_buffers.py`` decides where a batch is written (fresh tensors or a pinned ring);
- ``_gather.py`` copies the rows (C++ worker thread, or pure-torch fallback);
- this module validates the input, keeps the resume position and drives the pipeline.

Epoch bookkeeping, with ``position = (epoch, next_batch)``:

- a completed iteration moves to ``(epoch + 1, 0)``;
- ``iter()`` starts at ``position``; if the previous iterator stopped early, the abandoned epoch
  is skipped and the new iterator starts ``(epoch + 1, 0)``, so every ``iter()`` without
  ``set_epoch``/``load_state_dict`` sees a new permutation, as with a shuffling DataLoader;
- ``set_epoch(e)`` jumps to ``(e, 0)``, unless ``e`` is the epoch of a position not yet
  started (e.g. just loaded from a checkpoint), which it keeps;
- ``load_state_dict`` sets the position the next ``iter()`` starts from.
"""
from __future__ import annotations

import warnings
import weakref
from collections import deque
from typing import Any, Deque, Dict, Iterator, List, Optional, Tuple, Union

import torch

from fastloop import _ext
from fastloop.data._buffers import FreshBuffers, RingBuffers
from fastloop.data._gather import InlineNativeGatherer, NativeGatherer, PythonGatherer

# Batches smaller than this are "small": a thread handoff per batch (two condition-variable
# wake-ups) costs more than copying a few kilobytes (benchmarks/data_wait.py, batch 64 x 32
# floats: 11 % of the step waited with a handoff per batch, 3.5 % with an in-caller copy).
# So small batches are gathered several at a time: one allocation per source and one copy job
# for up to CHUNK_BYTES, split into batches (views), with one handoff per chunk to the worker
# thread, which then gathers while the step runs (compiled tiny-MLP fit, 2 x 5 runs: data wait
# 3.6 % of the step against 4.3 % with the chunk copied in the caller). Small batches for the
# pinned ring (one batch per slot) are copied in the caller.
INLINE_BATCH_BYTES = 64 * 1024
CHUNK_BYTES = 256 * 1024
MAX_BATCHES_PER_CHUNK = 32
from fastloop.data._order import epoch_order, num_batches, shard_size

Batch = Union[torch.Tensor, Tuple[torch.Tensor, ...]]

_STATE_FORMAT = 1
_warned_fallback = False  # warn about the Python fallback once per process


def _warn_fallback_once() -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"fastloop.data.TensorLoader uses its pure-Python gatherer: {_ext.reason()}",
                      RuntimeWarning, stacklevel=3)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_tensors(tensors: Tuple[Any, ...]) -> int:
    """Validate the sources; returns their common number of rows."""
    if not tensors:
        raise ValueError("TensorLoader needs at least one tensor")
    for i, t in enumerate(tensors):
        where = f"argument {i}"
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where} is a {type(t).__name__}, expected a torch.Tensor")
        if t.device.type != "cpu":
            raise ValueError(f"{where} is on {t.device}; TensorLoader gathers from CPU tensors "
                             "(move it with .cpu(), or index a GPU-resident dataset directly)")
        if t.layout != torch.strided:
            raise ValueError(f"{where} has layout {t.layout}; only dense tensors are supported")
        if t.dim() == 0:
            raise ValueError(f"{where} is 0-dimensional; rows are taken along dimension 0")
        if not t.is_contiguous():
            raise ValueError(f"{where} is not contiguous (shape {tuple(t.shape)}, stride "
                             f"{t.stride()}); pass tensor.contiguous()")
        if t.is_conj() or t.is_neg():
            raise ValueError(f"{where} has a lazy conj/neg bit; pass tensor.resolve_conj()"
                             ".resolve_neg()")
    rows = [t.shape[0] for t in tensors]
    if len(set(rows)) > 1:
        listed = ", ".join(f"argument {i} has {r}" for i, r in enumerate(rows))
        raise ValueError(f"tensors have different first dimensions: {listed}")
    if rows[0] == 0:
        raise ValueError("empty dataset: the tensors have 0 rows")
    return rows[0]


def _default_rank_world() -> Tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_shard(n_rows: int, rank: int, world_size: int) -> Tuple[int, int]:
    if rank >= world_size:
        raise ValueError(f"rank {rank} is out of range for world_size {world_size}")
    if shard_size(n_rows, world_size) == 0:
        raise ValueError(f"{n_rows} rows cannot be split across {world_size} ranks")
    return rank, world_size


class TensorLoader:
    """Batches of rows gathered from in-memory CPU tensors, prefetched by a C++ thread.

    Args:
        *tensors: contiguous CPU tensors with the same first dimension (any dtypes/shapes).
        batch_size: rows per batch.
        shuffle: permute the rows each epoch (permutation from ``(seed, epoch)`` only).
        drop_last: drop the last, smaller batch of each epoch.
        seed: base seed of the per-epoch permutations.
        prefetch: batches gathered ahead of the consumer (the worker's queue depth).
        pin_memory: gather into a ring of ``2 * prefetch + 1`` pinned buffer sets, for copying
            to the GPU at once. Such a batch stays valid until ``prefetch + 1`` further batches
            have been requested. Ignored (with a warning) without CUDA.
        rank, world_size: this process's shard; by default ``torch.distributed``'s, read at each
            ``iter()``/``len()`` (so a loader built before the process group is set up, e.g.
            before the ``Trainer``, still shards), else 0 and 1. Each rank gets
            ``len(dataset) // world_size`` rows of the epoch's permutation (the same permutation
            on every rank: it depends on ``seed`` and the epoch only); the remainder is dropped (a
            different remainder each epoch when shuffling), so shards are disjoint and
            equal-sized, and every rank runs the same number of batches.
        backend: ``"auto"`` (C++ if built, else the Python fallback with a one-time warning),
            ``"native"`` (error if the extension is unavailable) or ``"python"``.

    One iterator is meant to be consumed from one thread at a time.

    Yields:
        The batch tensor itself when one tensor was given, else a tuple with one batch tensor
        per source. Unless ``pin_memory`` is active, a batch is never overwritten later:
        batches under 64 KiB are views into a freshly allocated chunk of up to 32 consecutive
        batches (``CHUNK_BYTES``), larger ones are allocated one by one.

    Example:
        >>> loader = TensorLoader(torch.randn(10, 3), torch.arange(10), batch_size=4)
        >>> [tuple(x.shape) for x, y in loader]
        [(4, 3), (4, 3), (2, 3)]
    """

    def __init__(self, *tensors: torch.Tensor, batch_size: int, shuffle: bool = False,
                 drop_last: bool = False, seed: int = 0, prefetch: int = 2,
                 pin_memory: bool = False, rank: Optional[int] = None,
                 world_size: Optional[int] = None, backend: str = "auto") -> None:
        n_rows = _check_tensors(tensors)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.prefetch = _check_int("prefetch", prefetch, 0)
        self.seed = _check_int("seed", seed, 0)
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither")
        # None: follow torch.distributed (see the ``rank``/``world_size`` properties)
        self._shard: Optional[Tuple[int, int]] = None
        self._n_rows = n_rows
        if rank is not None:
            self._shard = _check_shard(n_rows, _check_int("rank", rank, 0),
                                       _check_int("world_size", world_size, 1))
        else:
            self._shard_now()
        self.tensors = tensors
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.pin_memory = bool(pin_memory)
        if self.pin_memory and not torch.cuda.is_available():
            warnings.warn("pin_memory=True has no effect without CUDA; batches are not pinned",
                          RuntimeWarning, stacklevel=2)
            self.pin_memory = False
        self._ext = self._pick_backend(backend)
        self.backend = "native" if self._ext is not None else "python"
        self.batch_bytes = batch_size * sum(t[:1].numel() * t.element_size() for t in self.tensors)
        self._epoch = 0
        self._next_batch = 0
        self._started = False  # has an iterator begun at the current position?
        self._active: Optional["weakref.ref[_EpochIterator]"] = None

    def __getstate__(self) -> Dict[str, Any]:
        # The extension is a module object and the live iterator a weak reference: neither
        # copies. A copy (``copy.deepcopy(trainer)``) looks the extension up again.
        state = dict(self.__dict__)
        state["_ext"] = self._ext is not None
        state["_active"] = None
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        state = dict(state)
        state["_ext"] = _ext.load() if state["_ext"] else None
        self.__dict__.update(state)

    @property
    def rank(self) -> int:
        """This process's shard: as given, else ``torch.distributed``'s rank (0 without a group)."""
        return self._shard_now()[0]

    @property
    def world_size(self) -> int:
        """Shards per epoch: as given, else ``torch.distributed``'s world size (1 without a group)."""
        return self._shard_now()[1]

    def _shard_now(self) -> Tuple[int, int]:
        if self._shard is not None:
            return self._shard
        return _check_shard(self._n_rows, *_default_rank_world())

    @staticmethod
    def _pick_backend(backend: str) -> Any:
        if backend == "python":
            return None
        if backend not in ("auto", "native"):
            raise ValueError(f"backend must be 'auto', 'native' or 'python', got {backend!r}")
        ext = _ext.load()
        if ext is None and backend == "native":
            raise RuntimeError(f"backend='native' but the C++ extension is unavailable: "
                               f"{_ext.reason()}")
        if ext is None:
            _warn_fallback_once()
        return ext

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return num_batches(shard_size(self._n_rows, self.world_size), self.batch_size,
                           self.drop_last)

    @property
    def epoch(self) -> int:
        """The epoch the next (or current) iteration belongs to."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s permutation for the next iteration, from its first batch.

        A position that no iterator has started yet (e.g. one just loaded with
        :meth:`load_state_dict`) is kept when ``epoch`` equals its epoch, so a trainer may call
        ``set_epoch`` at the start of every epoch, including a resumed one.
        """
        epoch = _check_int("epoch", epoch, 0)
        if self._started or epoch != self._epoch:
            self._epoch, self._next_batch, self._started = epoch, 0, False

    def state_dict(self) -> Dict[str, int]:
        """``{"seed", "epoch", "next_batch", "format"}``; ``next_batch`` counts the batches of
        ``epoch`` already yielded to the consumer (prefetched ones are not counted)."""
        return {"seed": self.seed, "epoch": self._epoch, "next_batch": self._next_batch,
                "format": _STATE_FORMAT}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Make the next ``iter()`` resume at batch ``next_batch`` of ``epoch``'s permutation.

        ``next_batch`` may be anything in ``[0, len(self)]`` (a trainer may write its own count
        of completed batches there); ``len(self)`` means the epoch is finished.
        """
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"unsupported TensorLoader state format {state.get('format')!r} "
                             f"(expected {_STATE_FORMAT})")
        missing = {"seed", "epoch", "next_batch"} - set(state)
        if missing:
            raise ValueError(f"TensorLoader state is missing {sorted(missing)}")
        next_batch = _check_int("next_batch", state["next_batch"], 0)
        if next_batch > len(self):
            raise ValueError(f"next_batch {next_batch} is past the end of an epoch of "
                             f"{len(self)} batches")
        self.seed = _check_int("seed", state["seed"], 0)
        self._epoch = _check_int("epoch", state["epoch"], 0)
        self._next_batch = next_batch
        self._started = False

    def __iter__(self) -> "_EpochIterator":
        if self._started:  # the previous iteration was abandoned: move on to a new epoch
            self._epoch, self._next_batch = self._epoch + 1, 0
        self._started = True
        rank, world_size = self._shard_now()
        order = epoch_order(self._n_rows, seed=self.seed, epoch=self._epoch,
                            shuffle=self.shuffle, rank=rank, world_size=world_size)
        it = _EpochIterator(self, order, self._next_batch)
        self._active = weakref.ref(it)
        return it

    # Called by the iterator; only the most recent iterator moves the loader's position.
    def _on_yield(self, it: "_EpochIterator", next_batch: int) -> None:
        if self._active is not None and self._active() is it:
            self._next_batch = next_batch

    def _on_epoch_end(self, it: "_EpochIterator") -> None:
        if self._active is not None and self._active() is it:
            self._epoch, self._next_batch, self._started = self._epoch + 1, 0, False


class _EpochIterator(Iterator[Batch]):
    """One pass over an epoch's order; keeps ``prefetch`` batches in flight.

    The gatherer (and its C++ thread) is closed when the epoch ends, when a gather fails, on
    :meth:`close`, and when the iterator is garbage-collected (e.g. after ``break``).
    """

    def __init__(self, loader: TensorLoader, order: torch.Tensor, start_batch: int) -> None:
        self._loader = loader
        self._order = order
        self._bs = loader.batch_size
        self._prefetch = loader.prefetch
        self._single = len(loader.tensors) == 1
        self._num_batches = len(loader)
        self._next_yield = self._next_submit = start_batch
        self._pending: Deque[List[torch.Tensor]] = deque()  # gather jobs in flight
        self._ready: Deque[Batch] = deque()  # batches split from a finished job
        small = loader.batch_bytes < INLINE_BATCH_BYTES
        # Batches per gather job: several for small batches (their outputs are views of one
        # chunk); one for large ones and for the pinned ring, whose slots hold one batch.
        self._per_job = 1
        if small and not loader.pin_memory:
            self._per_job = max(1, min(MAX_BATCHES_PER_CHUNK, CHUNK_BYTES // max(loader.batch_bytes, 1)))
        if loader.pin_memory:
            self._buffers: Any = RingBuffers(loader.tensors, self._bs, self._prefetch, pin=True)
        else:
            self._buffers = FreshBuffers(loader.tensors)
        if loader._ext is not None and small and self._per_job == 1:
            self._gatherer: Any = InlineNativeGatherer(loader.tensors, self._prefetch, loader._ext)
        elif loader._ext is not None:
            self._gatherer = NativeGatherer(loader.tensors, self._prefetch, loader._ext)
        else:
            self._gatherer = PythonGatherer(loader.tensors, self._prefetch)
        self._closed = False
        self._fill(self._prefetch)

    def _fill(self, depth: int) -> None:
        """Submit gather jobs until ``depth`` are in flight (or the epoch runs out)."""
        while len(self._pending) < depth and self._next_submit < self._num_batches:
            count = min(self._per_job, self._num_batches - self._next_submit)
            start = self._next_submit * self._bs
            n = min(count * self._bs, self._order.numel() - start)
            outs = self._buffers.take(n)
            self._gatherer.submit(outs, self._order, start, n)
            self._pending.append(outs)
            self._next_submit += count

    def __iter__(self) -> "_EpochIterator":
        return self

    def __next__(self) -> Batch:
        if self._closed:
            raise StopIteration
        if not self._ready:
            if self._next_yield >= self._num_batches:
                self.close()
                self._loader._on_epoch_end(self)
                raise StopIteration
            self._collect()
        self._next_yield += 1
        self._loader._on_yield(self, self._next_yield)
        return self._ready.popleft()

    def _collect(self) -> None:
        """Wait for the oldest gather job and queue its batches."""
        try:
            self._fill(max(self._prefetch, 1))
            self._gatherer.wait()
        except BaseException:
            self.close()  # join the worker before the error reaches the caller
            raise
        outs = self._pending.popleft()
        if self._per_job == 1:
            self._ready.append(outs[0] if self._single else tuple(outs))
        else:
            pieces = [out.split(self._bs) for out in outs]
            self._ready.extend(pieces[0] if self._single else zip(*pieces))
        self._fill(self._prefetch)

    def close(self) -> None:
        """Stop prefetching and join the worker thread (idempotent)."""
        if not self._closed:
            self._closed = True
            self._gatherer.close()
            self._pending.clear()
            self._ready.clear()

    def __del__(self) -> None:
        gatherer = getattr(self, "_gatherer", None)
        if gatherer is not None and not getattr(self, "_closed", True):
            gatherer.close()
