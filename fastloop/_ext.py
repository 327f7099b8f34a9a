"""The one place that loads the C++ extension ``fastloop._C`` and remembers why it could not.

Environment switches (read at the first :func:`load`):

- ``FASTLOOP_NO_EXT=1``: never load the extension; callers use their pure-Python fallback.
- ``FASTLOOP_REQUIRE_EXT=1``: a missing or stale extension raises ``ImportError`` with the
  reason (CI sets it to prove the extension builds). ``FASTLOOP_NO_EXT=1`` wins over it, since
  switching the extension off is then a deliberate choice.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Optional, Tuple

_MODULE_NAME = "fastloop._C"
_ABI_VERSION = 1  # must match ABI_VERSION in csrc/gather.cpp
_BUILD_HINT = "build it with `python setup.py build_ext --inplace` or `pip install .`"

_state: Optional[Tuple[Optional[ModuleType], str]] = None  # (module or None, reason)


def _try_import() -> Tuple[Optional[ModuleType], str]:
    if os.environ.get("FASTLOOP_NO_EXT") == "1":
        return None, "disabled by FASTLOOP_NO_EXT=1"
    try:
        mod = importlib.import_module(_MODULE_NAME)
    except ImportError as e:
        return None, f"{_MODULE_NAME} is not built ({_BUILD_HINT}): {e}"
    except Exception as e:  # a broken binary can fail in other ways; record it, don't crash
        return None, f"{_MODULE_NAME} failed to load: {type(e).__name__}: {e}"
    found = getattr(mod, "ABI_VERSION", None)
    if found != _ABI_VERSION:
        return None, (f"{_MODULE_NAME} at {mod.__file__} is stale (ABI_VERSION {found}, "
                      f"expected {_ABI_VERSION}); rebuild it: {_BUILD_HINT}")
    return mod, f"{_MODULE_NAME} loaded from {mod.__file__}"


def _get_state() -> Tuple[Optional[ModuleType], str]:
    global _state
    if _state is None:
        _state = _try_import()
    return _state


def load() -> Optional[ModuleType]:
    """Return the extension module, or None when it is unavailable (see :func:`reason`).

    Raises:
        ImportError: the extension is unavailable and ``FASTLOOP_REQUIRE_EXT=1`` is set.
    """
    mod, why = _get_state()
    if (mod is None and os.environ.get("FASTLOOP_REQUIRE_EXT") == "1"
            and os.environ.get("FASTLOOP_NO_EXT") != "1"):
        raise ImportError(f"FASTLOOP_REQUIRE_EXT=1 but the C++ extension is unavailable: {why}")
    return mod


def available() -> bool:
    """Whether the extension loaded (never raises)."""
    return _get_state()[0] is not None


def reason() -> str:
    """Human-readable account of the load: where it came from, or why it is unavailable."""
    return _get_state()[1]


def _reset() -> None:
    """Forget the cached result so the next call retries (tests change the environment)."""
    global _state
    _state = None
