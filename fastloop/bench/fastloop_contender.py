"""fastloop's ``Trainer`` as a contender, in a requested mode (eager, compiled, cudagraph)."""
from __future__ import annotations

import copy
import re
import tempfile
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from fastloop.bench.contender import BatchCycle, Contender, Outcome, RunSpec
from fastloop.bench.driven_fit import FitDriver, loss_from_outputs
from fastloop.callback import Callback
from fastloop.module import Module
from fastloop.trainer import Trainer


class BenchModule(Module):
    """Wraps a workload's network: ``training_step`` computes the loss and nothing else (no
    logging), so it does the same work as the raw loop's step."""

    def __init__(self, net: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
                 make_optimizer: Callable[..., torch.optim.Optimizer]) -> None:
        super().__init__()
        self.net = net
        self.loss_fn = loss_fn
        self.make_optimizer = make_optimizer

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return self.loss_fn(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(list(self.net.parameters()))


class LoggingBenchModule(BenchModule):
    """``BenchModule`` that also logs its loss every step, shown in the progress bar."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.loss_fn(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss


class _DriverCallback(Callback):
    def __init__(self, driver: FitDriver) -> None:
        self.driver = driver

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.driver.batch_end(outputs)


def mode_used(trainer: Trainer) -> str:
    """The mode the training step actually used: the step report, else parsed from ``explain()``."""
    try:
        return str(trainer.fit_loop.epoch_loop.batch_loop.optimizer_loop.step_report.used)
    except AttributeError:
        match = re.search(r"optimizer_loop \(\w+\): (\w+)", trainer.explain())
        return match.group(1) if match else "unknown"


class FastloopContender(Contender):
    """``Trainer(mode=...)`` with no progress bar and no sanity check, one fit for the whole run.

    ``log_loss``: the module logs its loss every step (``self.log(..., prog_bar=True)``).
    ``lightning_defaults``: the Trainer keeps Lightning's default callbacks and logger (progress
    bar, model summary, ModelCheckpoint, CSVLogger); otherwise they are all off.
    """

    def __init__(self, mode: str, log_loss: bool = False, lightning_defaults: bool = False) -> None:
        self.mode_requested = mode
        self.log_loss = log_loss
        self.lightning_defaults = lightning_defaults
        suffix = "+defaults" if lightning_defaults else "+log" if log_loss else ""
        self.name = f"fastloop-{mode}{suffix}"
        self.driver: Optional[FitDriver] = None

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if self.mode_requested == "cudagraph" and device.type != "cuda":
            return "CUDA only (CUDA-graph capture)"
        return None

    def setup(self, spec: RunSpec) -> None:
        self.spec = spec
        net = copy.deepcopy(spec.model).to(spec.device)
        module_class = LoggingBenchModule if self.log_loss else BenchModule
        self.module = module_class(net, spec.workload.loss_fn, spec.workload.make_optimizer)
        self.driver = FitDriver(spec.device)
        self._tmp = tempfile.TemporaryDirectory(prefix="fastloop-bench-")
        defaults = {} if self.lightning_defaults else dict(
            logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
        self.trainer = Trainer(
            max_epochs=1, max_steps=spec.total_steps, num_sanity_val_steps=0, **defaults,
            mode=self.mode_requested, accelerator=spec.device.type, callbacks=[_DriverCallback(self.driver)],
            default_root_dir=self._tmp.name,
        )
        self.loader = BatchCycle(spec.batches, spec.total_steps)

    def warmup(self, steps: int) -> float:
        assert self.driver is not None
        return self.driver.start(lambda: self.trainer.fit(self.module, train_dataloaders=self.loader), steps)

    def run(self, steps: int) -> float:
        assert self.driver is not None
        return self.driver.resume(steps)

    def current_loss(self) -> Optional[float]:
        return None if self.driver is None else loss_from_outputs(self.driver.last_outputs)

    def finish(self) -> Outcome:
        assert self.driver is not None
        self.driver.finish(self.spec.total_steps)
        used = mode_used(self.trainer)
        notes = [line.strip() for line in self.trainer.explain().splitlines() if "fallback:" in line]
        return Outcome(loss_from_outputs(self.driver.last_outputs), used, notes[:1])

    def close(self) -> None:
        if self.driver is not None:
            self.driver.abort()
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            tmp.cleanup()
            self._tmp = None
