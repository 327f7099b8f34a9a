"""``YieldLoop``: automatic optimization with a generator ``training_step``.

``training_step`` yields one loss per optimizer, so work shared by the optimizers (a GAN's
generated images) is computed once per batch::

    def training_step(self, batch, batch_idx):
        fake = self.generator(noise)
        yield discriminator_loss(fake)   # optimizer 0 steps on this
        yield generator_loss(fake)       # optimizer 1 steps on this

    trainer.fit_loop.epoch_loop.batch_loop.connect(optimizer_loop=YieldLoop())

Because the shared work runs before any optimizer's turn, parameters are not frozen between
optimizers (each optimizer's zero_grad clears what earlier losses left in its parameters before
its own backward), and every backward but the last keeps the graph for the later losses.
"""
from __future__ import annotations

import inspect
from functools import partial
from typing import Any, Callable, Dict, Generator, Optional, Sequence, Tuple

from torch.optim import Optimizer

from fastloop.loops.optimizer import OptimizerLoop, has_parameter


class YieldLoop(OptimizerLoop):
    """An ``OptimizerLoop`` that takes each optimizer's loss from one generator per batch."""

    _runtime_attributes = {"_generator": None}

    def __init__(self) -> None:
        super().__init__()
        self._generator: Optional[Generator[Any, None, None]] = None

    def check_training_step(self, module: Any, num_optimizers: int) -> None:
        if not inspect.isgeneratorfunction(type(module).training_step):
            raise TypeError("YieldLoop needs a `training_step` that yields one loss per optimizer")

    def on_run_start(self, batch: Any, optimizers: Sequence[Tuple[int, Optimizer]], batch_idx: int) -> None:
        super().on_run_start(batch, optimizers, batch_idx)
        # As Lightning's yield-loop example: a training_step that takes optimizer_idx gets the
        # first active optimizer's index (the generator then serves them all).
        module = self.trainer.module
        several = len(self.trainer.optimizers) > 1
        first = optimizers[0][0] if several and has_parameter(module.training_step, "optimizer_idx") else None
        self._generator = self.call_training_step(batch, batch_idx, first)

    def make_step_fn(self, batch: Any, batch_idx: int, optimizer_idx: int) -> Callable[[], Any]:
        return partial(self._next_loss, optimizer_idx)

    def _next_loss(self, optimizer_idx: int) -> Any:
        try:
            return next(self._generator)  # type: ignore[arg-type]
        except StopIteration:
            # Not a loop stop: a generator with too few yields is a bug in training_step.
            raise RuntimeError(
                f"`training_step` yielded no loss for optimizer {optimizer_idx}: "
                f"it must yield once per optimizer ({len(self._indices)} here)"
            ) from None

    def backward_kwargs(self, optimizer_idx: int) -> Dict[str, Any]:
        return {"retain_graph": optimizer_idx != self._indices[-1]}

    @property
    def toggle_parameters(self) -> bool:
        return False

    def on_run_end(self) -> Dict[int, Dict[str, Any]]:
        self._generator = None
        return super().on_run_end()
