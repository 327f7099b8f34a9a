"""Samples/s of in-memory batch loading: DataLoader, plain indexing, TensorLoader (both paths).

Run: ``python -m fastloop.bench.data_throughput`` (prints a JSON dict). Figures vary by 30 %
or more between runs on small shared machines; compare the ratios from one process only.
"""
from __future__ import annotations

import json
import statistics
import time
import warnings
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch.utils.data import DataLoader, TensorDataset

from fastloop import _ext
from fastloop.data import TensorLoader


def _plain_indexing(x: torch.Tensor, y: torch.Tensor, batch_size: int,
                    shuffle: bool) -> Callable[[], Iterable]:
    def epoch() -> Iterable:
        n = x.shape[0]
        order = torch.randperm(n) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            yield x[idx], y[idx]
    return epoch


def _time_epoch(make_epoch: Callable[[], Iterable]) -> float:
    t0 = time.perf_counter()
    rows = 0
    for xb, _ in make_epoch():
        rows += xb.shape[0]
    return rows / (time.perf_counter() - t0)


def measure_loader_throughput(n_rows: int = 60000, row_dim: int = 784, batch_size: int = 256,
                              epochs: int = 5, shuffle: bool = True,
                              num_threads: Optional[int] = None) -> Dict[str, float]:
    """Median samples/s per loader over ``epochs`` timed epochs (after one warm-up epoch each).

    ``num_threads`` sets torch's intra-op threads for the run (None: leave torch's default).
    On a busy machine with few cores, torch's default threading can make ``X[idx]`` (and so
    DataLoader and the Python fallback) much slower; the native gatherer does not use it.

    The loaders take turns epoch by epoch, so slow drifts of the machine hit all of them alike.
    Keys: ``dataloader``, ``plain_indexing``, ``tensorloader_native`` (absent when the
    extension is not built), ``tensorloader_python``, plus ``speedup_vs_dataloader`` and
    ``speedup_vs_indexing`` of the fastest TensorLoader.
    """
    saved_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _measure(n_rows, row_dim, batch_size, epochs, shuffle)
    finally:
        torch.set_num_threads(saved_threads)


def _measure(n_rows: int, row_dim: int, batch_size: int, epochs: int,
             shuffle: bool) -> Dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n_rows, row_dim, generator=gen)
    y = torch.randint(0, 10, (n_rows,), generator=gen)
    candidates: Dict[str, Callable[[], Iterable]] = {
        "dataloader": lambda: DataLoader(TensorDataset(x, y), batch_size=batch_size,
                                         shuffle=shuffle),
        "plain_indexing": _plain_indexing(x, y, batch_size, shuffle),
    }
    if _ext.available():
        native = TensorLoader(x, y, batch_size=batch_size, shuffle=shuffle, backend="native")
        candidates["tensorloader_native"] = lambda: native
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        python = TensorLoader(x, y, batch_size=batch_size, shuffle=shuffle, backend="python")
    candidates["tensorloader_python"] = lambda: python

    samples: Dict[str, List[float]] = {name: [] for name in candidates}
    for name, make in candidates.items():
        _time_epoch(make)  # warm-up
    for _ in range(epochs):
        for name, make in candidates.items():
            samples[name].append(_time_epoch(make))

    result = {name: statistics.median(v) for name, v in samples.items()}
    best = max(v for k, v in result.items() if k.startswith("tensorloader"))
    result["speedup_vs_dataloader"] = best / result["dataloader"]
    result["speedup_vs_indexing"] = best / result["plain_indexing"]
    return result


if __name__ == "__main__":
    for threads in (None, 1):
        result = measure_loader_throughput(num_threads=threads)
        label = f"torch threads: {threads or torch.get_num_threads()}"
        print(label, json.dumps({k: round(v, 2) for k, v in result.items()}, indent=2))
