"""A generator ``training_step`` loop written as a user would, on OptimizerLoop's documented
extension points only (fastloop ships the same loop as ``fastloop.loops.YieldLoop``)."""
import inspect
from functools import partial

from fastloop.loops import OptimizerLoop


class MyYieldLoop(OptimizerLoop):
    def check_training_step(self, module, num_optimizers):
        if not inspect.isgeneratorfunction(type(module).training_step):
            raise TypeError("MyYieldLoop needs a training_step that yields one loss per optimizer")

    def on_run_start(self, batch, optimizers, batch_idx):
        super().on_run_start(batch, optimizers, batch_idx)
        # Ask for the generator once per batch; each optimizer then takes the next loss.
        self._generator = self.call_training_step(batch, batch_idx)
        self._last_idx = optimizers[-1][0]

    def make_step_fn(self, batch, batch_idx, optimizer_idx):
        return partial(next, self._generator)

    def backward_kwargs(self, optimizer_idx):
        # Later losses reuse the shared work, so keep its graph until the last backward.
        return {"retain_graph": optimizer_idx != self._last_idx}

    @property
    def toggle_parameters(self):
        return False  # the shared work runs before any optimizer's turn
