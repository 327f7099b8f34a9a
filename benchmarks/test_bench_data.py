"""pytest-benchmark: one epoch-slice of batches per loader (not collected by default).

Run: ``PYTHONPATH=. python -m pytest benchmarks/test_bench_data.py --benchmark-group-by=group``
"""
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fastloop import _ext
from fastloop.data import TensorLoader

N_ROWS, ROW_DIM, BATCH = 60000, 784, 256
N_BATCHES = 50  # batches per timed round


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(N_ROWS, ROW_DIM, generator=gen), torch.randint(0, 10, (N_ROWS,),
                                                                        generator=gen)


def _consume(iterable):
    for i, _ in enumerate(iterable):
        if i + 1 == N_BATCHES:
            break


@pytest.mark.benchmark(group="data-shuffled-batch256")
def test_dataloader_tensordataset(benchmark, data):
    loader = DataLoader(TensorDataset(*data), batch_size=BATCH, shuffle=True)
    benchmark(_consume, loader)


@pytest.mark.benchmark(group="data-shuffled-batch256")
def test_plain_indexing(benchmark, data):
    x, y = data

    def run():
        order = torch.randperm(N_ROWS)
        for b in range(N_BATCHES):
            idx = order[b * BATCH:(b + 1) * BATCH]
            x[idx], y[idx]

    benchmark(run)


@pytest.mark.benchmark(group="data-shuffled-batch256")
@pytest.mark.parametrize("backend", ["native", "python"])
def test_tensorloader(benchmark, data, backend):
    if backend == "native" and not _ext.available():
        pytest.skip(f"C++ extension not built: {_ext.reason()}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        loader = TensorLoader(*data, batch_size=BATCH, shuffle=True, backend=backend)
    benchmark(_consume, loader)
