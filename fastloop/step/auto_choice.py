"""``mode="auto"`` is never slower than eager: the compiled step must win on this model.

On a CPU, ``auto`` builds the compiled step and this wrapper around it. After the compile and a
few warm-up steps, it times ``MEASURED_WINDOWS`` optimizer steps of the compiled step, then the
same number of the eager step, and keeps the faster one for the rest of the fit (compiled only
if it is at least ``MIN_SPEEDUP`` times faster: on a tie the eager step is the reference and
costs no more compiles). Every measured step is a real step of the run, in order: eager and
compiled steps share the parameters, the gradients and the ``torch.optim`` state (the fused
update keeps its state there), so the run is what a fit switching modes between two steps
gives, within the compiled mode's usual tolerance of eager. Switches happen only where an
accumulation window starts, before the first optimizer of a batch. ``trainer.explain()`` gives
both timings either way; an explicit ``mode="compiled"`` never gets this wrapper.

CPU only: there both steps have finished when they return (no sync to time them), and the
fused Adam update reads the step count that eager steps advance (on a GPU it mirrors it on the
host). On a GPU ``auto`` means the CUDA-graph step, not measured.

Once decided, the wrapper hands the loop the chosen step (``loop.train_step``) and is out of the
per-step path.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch.optim import Optimizer

from fastloop.step.loop_protocol import StepLoop
from fastloop.step.output import StepOutput

# Windows (optimizer steps, with every optimizer and micro-batch of an accumulation window) run
# compiled after the last compile before timing starts: the first calls build the direct call.
WARMUP_WINDOWS = 2
# Windows timed per contender; the first eager window after the switch is not timed.
MEASURED_WINDOWS = 5
EAGER_WARMUP_WINDOWS = 1
# The compiled step is kept only if its median step is at least this much faster than eager's
# (within the noise of a few steps, a tie goes to eager).
MIN_SPEEDUP = 1.05


def choose(compiled: Sequence[float], eager: Sequence[float]) -> Tuple[bool, str]:
    """``(keep_compiled, the two timings in words)`` from per-step seconds of each contender."""
    fused, plain = statistics.median(compiled), statistics.median(eager)
    keep = fused * MIN_SPEEDUP <= plain
    words = (f"compiled {fused * 1e3:.2f} ms per step, eager {plain * 1e3:.2f} ms "
             f"(medians of {len(compiled)} and {len(eager)} steps after the compile)")
    return keep, words


class AutoChoiceStep:
    """Runs the compiled step, then times it against the eager step and keeps the faster."""

    mode = "auto"

    def __init__(self, loop: StepLoop, compiled: Any, eager: Any) -> None:
        self.loop = loop
        self.compiled = compiled
        self.eager = eager
        self.chosen: Optional[Any] = None
        self.phase = "warmup"  # warmup -> compiled -> eager_warmup -> eager -> decided
        self.samples: Dict[str, List[float]] = {"compiled": [], "eager": []}
        self._window: Optional[float] = None  # seconds so far in the open window; None: not timed
        self._window_compiled = False  # a graph was compiled during the open window
        self._clean_windows = 0
        self.verdict = ""

    # ------------------------------------------------------------ what explain() reads
    @property
    def graph_count(self) -> int:
        return self.compiled.graph_count

    @property
    def compile_seconds(self) -> float:
        return self.compiled.compile_seconds

    @property
    def nonfinite_guards(self) -> Dict[int, Any]:
        return getattr(self.compiled, "nonfinite_guards", {}) if self.phase in ("warmup", "compiled") else {}

    @property
    def notes(self) -> List[str]:
        counts = {k: len(v) for k, v in self.samples.items()}
        state = (self.verdict or f"auto: measuring the compiled step against eager ({counts['compiled']} of "
                 f"{MEASURED_WINDOWS} compiled and {counts['eager']} of {MEASURED_WINDOWS} eager steps timed so far)")
        return list(getattr(self.compiled, "notes", ())) + [state]

    # ------------------------------------------------------------------------- step
    def __call__(self, batch: Any, batch_idx: int, opt_idx: int, optimizer: Optimizer) -> StepOutput:
        if self.chosen is not None:  # decided during this batch: the loop calls the chosen step next batch
            return self.chosen(batch, batch_idx, opt_idx, optimizer)
        loop = self.loop
        if loop.optim_progress.optimizer_position == 0 and batch_idx % loop.trainer.accumulate_grad_batches == 0:
            self._close_window()
            if self.chosen is not None:
                return self.chosen(batch, batch_idx, opt_idx, optimizer)
        running_compiled = self.phase in ("warmup", "compiled")
        step = self.compiled if running_compiled else self.eager
        graphs, diverted = self.compiled.graph_count, self._eager_last_calls()
        output, seconds = self._timed(step, batch, batch_idx, opt_idx, optimizer)
        if running_compiled and loop.train_step is not self and loop.train_step is not None:
            # The compiled step could not compile and handed the loop the eager step for good.
            self.chosen = loop.train_step
            self.phase = "decided"
            return output
        if self.compiled.graph_count != graphs or self._eager_last_calls() != diverted:
            # A compile, or a smaller last batch the compiled step ran eagerly: not a compiled step's time.
            self._window_compiled = True
        self._window = seconds if self._window is None else self._window + seconds
        return output

    def _eager_last_calls(self) -> int:
        """Calls the compiled step served eagerly so far (its smaller last batches)."""
        eager_last = getattr(self.compiled, "eager_last", None)
        return eager_last.calls if eager_last is not None else 0

    def _timed(self, step: Any, *args: Any) -> Tuple[StepOutput, float]:
        """Run ``step`` and time it (tests replace this to inject timings). CPU only: both steps
        have finished when they return."""
        start = time.perf_counter()
        output = step(*args)
        return output, time.perf_counter() - start

    def _close_window(self) -> None:
        """At a window boundary: file the last window's time and move on when a phase is done."""
        seconds, compiled_in_it = self._window, self._window_compiled
        self._window, self._window_compiled = None, False
        if seconds is None:
            return
        if self.phase == "warmup":
            self._clean_windows = 0 if compiled_in_it else self._clean_windows + 1
            if self._clean_windows >= WARMUP_WINDOWS:
                self.phase = "compiled"
        elif self.phase == "compiled":
            if not compiled_in_it:  # a recompile or an eagerly run last batch is not a compiled step's cost
                self.samples["compiled"].append(seconds)
            if len(self.samples["compiled"]) >= MEASURED_WINDOWS:
                self._read_pending_checks()
                self.phase, self._clean_windows = "eager_warmup", 0
        elif self.phase == "eager_warmup":
            self._clean_windows += 1
            if self._clean_windows >= EAGER_WARMUP_WINDOWS:
                self.phase = "eager"
        elif self.phase == "eager":
            self.samples["eager"].append(seconds)
            if len(self.samples["eager"]) >= MEASURED_WINDOWS:
                self._decide()

    def _read_pending_checks(self) -> None:
        """Before eager steps run: the compiled steps' device-side non-finite check is read now, so
        that a bad compiled step is reported as it would be at the end of an epoch."""
        for guard in getattr(self.compiled, "nonfinite_guards", {}).values():
            guard.read()  # host sync: once, at the switch to the eager steps

    def _decide(self) -> None:
        keep, words = choose(self.samples["compiled"], self.samples["eager"])
        loop = self.loop
        report = loop.step_report
        if keep:
            self.chosen = self.compiled
            self.verdict = f"auto: kept the compiled step, faster than eager: {words}"
        else:
            self.chosen = self.eager
            compile_note = f"{self.compiled.graph_count} graph(s), {self.compiled.compile_seconds:.1f} s to compile"
            self.verdict = (f"auto: the compiled step does not beat eager on this model ({words}; "
                            f"{compile_note}): running eagerly")
            if report is not None:
                report.used = "eager"
                report.reasons.append(self.verdict)
                report.step = self.eager
        self.phase = "decided"
        if loop.train_step is self:
            loop.train_step = self.chosen
