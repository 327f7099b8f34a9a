"""Small batches are gathered by the C++ code in the caller, without a worker thread."""
import pytest
import torch

from fastloop import _ext
from fastloop.data import TensorLoader

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"extension not built: {_ext.reason()}")


def test_small_batches_are_copied_inline_and_match_the_fallback():
    x = torch.arange(200 * 3, dtype=torch.float32).reshape(200, 3)
    y = torch.arange(200)
    native = TensorLoader(x, y, batch_size=16, shuffle=True, seed=3)
    python = TensorLoader(x, y, batch_size=16, shuffle=True, seed=3, backend="python")
    assert native.batch_bytes < 64 * 1024
    workers_before = _ext.load().live_workers()
    for _ in range(2):
        for (a, b), (c, d) in zip(native, python):
            assert torch.equal(a, c) and torch.equal(b, d)
            assert _ext.load().live_workers() == workers_before  # no thread was started
