"""Drive a framework's ``fit()`` round by round, so frameworks can be timed interleaved.

Timing choice (why not time ``trainer.fit`` or per-batch hooks): a framework contender runs ONE
``fit`` for the whole benchmark (warm-up + every round) in a greenlet. A callback's
``on_train_batch_end`` calls :meth:`FitDriver.batch_end`, which switches back to the runner when
a round's step count is reached; the runner then times the other contenders and later switches
into the fit again. A round's time runs from the fit resuming (inside ``on_train_batch_end`` of
the previous round's last batch) to ``on_train_batch_end`` of the round's last batch, so it
contains everything the loop does between batches (fetching, transfer hooks, counters, every
hook, the step) and nothing of Trainer construction or fit set-up and tear-down. The driver's
callback adds one Python call per step (well under 1 µs), counted against the framework.

Why greenlets, not threads: every contender then runs on the runner's one OS thread. Each OS
thread that runs ATen ops owns an OpenMP team; on the 2-core VM, a second live thread that had
run a few matmuls made the main thread's tiny-MLP step 1.4-1.8x slower (2 intra-op threads),
and fastloop's compiled step (mostly matmuls) ran 2x slower under the thread-based harness than
alone. One thread gives every contender the conditions of a normal training script.
Grad mode is thread-local state: it is saved and restored around every switch.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

import torch
from greenlet import greenlet

from fastloop.bench.contender import synchronize


class _Abort(Exception):
    """Raised inside the fit to unwind a fit the runner gave up on."""


class FitDriver:
    """Runs ``fit_fn`` in a greenlet that pauses at the step counts the runner asks for."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.steps = 0
        self.pause_at = 0
        self.last_outputs: Any = None
        self.error: Optional[BaseException] = None
        self.finished = False
        self._aborting = False
        self._fit: Optional[greenlet] = None
        self._runner: Optional[greenlet] = None  # who resumed the fit last
        self._t_start = self._t_first = self._t_resume = self._t_pause = 0.0

    # ----------------------------------------------------------- fit side
    def batch_end(self, outputs: Any) -> None:
        """Call from ``on_train_batch_end`` (inside the fit's greenlet)."""
        self.steps += 1
        self.last_outputs = outputs
        if self.steps == 1:
            synchronize(self.device)  # host-device sync: end of the first (cold) step, warm-up only
            self._t_first = time.perf_counter()
        if self.steps == self.pause_at:
            synchronize(self.device)  # host-device sync: the one per timed round
            self._t_pause = time.perf_counter()
            grad_mode = torch.is_grad_enabled()
            self._runner.switch()  # type: ignore[union-attr]
            torch.set_grad_enabled(grad_mode)
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

    def _switch_in(self, *args: Any) -> None:
        """Run the fit until it pauses or ends; the runner's grad mode is kept."""
        grad_mode = torch.is_grad_enabled()
        self._runner = greenlet.getcurrent()
        try:
            self._fit.switch(*args)  # type: ignore[union-attr]
        finally:
            torch.set_grad_enabled(grad_mode)

    # ----------------------------------------------------------- runner side
    def start(self, fit_fn: Callable[[], None], warmup_steps: int) -> float:
        """Start the fit, run ``warmup_steps`` steps; return the first step's seconds (from the
        ``fit`` call, so set-up, compilation and capture are included)."""
        self.pause_at = warmup_steps
        self._fit = greenlet(self._work)
        self._switch_in(fit_fn)
        self._check(warmup_steps)
        return self._t_first - self._t_start

    def resume(self, steps: int) -> float:
        """Run ``steps`` more steps; return their seconds."""
        self.pause_at = self.steps + steps
        self._switch_in()
        self._check(self.pause_at)
        return self._t_pause - self._t_resume

    def _check(self, expected: int) -> None:
        if self.error is not None:
            raise self.error
        if self.finished and self.steps < expected:
            raise RuntimeError(f"fit() ended after {self.steps} steps; the benchmark expected {expected}")

    def finish(self, planned_steps: int) -> None:
        """End the fit: when all ``planned_steps`` ran, let it finish normally (tear-down hooks
        included); when the runner stopped early (time budget), unwind it where it paused."""
        if self._fit is None or self.finished:
            return
        if self.steps < planned_steps:
            self.abort()
            return
        self.pause_at = -1  # never pause again
        self._switch_in()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """Unwind a paused fit (after a failure elsewhere); idempotent."""
        if self._fit is None or self.finished or self._fit.dead:
            return
        self._aborting = True
        self._switch_in()


def loss_from_outputs(outputs: Any) -> Optional[float]:
    """The loss in a training-batch output (a tensor, or a dict with ``"loss"``) as a float."""
    if isinstance(outputs, dict):
        outputs = outputs.get("loss")
    if isinstance(outputs, torch.Tensor):
        return float(outputs.detach().float().cpu())
    return None
