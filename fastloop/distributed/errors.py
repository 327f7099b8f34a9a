"""Errors in a worker name its rank, and reach torchrun's failure summary.

``tag_exception`` adds a note (``exc.add_note``: the type and message stay as they were, so
``except`` clauses keep working) saying which global rank raised. ``report_uncaught_errors``
installs a ``sys.excepthook`` that writes the exception, rank included, to the error file the
elastic agent gives every worker (``TORCHELASTIC_ERROR_FILE``), which is what
``torch.distributed.elastic.multiprocessing.errors.record`` does for a decorated ``main``: the
agent then prints it as the root cause of the failed run. The agent stops the other workers as
soon as one exits with an error (torchrun's ``--monitor-interval``, 0.1 s by default).
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from types import TracebackType
from typing import Optional, Type

_NOTE_PREFIX = "fastloop: raised on global rank"


def rank_note(rank: int, world_size: int) -> str:
    return f"{_NOTE_PREFIX} {rank} (of {world_size} processes)"


def tag_exception(exc: BaseException, rank: int, world_size: int) -> None:
    """Add the rank note to ``exc`` once."""
    notes = getattr(exc, "__notes__", ())
    if not any(str(n).startswith(_NOTE_PREFIX) for n in notes):
        exc.add_note(rank_note(rank, world_size))


def write_error_file(exc: BaseException, rank: int, path: str) -> None:
    """The JSON layout torch's ``ErrorHandler.record_exception`` writes, with the rank in the message."""
    data = {
        "message": {
            "message": f"[rank {rank}] {type(exc).__name__}: {exc}",
            "extraInfo": {
                "py_callstack": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
                "timestamp": str(int(time.time())),
            },
        }
    }
    with open(path, "w") as f:
        json.dump(data, f)


_installed_for: Optional[int] = None


def report_uncaught_errors(rank: int, world_size: int) -> None:
    """Chain a ``sys.excepthook`` that tags an uncaught exception with the rank and records it for
    the elastic agent (once per process)."""
    global _installed_for
    if _installed_for is not None:
        return
    _installed_for = rank
    previous = sys.excepthook

    def hook(exc_type: Type[BaseException], exc: BaseException, tb: Optional[TracebackType]) -> None:
        if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            tag_exception(exc, rank, world_size)
            path = os.environ.get("TORCHELASTIC_ERROR_FILE")
            if path:
                try:
                    write_error_file(exc, rank, path)
                except OSError as err:  # the traceback below still reaches stderr
                    print(f"fastloop: could not write the error file {path}: {err}", file=sys.stderr)
        previous(exc_type, exc, tb)

    sys.excepthook = hook
