"""Small batches: gathered a chunk at a time (one worker-thread handoff per chunk), or, for the
pinned ring's one-batch slots, copied by the C++ code in the caller."""
import pytest
import torch

from fastloop import _ext
from fastloop.data import TensorLoader

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"extension not built: {_ext.reason()}")


def test_small_batches_use_one_worker_thread_and_match_the_fallback():
    x = torch.arange(200 * 3, dtype=torch.float32).reshape(200, 3)
    y = torch.arange(200)
    native = TensorLoader(x, y, batch_size=16, shuffle=True, seed=3)
    python = TensorLoader(x, y, batch_size=16, shuffle=True, seed=3, backend="python")
    assert native.batch_bytes < 64 * 1024
    workers_before = _ext.load().live_workers()
    for _ in range(2):
        it = iter(native)
        assert it._per_job > 1 and _ext.load().live_workers() == workers_before + 1
        for (a, b), (c, d) in zip(it, python):
            assert torch.equal(a, c) and torch.equal(b, d)
        assert _ext.load().live_workers() == workers_before  # joined at the end of the epoch
    it = iter(native)
    next(it)
    del it  # abandoned mid-epoch: the worker is joined when the iterator goes away
    import gc

    gc.collect()
    assert _ext.load().live_workers() == workers_before


def test_inline_gatherer_copies_in_the_caller_and_matches_the_fallback():
    from fastloop.data._buffers import FreshBuffers
    from fastloop.data._gather import InlineNativeGatherer, PythonGatherer

    x = torch.randn(200, 3)
    y = torch.arange(200)
    order = torch.randperm(200)
    workers_before = _ext.load().live_workers()
    inline, python = InlineNativeGatherer([x, y], 2, _ext.load()), PythonGatherer([x, y], 2)
    buffers = FreshBuffers([x, y])
    for start in range(0, 200, 16):
        n = min(16, 200 - start)
        got, want = buffers.take(n), buffers.take(n)
        inline.submit(got, order, start, n)
        python.submit(want, order, start, n)
        inline.wait()
        python.wait()
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert torch.equal(got[1], order[start:start + n])
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
