"""The one place that loads the C++ extensions (``fastloop._C``, the batch gatherer, and
``fastloop._lstm``, the LSTM time loop) and remembers why one could not.

Environment switches (read at the first :func:`load`):

- ``FASTLOOP_NO_EXT=1``: never load the extensions; callers use their pure-Python fallback.
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


class Extension:
    """One compiled module of the package: loaded at the first call, with the reason remembered."""

    def __init__(self, name: str, abi_version: int) -> None:
        self._name = name
        self._abi_version = abi_version  # must match ABI_VERSION in the module's csrc/ source
        self._state: Optional[Tuple[Optional[ModuleType], str]] = None  # (module or None, reason)

    @property
    def name(self) -> str:
        return self._name

    @property
    def abi_version(self) -> int:
        return self._abi_version

    def _try_import(self) -> Tuple[Optional[ModuleType], str]:
        if os.environ.get("FASTLOOP_NO_EXT") == "1":
            return None, "disabled by FASTLOOP_NO_EXT=1"
        try:
            mod = importlib.import_module(self.name)
        except ImportError as e:
            return None, f"{self.name} is not built ({_BUILD_HINT}): {e}"
        except Exception as e:  # a broken binary can fail in other ways; record it, don't crash
            return None, f"{self.name} failed to load: {type(e).__name__}: {e}"
        found = getattr(mod, "ABI_VERSION", None)
        if found != self.abi_version:
            return None, (f"{self.name} at {mod.__file__} is stale (ABI_VERSION {found}, "
                          f"expected {self.abi_version}); rebuild it: {_BUILD_HINT}")
        return mod, f"{self.name} loaded from {mod.__file__}"

    def _get_state(self) -> Tuple[Optional[ModuleType], str]:
        if self._state is None:
            self._state = self._try_import()
        return self._state

    def load(self) -> Optional[ModuleType]:
        """The module, or None when it is unavailable (see :meth:`reason`).

        Raises:
            ImportError: the module is unavailable and ``FASTLOOP_REQUIRE_EXT=1`` is set.
        """
        mod, why = self._get_state()
        if (mod is None and os.environ.get("FASTLOOP_REQUIRE_EXT") == "1"
                and os.environ.get("FASTLOOP_NO_EXT") != "1"):
            raise ImportError(f"FASTLOOP_REQUIRE_EXT=1 but the C++ extension is unavailable: {why}")
        return mod

    def available(self) -> bool:
        """Whether the module loaded (never raises)."""
        return self._get_state()[0] is not None

    def reason(self) -> str:
        """Human-readable account of the load: where it came from, or why it is unavailable."""
        return self._get_state()[1]


class _GatherExtension(Extension):
    """``fastloop._C`` (csrc/gather.cpp, the batch gatherer): its name and ABI version are read from
    this module's ``_MODULE_NAME``/``_ABI_VERSION`` at each load (tests patch them)."""

    name = property(lambda self: _MODULE_NAME)  # type: ignore[assignment]
    abi_version = property(lambda self: _ABI_VERSION)  # type: ignore[assignment]


gather_ext = _GatherExtension(_MODULE_NAME, _ABI_VERSION)
lstm_ext = Extension("fastloop._lstm", 1)  # csrc/lstm.cpp: the LSTM time loop (step/lstm_kernel.py)


def load() -> Optional[ModuleType]:
    """Return ``fastloop._C``, or None when it is unavailable (see :func:`reason`).

    Raises:
        ImportError: the extension is unavailable and ``FASTLOOP_REQUIRE_EXT=1`` is set.
    """
    return gather_ext.load()


def available() -> bool:
    """Whether ``fastloop._C`` loaded (never raises)."""
    return gather_ext.available()


def reason() -> str:
    """Human-readable account of loading ``fastloop._C``: where it came from, or why it is unavailable."""
    return gather_ext.reason()


def _reset() -> None:
    """Forget the cached results so the next calls retry (tests change the environment)."""
    for ext in (gather_ext, lstm_ext):
        ext._state = None
