"""Test-wide settings: determinism, and the Triton interpreter when there is no GPU."""
import os

# The interpreter must be chosen before anything imports triton.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch is a hard dependency
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Trainer's default mode "auto" compiles on a CPU (seconds per graph). Behaviour tests run
# eagerly unless they ask for a mode with the ``mode`` fixture below.
os.environ.setdefault("FASTLOOP_MODE", "eager")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic_defaults():
    """Every test starts from the same seed and full-precision matmuls."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def no_mode_override(monkeypatch):
    """Let the Trainer's ``mode`` argument decide (the suite pins FASTLOOP_MODE=eager)."""
    monkeypatch.delenv("FASTLOOP_MODE", raising=False)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def threaded_gather(monkeypatch):
    """Make every native TensorLoader use its C++ worker thread, however small its batches."""
    from fastloop.data import tensor_loader

    monkeypatch.setattr(tensor_loader, "INLINE_BATCH_BYTES", 0)


@pytest.fixture(autouse=True)
def _run_in_tmp_dir(tmp_path, monkeypatch):
    """Trainers write logs and checkpoints under the working directory by default (as
    Lightning's do): every test runs in its own empty one."""
    monkeypatch.chdir(tmp_path)
