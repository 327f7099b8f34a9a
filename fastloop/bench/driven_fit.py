"""Drive a framework's ``fit()`` round by round, so frameworks can be timed interleaved.

Timing choice (why not time ``trainer.fit`` or per-batch hooks): a framework contender runs ONE
``fit`` for the whole benchmark (warm-up + every round) in a worker thread. A callback's
``on_train_batch_end`` calls :meth:`FitDriver.batch_end`, which pauses the worker when a round's
step count is reached and hands control back to the runner, which then times the other
contenders. A round's time runs from the worker resuming (inside ``on_train_batch_end`` of the
previous round's last batch) to ``on_train_batch_end`` of the round's last batch, so it contains
everything the loop does between batches (fetching, transfer hooks, counters, every hook, the
step) and nothing of Trainer construction or fit set-up and tear-down. Per-step hook timing
(``on_train_batch_start``..``end``) would leave the loop's own overhead out, which is what we
want to measure. The driver's callback adds one Python call per step (well under 1 µs), counted
against the framework. Only one thread runs at a time; the runner waits on a semaphore.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional

import torch

from fastloop.bench.contender import synchronize


class _Abort(Exception):
    """Raised inside the worker to unwind a fit the runner gave up on."""


class FitDriver:
    """Runs ``fit_fn`` in a thread that pauses at the step counts the runner asks for."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.steps = 0
        self.pause_at = 0
        self.last_outputs: Any = None
        self.error: Optional[BaseException] = None
        self.finished = False
        self._aborting = False
        self._go = threading.Semaphore(0)
        self._paused = threading.Semaphore(0)
        self._thread: Optional[threading.Thread] = None
        self._t_start = self._t_first = self._t_resume = self._t_pause = 0.0

    # ----------------------------------------------------------- worker side
    def batch_end(self, outputs: Any) -> None:
        """Call from ``on_train_batch_end`` (worker thread)."""
        self.steps += 1
        self.last_outputs = outputs
        if self.steps == 1:
            synchronize(self.device)  # host-device sync: end of the first (cold) step, warm-up only
            self._t_first = time.perf_counter()
        if self.steps == self.pause_at:
            synchronize(self.device)  # host-device sync: the one per timed round
            self._t_pause = time.perf_counter()
            self._paused.release()
            self._go.acquire()
            if self._aborting:
                raise _Abort()
            self._t_resume = time.perf_counter()

    def _work(self, fit_fn: Callable[[], None]) -> None:
        try:
            self._t_start = time.perf_counter()
            fit_fn()
        except _Abort:
            pass
        except BaseException as exc:  # reported by the runner as this contender's failure
            self.error = exc
        finally:
            self.finished = True
            self._paused.release()

    # ----------------------------------------------------------- runner side
    def start(self, fit_fn: Callable[[], None], warmup_steps: int) -> float:
        """Start the fit, run ``warmup_steps`` steps; return the first step's seconds (from the
        ``fit`` call, so set-up, compilation and capture are included)."""
        self.pause_at = warmup_steps
        self._thread = threading.Thread(target=self._work, args=(fit_fn,), name="fastloop-bench-fit", daemon=True)
        self._thread.start()
        self._wait(warmup_steps)
        return self._t_first - self._t_start

    def resume(self, steps: int) -> float:
        """Run ``steps`` more steps; return their seconds."""
        self.pause_at = self.steps + steps
        self._go.release()
        self._wait(self.pause_at)
        return self._t_pause - self._t_resume

    def _wait(self, expected: int) -> None:
        self._paused.acquire()
        if self.error is not None:
            raise self.error
        if self.finished and self.steps < expected:
            raise RuntimeError(f"fit() ended after {self.steps} steps; the benchmark expected {expected}")

    def finish(self, planned_steps: int) -> None:
        """End the fit: when all ``planned_steps`` ran, let it finish normally (tear-down hooks
        included); when the runner stopped early (time budget), unwind it where it paused."""
        if self._thread is None or self.finished:
            return
        if self.steps < planned_steps:
            self.abort()
            return
        self._go.release()
        self._thread.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """Unwind a paused fit (after a failure elsewhere); idempotent."""
        if self._thread is None or self.finished:
            return
        self._aborting = True
        self._go.release()
        self._thread.join(timeout=30)


def loss_from_outputs(outputs: Any) -> Optional[float]:
    """The loss in a training-batch output (a tensor, or a dict with ``"loss"``) as a float."""
    if isinstance(outputs, dict):
        outputs = outputs.get("loss")
    if isinstance(outputs, torch.Tensor):
        return float(outputs.detach().float().cpu())
    return None
