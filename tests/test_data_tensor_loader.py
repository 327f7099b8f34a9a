"""TensorLoader: parity of the two gatherers, order, resume, sharding, errors and shutdown."""
import gc
import os
import threading

import pytest
import torch

import fastloop.data.tensor_loader as tl
from fastloop import _ext
from fastloop.data import TensorLoader
from fastloop.data._order import epoch_order

# Most tests use small rows; exercise the C++ worker thread unless a test says otherwise.
pytestmark = pytest.mark.usefixtures("threaded_gather")

BACKENDS = ["native", "python"]


@pytest.fixture
def native():
    """The extension module; skips without it, unless FASTLOOP_REQUIRE_EXT=1 (then fails)."""
    if _ext.available():
        return _ext.load()
    if os.environ.get("FASTLOOP_REQUIRE_EXT") == "1":
        pytest.fail(f"FASTLOOP_REQUIRE_EXT=1 but the extension is unavailable: {_ext.reason()}")
    pytest.skip(f"C++ extension not built: {_ext.reason()}")


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "native":
        request.getfixturevalue("native")
    return request.param


def dataset(n=103):
    x = torch.randn(n, 5)
    y = torch.arange(n)
    img = torch.randint(0, 255, (n, 2, 3), dtype=torch.uint8)
    return x, y, img


def run_epochs(loader, epochs):
    return [[tuple(t.clone() for t in batch) for batch in loader] for _ in range(epochs)]


def assert_same(a, b):
    assert len(a) == len(b)
    for ea, eb in zip(a, b):
        assert len(ea) == len(eb)
        for ba, bb in zip(ea, eb):
            assert all(torch.equal(u, v) for u, v in zip(ba, bb))


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_native_and_python_yield_identical_batches(native, shuffle, drop_last):
    data = dataset()
    kw = dict(batch_size=16, shuffle=shuffle, drop_last=drop_last, seed=7)
    nat = run_epochs(TensorLoader(*data, backend="native", **kw), 3)
    py = run_epochs(TensorLoader(*data, backend="python", **kw), 3)
    assert_same(nat, py)
    assert len(nat[0]) == (6 if drop_last else 7)
    for epoch in nat:  # and both equal plain indexing, rows matched through the label column
        for x, y, img in epoch:
            assert torch.equal(x, data[0][y]) and torch.equal(img, data[2][y])
    if shuffle:
        assert not torch.equal(nat[0][0][1], nat[1][0][1])  # a new permutation each epoch


def test_epoch_covers_every_row_once(backend):
    x, y, _ = dataset()
    seen = torch.cat([b for _, b in TensorLoader(x, y, batch_size=10, shuffle=True,
                                                 backend=backend)])
    assert sorted(seen.tolist()) == list(range(103))


def test_single_tensor_yields_tensor_and_batches_are_fresh(backend):
    x = torch.arange(40.0).reshape(20, 2)
    batches = list(TensorLoader(x, batch_size=3, backend=backend, prefetch=3))
    assert all(isinstance(b, torch.Tensor) for b in batches)
    assert torch.equal(torch.cat(batches), x)  # kept batches were never overwritten


def test_huge_seed_and_epoch_are_valid():
    order = epoch_order(10, seed=2**70, epoch=2**40, shuffle=True, rank=0, world_size=1)
    assert sorted(order.tolist()) == list(range(10))


def test_order_ignores_global_rng(backend):
    x, y, _ = dataset()
    torch.manual_seed(1)
    a = run_epochs(TensorLoader(x, y, batch_size=8, shuffle=True, seed=3, backend=backend), 2)
    torch.manual_seed(2)
    b = run_epochs(TensorLoader(x, y, batch_size=8, shuffle=True, seed=3, backend=backend), 2)
    assert_same(a, b)


def test_set_epoch_selects_the_permutation(backend):
    x, y, _ = dataset()
    ref = run_epochs(TensorLoader(x, y, batch_size=8, shuffle=True, backend=backend), 3)
    loader = TensorLoader(x, y, batch_size=8, shuffle=True, backend=backend)
    loader.set_epoch(2)
    assert_same(run_epochs(loader, 1), ref[2:3])
    assert loader.epoch == 3


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_mid_epoch_resume_is_exact(backend, prefetch):
    x, y, _ = dataset()
    kw = dict(batch_size=8, shuffle=True, seed=11, prefetch=prefetch, backend=backend)
    ref = run_epochs(TensorLoader(x, y, **kw), 3)  # epochs 0, 1, 2 uninterrupted

    first = TensorLoader(x, y, **kw)
    for _ in run_epochs(first, 1):
        pass
    it = iter(first)
    for _ in range(5):
        next(it)
    state = first.state_dict()
    assert state == {"seed": 11, "epoch": 1, "next_batch": 5, "format": 1}

    resumed = TensorLoader(x, y, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # a trainer calling set_epoch at the start of the resumed epoch
    rest = run_epochs(resumed, 2)
    assert_same([rest[0]], [ref[1][5:]])
    assert_same([rest[1]], [ref[2]])


def test_resume_accepts_any_next_batch_up_to_len(backend):
    x, y, _ = dataset()
    kw = dict(batch_size=10, shuffle=True, backend=backend)
    ref = run_epochs(TensorLoader(x, y, **kw), 2)
    loader = TensorLoader(x, y, **kw)
    loader.load_state_dict({"seed": 0, "epoch": 0, "next_batch": len(loader), "format": 1})
    assert list(loader) == []
    assert_same(run_epochs(loader, 1), ref[1:])
    for bad, match in [({"seed": 0, "epoch": 0, "next_batch": 12, "format": 1}, "past the end"),
                       ({"seed": 0, "epoch": 0, "next_batch": -1, "format": 1}, "next_batch"),
                       ({"seed": 0, "epoch": 0, "next_batch": 0, "format": 2}, "format"),
                       ({"epoch": 0, "next_batch": 0, "format": 1}, "missing")]:
        with pytest.raises(ValueError, match=match):
            loader.load_state_dict(bad)


def test_abandoned_iteration_moves_to_next_epoch(backend):
    x, y, _ = dataset()
    loader = TensorLoader(x, y, batch_size=8, shuffle=True, backend=backend)
    ref = run_epochs(TensorLoader(x, y, batch_size=8, shuffle=True, backend=backend), 2)
    for _ in loader:
        break
    assert loader.state_dict()["next_batch"] == 1
    assert_same(run_epochs(loader, 1), ref[1:])


@pytest.mark.parametrize("shuffle", [False, True])
def test_shards_are_disjoint_and_equal(backend, shuffle):
    x, y, _ = dataset(100)
    shards = []
    for rank in range(3):
        loader = TensorLoader(x, y, batch_size=7, shuffle=shuffle, rank=rank, world_size=3,
                              backend=backend)
        assert len(loader) == 5  # 33 rows each; 1 row of the permutation is dropped
        shards.append(torch.cat([b for _, b in loader]).tolist())
    assert all(len(s) == 33 for s in shards)
    union = set().union(*map(set, shards))
    assert len(union) == 99 and union <= set(range(100))


def test_worker_error_keeps_type_and_message(backend, monkeypatch):
    x, y, _ = dataset(50)

    def bad_order(n_rows, **kw):
        order = epoch_order(n_rows, **kw)
        order[13] = n_rows + 5  # batch 1, position 3
        return order

    monkeypatch.setattr(tl, "epoch_order", bad_order)
    loader = TensorLoader(x, y, batch_size=10, backend=backend)
    it = iter(loader)
    next(it)
    with pytest.raises(IndexError, match=r"^index 55 at batch position 3 is out of range for a "
                                         r"source with 50 rows$"):
        next(it)
    with pytest.raises(StopIteration):  # the iterator is closed after the error
        next(it)
    if backend == "native":
        assert _ext.load().live_workers() == 0


def test_no_thread_survives(native, monkeypatch):
    x, y, _ = dataset()
    threads = threading.active_count()
    assert native.live_workers() == 0

    loader = TensorLoader(x, y, batch_size=8, backend="native")
    for _ in loader:  # early break
        break
    assert native.live_workers() == 0

    it = iter(loader)
    next(it)
    assert native.live_workers() == 1
    del it, loader
    gc.collect()
    assert native.live_workers() == 0

    list(TensorLoader(x, batch_size=8, backend="native"))  # normal end
    assert native.live_workers() == 0

    monkeypatch.setattr(tl, "epoch_order", lambda n_rows, **kw: torch.full((n_rows,), n_rows))
    with pytest.raises(IndexError):
        list(TensorLoader(x, batch_size=8, backend="native"))
    assert native.live_workers() == 0
    assert threading.active_count() == threads


def test_pinned_ring_batches_stay_valid_for_prefetch_plus_one_requests(backend, monkeypatch):
    # Exercise the ring without CUDA: same logic, unpinned buffers.
    real = tl.RingBuffers
    monkeypatch.setattr(tl, "RingBuffers", lambda src, bs, p, pin: real(src, bs, p, pin=False))
    x = torch.arange(60.0).reshape(30, 2)
    prefetch = 2
    loader = TensorLoader(x, batch_size=4, prefetch=prefetch, backend=backend)
    loader.pin_memory = True
    got = []
    for i, b in enumerate(loader):
        got.append(b)
        oldest_valid = max(0, i - prefetch)  # batch i - prefetch - 1 may now be overwritten
        for j in range(oldest_valid, i + 1):
            assert torch.equal(got[j], x[4 * j:4 * j + 4])
        if i >= 2 * prefetch + 1:  # the ring really is reused
            assert got[i].data_ptr() == got[i - 2 * prefetch - 1].data_ptr()
    assert len(got) == 8 and got[-1].shape == (2, 2)


def test_pin_memory_without_cuda_warns(backend):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.warns(RuntimeWarning, match="pin_memory"):
        loader = TensorLoader(torch.zeros(6, 2), batch_size=4, pin_memory=True, backend=backend)
    assert not loader.pin_memory and len(list(loader)) == 2


def test_fallback_warns_once(monkeypatch, recwarn):
    monkeypatch.setattr(_ext.gather_ext, "_state", (None, "fastloop._C is not built: test"))
    monkeypatch.delenv("FASTLOOP_REQUIRE_EXT", raising=False)
    monkeypatch.setattr(tl, "_warned_fallback", False)
    a = TensorLoader(torch.zeros(4, 2), batch_size=2)
    b = TensorLoader(torch.zeros(4, 2), batch_size=2)
    assert a.backend == b.backend == "python"
    msgs = [str(w.message) for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "fastloop._C is not built: test" in msgs[0]
    with pytest.raises(RuntimeError, match="backend='native'.*not built: test"):
        TensorLoader(torch.zeros(4, 2), batch_size=2, backend="native")


def test_backend_attribute(native):
    assert TensorLoader(torch.zeros(4, 2), batch_size=2).backend == "native"
    assert TensorLoader(torch.zeros(4, 2), batch_size=2, backend="python").backend == "python"


@pytest.mark.parametrize("args, kwargs, exc, match", [
    ((), {}, ValueError, "at least one tensor"),
    ((torch.zeros(4, 2), [1, 2, 3, 4]), {}, TypeError, "argument 1 is a list"),
    ((torch.zeros(4, 2), torch.zeros(2, 4).t()), {}, ValueError, "argument 1 is not contiguous"),
    ((torch.zeros(4, 2), torch.zeros(3)), {}, ValueError,
     "different first dimensions: argument 0 has 4, argument 1 has 3"),
    ((torch.zeros(0, 2),), {}, ValueError, "empty dataset"),
    ((torch.zeros(4, 2, device="meta"),), {}, ValueError, "argument 0 is on meta"),
    ((torch.tensor(1.0),), {}, ValueError, "argument 0 is 0-dimensional"),
    ((torch.zeros(4, 2).to_sparse(),), {}, ValueError, "argument 0 has layout"),
    ((torch.zeros(4, 2, dtype=torch.complex64).conj(),), {}, ValueError, "lazy conj"),
    ((torch.zeros(4, 2),), {"batch_size": 0}, ValueError, "batch_size must be an int >= 1"),
    ((torch.zeros(4, 2),), {"seed": -1}, ValueError, "seed must be an int >= 0"),
    ((torch.zeros(4, 2),), {"batch_size": 2.0}, ValueError, "batch_size"),
    ((torch.zeros(4, 2),), {"prefetch": -1}, ValueError, "prefetch"),
    ((torch.zeros(4, 2),), {"rank": 2, "world_size": 2}, ValueError, "rank 2 is out of range"),
    ((torch.zeros(4, 2),), {"rank": 0}, ValueError, "both rank and world_size"),
    ((torch.zeros(4, 2),), {"rank": 0, "world_size": 5}, ValueError, "4 rows cannot be split"),
    ((torch.zeros(4, 2),), {"backend": "cuda"}, ValueError, "backend must be"),
])
def test_bad_input_is_named(args, kwargs, exc, match):
    kwargs = {"batch_size": 2, **kwargs}
    with pytest.raises(exc, match=match):
        TensorLoader(*args, **kwargs)
