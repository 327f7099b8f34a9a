"""The drawing pieces of the progress bar: a tqdm with steady number widths, the one-line bar
used where the stream is not a terminal, and the formatting both share."""
from __future__ import annotations

import math
import time
from typing import Any, Mapping, Optional, TextIO, Union

from tqdm import tqdm as _tqdm

Number = Union[int, float]


class Tqdm(_tqdm):
    """``tqdm`` whose floats are zero-padded to 5 characters, so the postfix does not flicker."""

    @staticmethod
    def format_num(n: Union[int, float, str]) -> str:
        return _format_value(n)


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = f"{value:.3g}"
        if "e" not in text and "n" not in text:  # not 1e-05, nan, inf
            if "." not in text:
                text += "."
            text = text.ljust(5, "0")
        return text
    return str(value)


def postfix_text(metrics: Mapping[str, Any]) -> str:
    """``key=value, ...`` as shown after a bar (floats with 3 significant digits)."""
    return ", ".join(f"{key}={_format_value(value).strip()}" for key, value in metrics.items())


def _rate_text(n: int, elapsed: float) -> str:
    rate = n / elapsed if elapsed > 0 else 0.0
    if rate == 0:
        return "?it/s"
    return f"{rate:.2f}it/s" if rate >= 1 else f"{1 / rate:.2f}s/it"


def plain_line(desc: str, n: int, total: Optional[Number], elapsed: float, postfix: str) -> str:
    """One finished bar as plain text: ``desc: pct%| n/total [elapsed, rate, postfix]``."""
    head = f"{desc}: {100 * n / total:3.0f}%| {n}/{total}" if total else f"{desc}: {n}"
    tail = f", {postfix}" if postfix else ""
    return f"{head} [{_tqdm.format_interval(elapsed)}, {_rate_text(n, elapsed)}{tail}]"


class LineBar:
    """Stands in for a ``Tqdm`` on a stream that is not a terminal: it keeps the same counters
    (``n``, ``total``, description, postfix) and writes one line per segment (``emit``, and on
    ``reset``/``close`` when the segment has progress not yet written) instead of redrawing."""

    def __init__(self, desc: str, stream: TextIO, total: Optional[Number] = None, disable: bool = False) -> None:
        self.desc = desc
        self.stream = stream
        self.disable = disable
        self.postfix = ""
        self.initial = 0
        self.n = 0
        self._written = False
        self.reset(total)

    def reset(self, total: Optional[Number] = None) -> None:
        self.emit()
        self.n = 0
        self.total = None if total is None or total == math.inf else total
        self._start = time.monotonic()
        self._written = False

    def set_description(self, desc: Optional[str] = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def set_postfix(self, ordered_dict: Optional[Mapping[str, Any]] = None, refresh: bool = True,
                    **kwargs: Any) -> None:
        self.postfix = postfix_text({**(ordered_dict or {}), **kwargs})

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def refresh(self) -> None:
        """Nothing is drawn between lines."""

    def write(self, s: str, end: str = "\n") -> None:
        self.stream.write(s + end)
        self.stream.flush()

    def emit(self) -> None:
        """Write the current segment as one line, once, if it has progress."""
        if self.disable or self._written or self.n <= 0:
            return
        self._written = True
        self.write(plain_line(self.desc, self.n, self.total, time.monotonic() - self._start, self.postfix))

    def close(self) -> None:
        self.emit()
        self.disable = True


Bar = Union[_tqdm, LineBar]


def convert_inf(x: Optional[Number]) -> Optional[Number]:
    """tqdm takes ``None`` for an unknown total."""
    return None if x is None or math.isinf(x) or math.isnan(x) else x


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except ValueError:  # a closed stream
        return False
