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

from torch import Tensor
from torch.optim import Optimizer

from fastloop.loops.base import Loop
from fastloop.loops.progress import OptimizationProgress


class StepOutput:
    """What one optimizer's ``training_step`` produced, as the loop and hooks see it.

    ``closure_loss`` is divided by ``accumulate_grad_batches`` and is what backward uses;
    ``loss`` is it detached (what hooks see); ``extra`` holds the other entries of a dict output.
    A plain class with slots: one is built per optimizer per batch.
    """

    __slots__ = ("closure_loss", "extra", "loss")

    def __init__(self, closure_loss: Optional[Tensor], extra: Optional[Dict[str, Any]] = None) -> None:
        self.closure_loss = closure_loss
        self.extra: Dict[str, Any] = {} if extra is None else extra
        self.loss: Optional[Tensor] = None if closure_loss is None else closure_loss.detach()

    def __repr__(self) -> str:
        return f"StepOutput(loss={self.loss!r}, extra={self.extra!r})"

    @classmethod
    def from_training_step_output(cls, output: Any, accumulate: int) -> "StepOutput":
        extra: Optional[Dict[str, Any]] = None
        if isinstance(output, Tensor):
            loss = output
        elif output is None:
            return cls(None)
        elif isinstance(output, dict):
            if "loss" not in output:
                raise ValueError(
                    "In automatic optimization, `training_step` returned a dict without a 'loss' key "
                    f"(keys: {sorted(output)}); return the loss tensor or a dict with 'loss'"
                )
            loss = output["loss"]
            extra = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in output.items() if k != "loss"}
        else:
            raise TypeError(
                f"In automatic optimization, `training_step` must return a Tensor, a dict with 'loss', or None "
                f"(to skip the batch); it returned {type(output).__name__}"
            )
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"`training_step` must return a scalar loss, got {shape}")
        if not loss.requires_grad:
            raise ValueError(
                "the loss returned by `training_step` does not require grad: it was computed without "
                "the model's parameters or under torch.no_grad()"
            )
        return cls(loss / accumulate if accumulate != 1 else loss, extra)

    def asdict(self) -> Dict[str, Any]:
        return {"loss": self.loss, **self.extra}


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

    _runtime_attributes = {"train_step": None, "_indices": (), "_optimizers": ()}

    def __init__(self) -> None:
        super().__init__()
        self.optim_progress = OptimizationProgress()
        self.train_step: Optional[Callable[..., StepOutput]] = None  # built by ``setup``
        self._indices: Tuple[int, ...] = ()
        self._optimizers: Tuple[Optimizer, ...] = ()
        self._outputs: Dict[int, Dict[str, Any]] = {}

    def connect(self, **loops: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no child loops to connect")

    # ------------------------------------------------------------ extension points
    def setup(self) -> None:
        """Check the optimizers' parameters and ``training_step``'s signature, then build the step
        for the trainer's mode."""
        from fastloop.step.build import build_train_step

        from fastloop.optim import check_parameters_belong

        trainer = self.trainer
        module = trainer.module
        check_parameters_belong(trainer.optimizers, module)
        if module.automatic_optimization:
            self.check_training_step(module, len(trainer.optimizers))
        self.train_step = build_train_step(self)

    def check_training_step(self, module: Any, num_optimizers: int) -> None:
        """Several optimizers need an ``optimizer_idx`` parameter in ``training_step``."""
        if num_optimizers > 1 and not has_parameter(module.training_step, "optimizer_idx"):
            raise ValueError(
                f"Your Module defines {num_optimizers} optimizers but `training_step` is missing the "
                "`optimizer_idx` argument."
            )

    def call_training_step(self, batch: Any, batch_idx: int, optimizer_idx: Optional[int] = None) -> Any:
        """Call the module's ``training_step``; ``optimizer_idx`` is passed when given."""
        hooks = self.trainer.hooks
        if optimizer_idx is None:
            return hooks.call_module("training_step", batch, batch_idx)
        return hooks.call_module("training_step", batch, batch_idx, optimizer_idx)

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
