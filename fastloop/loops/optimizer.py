"""``OptimizerLoop``: automatic optimization, one advance per active optimizer.

For each optimizer in turn (parameters owned only by the other optimizers frozen when there are
several), the step built for this loop's mode runs, in eager mode::

    optimizer_step(epoch, batch_idx, optimizer, optimizer_idx, closure)   # skipped while accumulating
      closure: training_step -> [on_before_zero_grad] -> optimizer_zero_grad (first batch of an
               accumulation window) -> [on_before_backward] -> backward -> [on_after_backward]
      then:    [on_before_optimizer_step] -> configure_gradient_clipping -> torch optimizer step

Extension points (documented, stable): ``make_step_fn`` returns the function whose result is
the raw ``training_step`` output; ``call_training_step`` calls the module's ``training_step``;
``backward_kwargs`` gives extra arguments for ``Module.backward``; ``toggle_parameters`` says
whether to freeze other optimizers' parameters; ``setup`` validates the module before the
first step. ``YieldLoop`` is built from these alone.
"""
from __future__ import annotations

import inspect
from functools import partial
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from torch.optim import Optimizer

from fastloop.loops.base import Loop
from fastloop.loops.progress import OptimizationProgress
from fastloop.step.build import build_train_step, rebuild_train_step, trainable_flags
from fastloop.step.output import StepOutput  # re-exported: ``fastloop.loops.StepOutput``

__all__ = ["EXTENSION_POINTS", "OptimizerLoop", "StepOutput", "has_parameter", "split_pairs"]

# The documented extension points: a subclass overriding one defines its own step.
EXTENSION_POINTS = ("make_step_fn", "call_training_step", "backward_kwargs", "toggle_parameters")


def split_pairs(optimizers: Sequence[Tuple[int, Optimizer]]) -> Tuple[Tuple[int, ...], Tuple[Optimizer, ...]]:
    """``((0, a), (1, b))`` -> ``((0, 1), (a, b))``; two empty tuples for no optimizers."""
    return tuple(zip(*optimizers)) or ((), ())  # type: ignore[return-value]


def has_parameter(fn: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class OptimizerLoop(Loop):
    """Steps each active optimizer on one batch."""

    _runtime_attributes = {"train_step": None, "_indices": (), "_optimizers": (), "_trainable": None}

    def __init__(self) -> None:
        super().__init__()
        self.optim_progress = OptimizationProgress()
        self.train_step: Optional[Callable[..., StepOutput]] = None  # built by ``setup``
        self._indices: Tuple[int, ...] = ()
        self._optimizers: Tuple[Optimizer, ...] = ()
        self._outputs: Dict[int, Dict[str, Any]] = {}
        self._trainable: Optional[Tuple[bool, ...]] = None  # requires_grad flags the step was built for

    def connect(self, **loops: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no child loops to connect")

    # ------------------------------------------------------------ extension points
    @classmethod
    def overridden_extension_points(cls) -> Tuple[str, ...]:
        """Which of ``EXTENSION_POINTS`` this class overrides (the step builders ask, so that
        the step package need not import the loops)."""
        return tuple(name for name in EXTENSION_POINTS if getattr(cls, name) is not getattr(OptimizerLoop, name))

    def setup(self) -> None:
        """Check the optimizers' parameters and ``training_step``'s signature, then build the step
        for the trainer's mode."""
        from fastloop.optim import check_parameters_belong

        trainer = self.trainer
        module = trainer.module
        check_parameters_belong(trainer.optimizers, module)
        if module.automatic_optimization:
            self.check_training_step(module, len(trainer.optimizers))
        self.train_step = build_train_step(self)
        self._trainable = trainable_flags(module)

    def check_trainable(self) -> None:
        """At each epoch start: a ``requires_grad`` changed since the step was built (a layer frozen
        or unfrozen without a callback) rebuilds the step, which then fuses or falls back with the
        reason (one tuple comparison per epoch)."""
        flags = trainable_flags(self.trainer.module)
        if self._trainable is not None and flags != self._trainable:
            self.train_step = rebuild_train_step(self, self._trainable, flags)
        self._trainable = flags

    def check_training_step(self, module: Any, num_optimizers: int) -> None:
        """Several optimizers need an ``optimizer_idx`` parameter in ``training_step``."""
        if num_optimizers > 1 and not has_parameter(module.training_step, "optimizer_idx"):
            raise ValueError(
                f"Your Module defines {num_optimizers} optimizers but `training_step` is missing the "
                "`optimizer_idx` argument."
            )

    def call_training_step(self, batch: Any, batch_idx: int, optimizer_idx: Optional[int] = None) -> Any:
        """Call the module's ``training_step`` (through DistributedDataParallel under DDP, see
        ``trainer.strategy``); ``optimizer_idx`` is passed when given."""
        strategy = self.trainer.strategy
        if optimizer_idx is None:
            return strategy.training_step(batch, batch_idx)
        return strategy.training_step(batch, batch_idx, optimizer_idx)

    def make_step_fn(self, batch: Any, batch_idx: int, optimizer_idx: int) -> Callable[[], Any]:
        """A function returning the raw ``training_step`` output for this optimizer."""
        opt_idx = optimizer_idx if len(self.trainer.optimizers) > 1 else None
        return partial(self.call_training_step, batch, batch_idx, opt_idx)

    def backward_kwargs(self, optimizer_idx: int) -> Dict[str, Any]:
        """Extra keyword arguments for ``Module.backward`` (for example ``retain_graph``)."""
        return {}

    @property
    def toggle_parameters(self) -> bool:
        """Freeze parameters owned only by the other optimizers while one optimizer runs."""
        return len(self.trainer.optimizers) > 1

    # ------------------------------------------------------------------ skeleton
    def run(self, batch: Any, optimizers: Sequence[Tuple[int, Optimizer]], batch_idx: int) -> Dict[int, Dict[str, Any]]:
        """``Loop.run``; for this exact class written out with ``reset``, ``on_run_start``,
        ``done``, ``advance`` and ``on_run_end`` inlined, because it runs once per batch.

        Subclasses (``YieldLoop``, users' loops) run the generic skeleton with their overrides.
        ``tests/test_inlined_loops.py`` checks that both give the same calls, outputs and state.
        """
        if type(self) is not OptimizerLoop:
            return super().run(batch, optimizers, batch_idx)
        progress = self.optim_progress
        if self._restarting:  # reset
            progress.reset_on_restart()
        else:
            progress.optimizer_position = 0
        self._outputs = outputs = {}
        self._indices, self._optimizers = indices, optimizer_list = split_pairs(optimizers)
        count = len(optimizer_list)
        if progress.optimizer_position >= count:  # on_run_start
            progress.optimizer_position = 0
        if batch_idx == 0:
            self.check_trainable()
        train_step = self.train_step
        try:
            while progress.optimizer_position < count:  # done
                position = progress.optimizer_position  # advance
                if train_step is None:
                    raise RuntimeError(f"{type(self).__name__}.setup() did not run: it builds the training step")
                opt_idx = indices[position]
                result = train_step(batch, batch_idx, opt_idx, optimizer_list[position])
                if result.closure_loss is not None:
                    outputs[opt_idx] = result.asdict()
                progress.optimizer_position = position + 1
                self._restarting = False
        except StopIteration:
            pass
        self._restarting = False
        self._outputs = {}  # on_run_end
        return outputs

    @property
    def done(self) -> bool:
        return self.optim_progress.optimizer_position >= len(self._optimizers)

    def reset(self) -> None:
        # ``current`` step counters are per epoch: the epoch loop resets them.
        if self.restarting:
            self.optim_progress.reset_on_restart()
        else:
            self.optim_progress.optimizer_position = 0
        self._outputs = {}

    def on_run_start(self, batch: Any, optimizers: Sequence[Tuple[int, Optimizer]], batch_idx: int) -> None:
        self._indices, self._optimizers = split_pairs(optimizers)
        if batch_idx == 0:
            self.check_trainable()
        if self.done:
            self.optim_progress.optimizer_position = 0

    def advance(self, batch: Any, optimizers: Sequence[Tuple[int, Optimizer]], batch_idx: int) -> None:
        position = self.optim_progress.optimizer_position
        opt_idx, optimizer = self._indices[position], self._optimizers[position]
        if self.train_step is None:
            raise RuntimeError(f"{type(self).__name__}.setup() did not run: it builds the training step")
        result = self.train_step(batch, batch_idx, opt_idx, optimizer)
        if result.closure_loss is not None:
            self._outputs[opt_idx] = result.asdict()
        self.optim_progress.optimizer_position += 1

    def on_run_end(self) -> Dict[int, Dict[str, Any]]:
        outputs, self._outputs = self._outputs, {}
        return outputs

    @property
    def optimizer_idx(self) -> int:
        return self._indices[self.optim_progress.optimizer_position]
