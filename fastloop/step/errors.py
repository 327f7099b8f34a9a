"""Keeping the compiler's internals out of a user's error.

When a compiled step fails on its first call, the cause is usually the user's (a batch of the
wrong dtype or shape, a loss that does not require grad): the eager step, run on the same batch,
then raises the error eager mode raises, and that is the one the user sees. Only when the eager
step succeeds was it the compiler, and the loop falls back to eager with the reason.

While Dynamo traces, its fake-tensor layer logs each failed meta kernel with a full traceback at
ERROR level (``failed while attempting to run meta for aten.mm.default``, ~20 lines) before the
exception reaches us. ``quiet_compiler_errors`` holds those records back while a guarded call
runs (the direct calls of ``direct_call`` bypass it): they are replayed at DEBUG level on
fastloop's logger, so ``logging.getLogger("fastloop").setLevel(logging.DEBUG)`` shows them.
Records below ERROR (recompile warnings, say) pass as usual.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List

__all__ = ["quiet_compiler_errors", "quietly", "first_line"]

log = logging.getLogger("fastloop.step")

# torch gives many of its loggers their own handler (propagate=False); the filter goes on the
# handlers of every ``torch.*`` logger. This one logs the meta-kernel tracebacks: when its handler
# lacks the filter, torch has (re)configured logging and the filter is installed again.
_SENTINEL_LOGGER = "torch._subclasses.fake_tensor"


class _HoldErrors(logging.Filter):
    """While ``depth`` > 0, keeps ERROR records (and worse) back instead of letting the handler
    print them; otherwise lets everything through."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.held: List[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if self.depth and record.levelno >= logging.ERROR:
            if not any(held is record for held in self.held):  # one record meets several handlers
                self.held.append(record)
            return False
        return True


# One filter, installed on torch's handlers and switched on per call. Adding and
# removing a filter (after logging.getLogger) on every guarded call measured 11.6 µs, 2.5 % of a
# guarded tiny-MLP step (~460 µs) on the 2-core VM; this way costs 1.2 µs (0.3 %), and the
# direct calls that serve most steps do not pay it.
_HOLD = _HoldErrors()


def _install() -> None:
    """Put ``_HOLD`` on the handlers of torch's loggers, unless it is there already."""
    loggers = logging.Logger.manager.loggerDict  # no lock, unlike logging.getLogger
    sentinel = getattr(loggers.get(_SENTINEL_LOGGER), "handlers", None)  # a PlaceHolder has none
    if sentinel and all(_HOLD in handler.filters for handler in sentinel):
        return
    for name, logger in list(loggers.items()):
        if name.startswith("torch"):
            for handler in getattr(logger, "handlers", ()):
                if _HOLD not in handler.filters:
                    handler.addFilter(_HOLD)


def _replay_held() -> None:
    held, _HOLD.held = _HOLD.held, []
    for record in held:
        log.debug("torch.compile logged (%s): %s", record.name, record.getMessage(), exc_info=record.exc_info)


@contextmanager
def quiet_compiler_errors() -> Iterator[None]:
    """Hold back the compiler's ERROR log records while the block runs; replay them at DEBUG."""
    _install()
    _HOLD.depth += 1
    try:
        yield
    finally:
        _HOLD.depth -= 1
        if not _HOLD.depth and _HOLD.held:
            _replay_held()


def quietly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with every call under ``quiet_compiler_errors`` (for calls that may compile)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        _install()
        _HOLD.depth += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _HOLD.depth -= 1
            if not _HOLD.depth and _HOLD.held:
                _replay_held()

    call.__wrapped__ = fn  # type: ignore[attr-defined]
    return call


def first_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (the type alone for an empty message)."""
    text = str(exc).strip()
    line = text.splitlines()[0][:limit] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__
