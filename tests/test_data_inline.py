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


@pytest.mark.parametrize("backend", ["native", "python"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_chunked_small_batches_match_indexing_and_resume_inside_a_chunk(backend, drop_last, monkeypatch):
    """Small batches are gathered several at a time (here 3 per chunk: 103 rows of 24 bytes,
    batch 8) and split into views; boundaries, the partial last batch and a resume that starts
    in the middle of a chunk must not show."""
    from fastloop.data import tensor_loader

    monkeypatch.setattr(tensor_loader, "CHUNK_BYTES", 3 * 8 * 24)
    x = torch.randn(103, 2, dtype=torch.float64)
    y = torch.arange(103)
    kw = dict(batch_size=8, shuffle=True, seed=5, drop_last=drop_last, backend=backend)
    loader = TensorLoader(x, y, **kw)
    assert iter(loader)._per_job == 3
    loader = TensorLoader(x, y, **kw)
    epochs = [[(a.clone(), b.clone()) for a, b in loader] for _ in range(2)]
    expected_sizes = [8] * 12 + ([] if drop_last else [7])
    for epoch in epochs:
        assert [len(b) for _, b in epoch] == expected_sizes
        for a, b in epoch:
            assert torch.equal(a, x[b])  # rows matched through the label column
    seen = torch.cat([b for _, b in epochs[0]])
    assert len(set(seen.tolist())) == len(seen)

    resumed = TensorLoader(x, y, **kw)
    resumed.load_state_dict({"seed": 5, "epoch": 1, "next_batch": 4, "format": 1})  # batch 4: inside chunk 1
    rest = [(a.clone(), b.clone()) for a, b in resumed]
    assert len(rest) == len(epochs[1]) - 4
    for (a, b), (c, d) in zip(rest, epochs[1][4:]):
        assert torch.equal(a, c) and torch.equal(b, d)
