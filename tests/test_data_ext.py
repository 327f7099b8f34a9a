"""fastloop._ext (loading the C++ extension, recording why not) and fastloop._C itself."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastloop import _ext

# Most tests use small rows; exercise the C++ worker thread unless a test says otherwise.
pytestmark = pytest.mark.usefixtures("threaded_gather")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def native():
    """The extension module; skips without it, unless FASTLOOP_REQUIRE_EXT=1 (then fails)."""
    if _ext.available():
        return _ext.load()
    if os.environ.get("FASTLOOP_REQUIRE_EXT") == "1":
        pytest.fail(f"FASTLOOP_REQUIRE_EXT=1 but the extension is unavailable: {_ext.reason()}")
    pytest.skip(f"C++ extension not built: {_ext.reason()}")


@pytest.fixture
def fresh_ext(monkeypatch):
    """Forget the cached load result before and after a test that changes the environment."""
    monkeypatch.delenv("FASTLOOP_NO_EXT", raising=False)
    monkeypatch.delenv("FASTLOOP_REQUIRE_EXT", raising=False)
    _ext._reset()
    yield monkeypatch
    _ext._reset()


def test_required_extension_is_available():
    if os.environ.get("FASTLOOP_REQUIRE_EXT") != "1":
        pytest.skip("FASTLOOP_REQUIRE_EXT is not set")
    assert _ext.available(), _ext.reason()


def test_available_and_reason_agree():
    assert _ext.available() == (_ext.load() is not None)
    assert isinstance(_ext.reason(), str) and _ext.reason()


def test_reason_names_the_loaded_file(native):
    assert native.__file__ in _ext.reason()


def test_no_ext_disables_loading(fresh_ext):
    fresh_ext.setenv("FASTLOOP_NO_EXT", "1")
    assert _ext.load() is None
    assert not _ext.available()
    assert _ext.reason() == "disabled by FASTLOOP_NO_EXT=1"
    fresh_ext.setenv("FASTLOOP_REQUIRE_EXT", "1")  # switching it off on purpose wins
    assert _ext.load() is None


def test_missing_module_is_recorded_and_required_raises(fresh_ext):
    fresh_ext.setattr(_ext, "_MODULE_NAME", "fastloop._no_such_ext")
    assert _ext.load() is None
    assert _ext.reason().startswith("fastloop._no_such_ext is not built")
    assert "No module named" in _ext.reason()
    fresh_ext.setenv("FASTLOOP_REQUIRE_EXT", "1")
    with pytest.raises(ImportError, match="FASTLOOP_REQUIRE_EXT=1 .*not built"):
        _ext.load()


def test_stale_binary_is_rejected(native, fresh_ext):
    fresh_ext.setattr(_ext, "_ABI_VERSION", 999)
    assert _ext.load() is None
    assert "stale" in _ext.reason() and "expected 999" in _ext.reason()


def test_no_ext_subprocess_warns_and_uses_python():
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('always')\n"
        "from fastloop.data import TensorLoader\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    a = TensorLoader(torch.zeros(4, 2), batch_size=2)\n"
        "    b = TensorLoader(torch.zeros(4, 2), batch_size=2)\n"
        "msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]\n"
        "print(a.backend, b.backend, len(msgs))\n"
        "print(msgs[0])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FASTLOOP_REQUIRE_EXT"}
    env["FASTLOOP_NO_EXT"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()[:2]
    assert first == "python python 1"  # one warning per process
    assert "disabled by FASTLOOP_NO_EXT=1" in second


# --- the native module's own contract ---------------------------------------------------------

def _copies(src, dst):
    return [(src.data_ptr(), dst.data_ptr(), src[0].numel() * src.element_size(), src.shape[0])]


def test_sync_gather_copies_rows(native):
    src = torch.arange(30, dtype=torch.int16).reshape(10, 3)
    idx = torch.tensor([9, 0, 1, 2, 5], dtype=torch.int64)
    dst = torch.empty(5, 3, dtype=torch.int16)
    native.gather(_copies(src, dst), idx.data_ptr(), 5)
    assert torch.equal(dst, src[idx])


def test_sync_gather_out_of_range(native):
    src, dst = torch.zeros(4, 2), torch.zeros(2, 2)
    idx = torch.tensor([1, 4], dtype=torch.int64)
    with pytest.raises(IndexError, match="index 4 at batch position 1 is out of range .* 4 rows"):
        native.gather(_copies(src, dst), idx.data_ptr(), 2)


def test_gatherer_queue_is_bounded_and_close_joins(native):
    base = native.live_workers()
    g = native.Gatherer(2)
    assert native.live_workers() == base + 1
    src = torch.randn(8, 4)
    idx = torch.tensor([3, 1], dtype=torch.int64)
    outs = [torch.empty(2, 4) for _ in range(3)]
    g.submit(_copies(src, outs[0]), idx.data_ptr(), 2, (outs[0], idx))
    g.submit(_copies(src, outs[1]), idx.data_ptr(), 2, (outs[1], idx))
    with pytest.raises(RuntimeError, match="queue is full"):
        g.submit(_copies(src, outs[2]), idx.data_ptr(), 2, (outs[2], idx))
    g.wait()
    g.wait()
    assert torch.equal(outs[0], src[idx]) and torch.equal(outs[1], src[idx])
    with pytest.raises(RuntimeError, match="no job"):
        g.wait()
    g.close()
    g.close()  # idempotent
    assert native.live_workers() == base
    with pytest.raises(RuntimeError, match="closed"):
        g.submit(_copies(src, outs[2]), idx.data_ptr(), 2, None)


def test_gatherer_destructor_joins(native):
    base = native.live_workers()
    g = native.Gatherer(1)
    src, dst = torch.randn(4, 2), torch.empty(1, 2)
    idx = torch.tensor([2], dtype=torch.int64)
    g.submit(_copies(src, dst), idx.data_ptr(), 1, (dst, idx))  # never waited for
    del g
    assert native.live_workers() == base


def test_gatherer_rejects_bad_depth(native):
    with pytest.raises(ValueError, match="depth"):
        native.Gatherer(0)
