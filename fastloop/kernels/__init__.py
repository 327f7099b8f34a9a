"""Triton kernels for the GPU path: fused optimizer updates and gradient norm/clipping.

Importing this package never imports triton. The kernel modules (``optim_kernels``,
``grad_norm``, ``ops``) import triton at top level, so they are loaded lazily, on first
attribute access, and only when :func:`triton_available` is true. The flat arena
(:class:`FlatArena`) is pure torch and is always available.

Kernels run on CUDA tensors, or on CPU tensors through the Triton interpreter when
``TRITON_INTERPRET=1`` was set before triton was imported (slow; for tests only).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from typing import Any

from fastloop.kernels.arena import FlatArena

__all__ = [
    "FlatArena",
    "triton_available",
    "unavailable_reason",
    # lazily loaded (need triton):
    "sgd_update_",
    "adam_update_",
    "clip_grads_",
    "flat_grad_norm",
]

# public name -> module that defines it (imported on first access)
_LAZY = {
    "sgd_update_": "fastloop.kernels.optim_kernels",
    "adam_update_": "fastloop.kernels.optim_kernels",
    "clip_grads_": "fastloop.kernels.grad_norm",
    "flat_grad_norm": "fastloop.kernels.grad_norm",
}
_LAZY_MODULES = ("optim_kernels", "grad_norm", "ops")


def _triton_installed() -> bool:
    """Whether triton can be found, without importing it."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules['triton'] is None
        return False


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str:
    """Try to import triton once; return '' on success, else why it failed."""
    if not _triton_installed():
        return "triton is not installed"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken install raises more than ImportError
        return f"triton failed to import: {type(exc).__name__}: {exc}"
    return ""


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason() -> str:
    """Why the Triton kernels cannot run here; '' when they can."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a hard dependency
        has_cuda = False
    if not has_cuda and not _interpreter_on():
        # Checked before importing triton: importing it now would fix the interpreter
        # choice (TRITON_INTERPRET is read at import time).
        if not _triton_installed():
            return "triton is not installed"
        return "no CUDA device and TRITON_INTERPRET is not set"
    return _triton_import_error()


def triton_available() -> bool:
    """True when triton imports and there is a CUDA device or the interpreter is on."""
    return unavailable_reason() == ""


def __getattr__(name: str) -> Any:
    if name in _LAZY or name in _LAZY_MODULES:
        reason = unavailable_reason()
        if reason:
            raise ImportError(f"fastloop.kernels.{name} needs triton: {reason}")
        module_name = _LAZY.get(name, f"fastloop.kernels.{name}")
        module = importlib.import_module(module_name)
        return module if name in _LAZY_MODULES else getattr(module, name)
    raise AttributeError(f"module 'fastloop.kernels' has no attribute {name!r}")
