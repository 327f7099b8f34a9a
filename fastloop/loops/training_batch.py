"""``TrainingBatchLoop``: runs one batch through the optimizer loop or the manual loop."""
from __future__ import annotations

from typing import Any, Optional

from fastloop.loops.base import Loop
from fastloop.loops.manual import ManualOptimization
from fastloop.loops.optimizer import OptimizerLoop


class TrainingBatchLoop(Loop):
    """One advance per batch: automatic optimization (``optimizer_loop``) or manual."""

    def __init__(self) -> None:
        super().__init__()
        self.optimizer_loop = OptimizerLoop()
        self.manual_loop = ManualOptimization()
        self._done = False
        self._output: Any = None

    def connect(  # type: ignore[override]
        self, optimizer_loop: Optional[OptimizerLoop] = None, manual_loop: Optional[ManualOptimization] = None
    ) -> None:
        super().connect(optimizer_loop=optimizer_loop, manual_loop=manual_loop)

    def run(self, batch: Any, batch_idx: int) -> Any:
        """``Loop.run``; for this exact class written out with ``reset``, ``done``, ``advance``
        and ``on_run_end`` inlined, because it runs once per batch. Subclasses run the generic
        skeleton with their overrides."""
        if type(self) is not TrainingBatchLoop:
            return super().run(batch, batch_idx)
        self._done, self._output = False, None  # reset
        try:
            self.advance(batch, batch_idx)
            self._restarting = False
        except StopIteration:
            pass
        self._restarting = False
        return self._output

    @property
    def done(self) -> bool:
        return self._done

    def reset(self) -> None:
        self._done = False
        self._output = None

    def advance(self, batch: Any, batch_idx: int) -> None:
        trainer = self.trainer
        if trainer.module.automatic_optimization:
            optimizers = trainer.active_optimizers(batch_idx)
            outputs = self.optimizer_loop.run(batch, optimizers, batch_idx)
            # One optimizer: its output dict; several: a list in optimizer order.
            if len(trainer.optimizers) == 1:
                self._output = outputs.get(0)
            else:
                self._output = [outputs.get(i) for i, _ in optimizers]
        else:
            self._output = self.manual_loop.run(batch, batch_idx)
        self._done = True

    def on_run_end(self) -> Any:
        return self._output

    def reset_progress(self) -> None:
        self.optimizer_loop.optim_progress.reset()
        self.manual_loop.optim_step_progress.reset()
