"""What a non-finite loss or gradient does to its optimizer step: ``Trainer(nonfinite=...)``.

Policies (the same in every mode):

* ``"raise"`` (default): :class:`NonFiniteError` naming the global step, the batch index and the
  optimizer index, and for a gradient the first parameter (in the optimizer's parameter order)
  whose gradient is not finite. The update of that step is not applied: parameters and
  optimizer state keep their values from before it.
* ``"skip"``: that optimizer step is skipped: parameters and optimizer state (``exp_avg``, the
  step count, momentum buffers...) are left untouched and the gradients are cleared (eager:
  ``param.grad = None``; fused: zeroed). ``global_step``, the loops and LR schedulers still
  count the step as taken (as with ``GradScaler``'s skipped steps). Skipped steps are counted
  per optimizer, shown by ``trainer.explain()`` and logged (on step, to the loggers and
  ``trainer.callback_metrics``) as ``nonfinite_skipped`` (one optimizer) or
  ``nonfinite_skipped_optimizer_<idx>`` (several): a running total over the fit.
* ``"ignore"``: no check, today's behaviour before this option existed, for speed comparisons.
  Unsafe: one NaN turns every parameter into NaN.

What is checked: the loss of every micro-batch of the accumulation window, and the accumulated
gradients before clipping (clipping by value would turn an ``inf`` into a finite number).
Under ``precision="16-mixed"`` gradient overflow is the loss scaler's business (it skips the
step and lowers the scale, as ``torch.amp.GradScaler`` does): only the loss is checked, and in
eager mode a "skip" leaves the gradients to ``GradScaler`` (whose ``step`` needs them), which
skips the step when they overflowed, as a non-finite loss makes them do.
A non-finite loss at a micro-batch that only accumulates is reported with the batch index of
the window's stepping batch.

Eager mode checks after backward, with one ``torch._amp_foreach_non_finite_check_and_unscale_``
over the gradients (scale 1), and reads the result on the host: one host-device sync per
optimizer step, eager path only; the error is raised at the failing step.

Compiled and CUDA-graph modes check on the device, inside the fused graph, and apply the update
through ``torch.where(ok, new, old)`` for the parameters and every optimizer state tensor, so a
non-finite update never reaches them, without a host sync. A small int64 tensor per optimizer
counts steps and skips and records the first bad step. Under ``"raise"`` the host reads it once
every ``CompileConfig.nonfinite_check_interval`` optimizer steps (default 20, the progress bar's
refresh rate), at the last batch of an epoch, at ``max_steps``, before ModelCheckpoint saves and
in ``trainer.explain()``; from the first bad step on, the graph applies no further update (a
latch), so the late error leaves parameters and optimizer state as they were before the first
bad step, as eager does. Buffers (BatchNorm running statistics) are updated by the forwards run
until the read. ``nonfinite_check_interval=1`` reads every step.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.optim import Optimizer

__all__ = ["NonFiniteError", "FusedNonFiniteGuard", "EagerNonFiniteCheck", "check_pending", "logged_name"]

# Layout of the device state (int64): stepping calls so far, steps skipped (or not applied), the
# ordinal of the first bad stepping call (-1: none), what was bad there (-1 none, 0 the loss,
# k + 1 the gradient of parameter k), and whether a loss of the open accumulation window was bad.
STEPS, SKIPPED, FIRST, WHAT, WINDOW = range(5)


class NonFiniteError(FloatingPointError):
    """A loss or gradient was NaN or infinite under ``Trainer(nonfinite="raise")``."""


def logged_name(opt_idx: int, several: bool) -> str:
    return f"nonfinite_skipped_optimizer_{opt_idx}" if several else "nonfinite_skipped"


def error_message(what: str, global_step: int, batch_idx: int, opt_idx: int) -> str:
    return (f"non-finite {what} at global step {global_step} (batch {batch_idx}, optimizer {opt_idx}): "
            "the optimizer step was not applied. Trainer(nonfinite='skip') skips such steps; "
            "nonfinite='ignore' applies them (unsafe)")


def _what(code: int, names: Sequence[str]) -> str:
    if code <= 0:
        return "loss"
    name = names[code - 1] if code - 1 < len(names) else f"#{code - 1}"
    return f"gradient of parameter {name!r}"


# ---------------------------------------------------------------------------------- graph side
def new_state(device: torch.device) -> Tensor:
    return torch.tensor([0, 0, -1, -1, 0], dtype=torch.int64, device=device)


def note_window_loss(state: Tensor, loss: Tensor, new_window: Tensor) -> None:
    """Accumulate-only call: remember whether a loss of this window was non-finite (tensor ops)."""
    bad = torch.logical_not(torch.isfinite(loss))
    window = torch.where(new_window, bad, (state[WINDOW] != 0) | bad)
    state.copy_(torch.cat([state[:WINDOW], window.reshape(1).to(state.dtype)]))


def check_step(state: Tensor, loss: Tensor, grads: Sequence[Tensor], new_window: Tensor, *,
               accumulate: int, check_grads: bool, latch: bool) -> Tensor:
    """Stepping call: update ``state`` and return a 0-d bool, True where the update must not apply.

    ``latch``: once a bad step was recorded, every later update is withheld too (``"raise"``,
    whose error may be read a few steps late). Pure tensor ops: no host sync, capturable.
    """
    loss_bad = torch.logical_not(torch.isfinite(loss))
    if accumulate > 1:
        loss_bad = loss_bad | ((state[WINDOW] != 0) & torch.logical_not(new_window))
    bad, what = loss_bad, torch.zeros((), dtype=state.dtype, device=state.device)
    if check_grads and grads:
        grad_bad = torch.stack([torch.logical_not(torch.isfinite(g).all()) for g in grads])
        bad = loss_bad | grad_bad.any()
        what = torch.where(loss_bad, what, torch.argmax(grad_bad.to(state.dtype)) + 1)
    steps, first = state[STEPS], state[FIRST]
    newly = bad & (first < 0)
    state.copy_(torch.stack([
        steps + 1, state[SKIPPED] + bad.to(state.dtype), torch.where(newly, steps, first),
        torch.where(newly, what, state[WHAT]), torch.zeros_like(steps),
    ]))
    return bad | (first >= 0) if latch else bad


# ------------------------------------------------------------------------------ fused, host side
class FusedNonFiniteGuard:
    """Host side of one fused step's device check: when to read it, and what to say."""

    def __init__(self, policy: str, opt_idx: int, names: Sequence[str], state: Optional[Tensor],
                 interval: int, several: bool) -> None:
        self.policy = policy
        self.opt_idx = opt_idx
        self.names = list(names)
        self.state = state
        self.interval = interval
        self.log_name = logged_name(opt_idx, several)
        self._pending: List[Tuple[int, int]] = []  # (global_step, batch_idx) of steps not read yet
        self._base = 0  # device step ordinal of _pending[0]
        self._epoch_loop: Any = None  # the fit's TrainingEpochLoop (guards are rebuilt for every fit)

    def after_step(self, trainer: Any, batch_idx: int) -> None:
        """After each stepping call of the compiled step, before the step is counted."""
        if self.policy == "skip":
            log_fused_skips(trainer.metrics, self)
            return
        loop = self._epoch_loop
        if loop is None:
            self._epoch_loop = loop = trainer._counting_fit_loop().epoch_loop
        global_step, max_steps = loop.global_step, loop.max_steps
        # Read at the end of an epoch and at max_steps too, so that a fit never ends unread.
        last = loop._num_ready_batches_reached() or (max_steps != -1 and global_step + 1 >= max_steps)
        self.stepped(global_step, batch_idx, last)

    def stepped(self, global_step: int, batch_idx: int, last: bool) -> None:
        """After each stepping call. Under "raise", reads the device check when due."""
        if self.policy != "raise":
            return
        self._pending.append((global_step, batch_idx))
        if last or len(self._pending) >= self.interval:
            self.read()

    def read(self) -> None:
        """Raise :class:`NonFiniteError` if a step was bad (``"raise"``)."""
        if self.policy != "raise" or not self._pending:
            return
        steps, _, first, what, _ = self.state.tolist()  # host sync: every nonfinite_check_interval steps
        if first >= 0:
            position = first - self._base
            global_step, batch_idx = self._pending[position]
            message = error_message(_what(what, self.names), global_step, batch_idx, self.opt_idx)
            late = len(self._pending) - 1 - position
            if late:
                now = self._pending[-1][0]
                message += (f" (read {late} step(s) later, at global step {now}: the fused step's device-side "
                            f"check is read every CompileConfig.nonfinite_check_interval={self.interval} steps; "
                            "the steps in between were not applied either)")
            raise NonFiniteError(message)
        self._base = steps
        self._pending.clear()

    def skipped(self) -> Tensor:
        """The running count of skipped steps (a view of the device state: no sync)."""
        return self.state[SKIPPED]

    def note(self) -> str:
        if self.policy == "ignore":
            return f"optimizer {self.opt_idx}: nonfinite='ignore': loss and gradients are not checked (unsafe)"
        steps, skipped = self.state[:2].tolist()  # host sync: explain() only
        if self.policy == "skip":
            return f"optimizer {self.opt_idx}: nonfinite='skip': {skipped} of {steps} optimizer steps skipped"
        return (f"optimizer {self.opt_idx}: nonfinite='raise': checked in the graph every step, read every "
                f"{self.interval} steps")


# ---------------------------------------------------------------------------------------- eager
class EagerNonFiniteCheck:
    """The eager step's check: per optimizer, the window's losses, then loss and gradients at the step."""

    def __init__(self, policy: str, module: torch.nn.Module, several: bool) -> None:
        self.policy = policy
        self.several = several
        self.names = {id(p): n for n, p in module.named_parameters()}
        self.skipped: Dict[int, int] = {}
        self.steps: Dict[int, int] = {}
        self._window: Dict[int, Tensor] = {}  # optimizer index -> a loss of the open window was bad
        self._found: Dict[torch.device, Tuple[Tensor, Tensor]] = {}

    @property
    def active(self) -> bool:
        return self.policy != "ignore"

    def window_loss(self, opt_idx: int, loss: Tensor, window_start: bool) -> None:
        """An accumulating micro-batch: keep its loss's finiteness on the device (no sync)."""
        bad = torch.logical_not(torch.isfinite(loss.detach()))
        previous = self._window.get(opt_idx)
        self._window[opt_idx] = bad if window_start or previous is None else previous | bad

    def check(self, optimizer: "Optimizer", opt_idx: int, loss: Optional[Tensor], window_start: bool,
              global_step: int, batch_idx: int, check_grads: bool = True) -> bool:
        """At a stepping micro-batch, after backward. True: skip the update; the gradients are
        cleared unless ``check_grads`` is False (a loss scaler owns them, see the module docstring)."""
        self.steps[opt_idx] = self.steps.get(opt_idx, 0) + 1
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None] if check_grads else []
        tensors = list(grads)
        window = None if window_start else self._window.pop(opt_idx, None)
        self._window.pop(opt_idx, None)
        if loss is not None:
            tensors.append(loss.detach().reshape(1).clone())  # the foreach op multiplies in place
        if not tensors and window is None:
            return False
        found = self._any_nonfinite(tensors)
        if window is not None:
            found = found + window.to(found.device, found.dtype)
        if not bool(found):  # host sync: eager non-finite check, once per optimizer step
            return False
        what = self._first_bad(loss, window, params if check_grads else [])
        if self.policy == "raise":
            raise NonFiniteError(error_message(what, global_step, batch_idx, opt_idx))
        if check_grads:
            for p in params:
                p.grad = None
        self.skipped[opt_idx] = self.skipped.get(opt_idx, 0) + 1
        return True

    def _any_nonfinite(self, tensors: List[Tensor]) -> Tensor:
        """A 1-element float tensor, non-zero when a tensor holds nan/inf: one foreach op per
        (device, dtype) group, much cheaper than ``isfinite(...).all()`` per tensor."""
        groups: Dict[Tuple[torch.device, torch.dtype], List[Tensor]] = {}
        for t in tensors:
            if t.is_sparse:
                t = t.coalesce()._values()
            groups.setdefault((t.device, t.dtype), []).append(t)
        total: Optional[Tensor] = None
        for (device, _), group in groups.items():
            found, one = self._found_tensors(device)
            if total is not None:
                found = found.clone()  # the cached one holds the first group's result
            found.zero_()
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, one)
            total = found if total is None else total + found.to(total.device)
        assert total is not None
        return total

    def _found_tensors(self, device: torch.device) -> Tuple[Tensor, Tensor]:
        pair = self._found.get(device)
        if pair is None:
            pair = self._found[device] = (torch.zeros(1, device=device), torch.ones(1, device=device))
        return pair

    def _first_bad(self, loss: Optional[Tensor], window: Optional[Tensor], params: List[Tensor]) -> str:
        # Only after a bad step: per-tensor reads are fine here.
        if (loss is not None and not bool(torch.isfinite(loss).all())) or (window is not None and bool(window)):
            return "loss"
        for p in params:
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                return f"gradient of parameter {self.names.get(id(p), '?')!r}"
        return "loss"

    def log(self, metrics: Any, opt_idx: int) -> None:
        """Under "skip": the running count, logged on step (see the module docstring)."""
        metrics.store(logged_name(opt_idx, self.several), self.skipped.get(opt_idx, 0), prog_bar=False,
                      logger=True, on_step=True, on_epoch=False, reduce_fx="mean", batch_size=None)

    def notes(self) -> List[str]:
        if self.policy == "ignore":
            return ["nonfinite='ignore': loss and gradients are not checked (unsafe)"]
        if self.policy == "skip":
            return [f"optimizer {i}: nonfinite='skip': {self.skipped.get(i, 0)} of {n} optimizer steps skipped"
                    for i, n in sorted(self.steps.items())]
        return []


def make_fused_guards(trainer: Any, fused: Dict[int, Any]) -> Dict[int, FusedNonFiniteGuard]:
    """One guard per fused step that checks (none under "ignore")."""
    interval = trainer.config.compile.nonfinite_check_interval
    several = len(trainer.optimizers) > 1
    return {idx: FusedNonFiniteGuard(step.nonfinite, idx, list(step._train), step.nonfinite_state, interval, several)
            for idx, step in fused.items() if step.nonfinite_state is not None}


def fused_notes(trainer: Any, guards: Dict[int, FusedNonFiniteGuard]) -> List[str]:
    """``trainer.explain()`` lines of the compiled step (reads the device counters)."""
    if trainer.config.nonfinite == "ignore":
        return ["nonfinite='ignore': loss and gradients are not checked (unsafe)"]
    return [guard.note() for guard in guards.values()]


def log_fused_skips(metrics: Any, guard: FusedNonFiniteGuard) -> None:
    """Under "skip": store the device counter as a step value (read only when a row is due)."""
    metrics.store(guard.log_name, guard.skipped(), prog_bar=False, logger=True, on_step=True, on_epoch=False,
                  reduce_fx="mean", batch_size=None)


def check_pending(trainer: Any) -> None:
    """Read every fused step's pending device check now (before a checkpoint is written).
    Raises :class:`NonFiniteError` for a bad step not reported yet."""
    from fastloop.trainer import iter_loops

    for _, loop in iter_loops(trainer.fit_loop, "fit_loop"):
        step = getattr(loop, "train_step", None)
        for guard in getattr(step, "nonfinite_guards", {}).values():
            guard.read()
