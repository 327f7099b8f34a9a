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
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from torch import Tensor
from torch.optim import Optimizer

from fastloop.loops.base import Loop
from fastloop.loops.progress import OptimizationProgress


@dataclass
class StepOutput:
    """What one optimizer's ``training_step`` produced, as the loop and hooks see it."""

    closure_loss: Optional[Tensor]  # divided by accumulate_grad_batches; what backward uses
    extra: Dict[str, Any] = field(default_factory=dict)
    loss: Optional[Tensor] = field(init=False)  # closure_loss detached: what hooks see

    def __post_init__(self) -> None:
        self.loss = None if self.closure_loss is None else self.closure_loss.detach()

    @classmethod
    def from_training_step_output(cls, output: Any, accumulate: int) -> "StepOutput":
        if output is None:
            return cls(None)
        if isinstance(output, dict):
            if "loss" not in output:
                raise ValueError(
                    "In automatic optimization, `training_step` returned a dict without a 'loss' key "
                    f"(keys: {sorted(output)}); return the loss tensor or a dict with 'loss'"
                )
            loss = output["loss"]
            extra = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in output.items() if k != "loss"}
        elif isinstance(output, Tensor):
            loss, extra = output, {}
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


def has_parameter(fn: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class OptimizerLoop(Loop):
    """Steps each active optimizer on one batch."""

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
        """Check ``training_step``'s signature, then build the step for the trainer's mode."""
        from fastloop.step.build import build_train_step

        trainer = self.trainer
        module = trainer.module
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
        self._indices = tuple(i for i, _ in optimizers)
        self._optimizers = tuple(o for _, o in optimizers)
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
