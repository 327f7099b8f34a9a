"""PyTorch Lightning's ``Trainer`` as a contender, when ``lightning`` or ``pytorch_lightning`` is
importable (it is an optional dependency; otherwise the contender is skipped with a note)."""
from __future__ import annotations

import copy
import importlib
import tempfile
from typing import Any, Optional

import torch

from fastloop.bench.contender import BatchCycle, Contender, Outcome, RunSpec
from fastloop.bench.driven_fit import FitDriver, loss_from_outputs


def import_lightning() -> Optional[Any]:
    """The ``pytorch_lightning`` (or ``lightning.pytorch``) module, or None."""
    for name in ("pytorch_lightning", "lightning.pytorch"):
        try:
            return importlib.import_module(name)
        except Exception:  # not installed, or broken against this torch
            continue
    return None


class LightningContender(Contender):
    """Lightning with logging, checkpointing, progress bar, summary and sanity check off."""

    name = "lightning"
    mode_requested = "eager"

    def __init__(self) -> None:
        self.driver: Optional[FitDriver] = None
        self.pl = import_lightning()

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if self.pl is None:
            return "pytorch_lightning/lightning not installed (pip install pytorch_lightning)"
        return None

    def setup(self, spec: RunSpec) -> None:
        pl = self.pl
        self.spec = spec
        workload = spec.workload
        driver = self.driver = FitDriver(spec.device)

        class BenchLightningModule(pl.LightningModule):  # type: ignore[name-defined,misc]
            def __init__(self, net: torch.nn.Module) -> None:
                super().__init__()
                self.net = net

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.net(x)

            def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
                x, y = batch
                return workload.loss_fn(self.net(x), y)

            def configure_optimizers(self) -> torch.optim.Optimizer:
                return workload.make_optimizer(list(self.net.parameters()))

        class DriverCallback(pl.Callback):  # type: ignore[name-defined,misc]
            def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                                   batch_idx: int, *args: Any) -> None:
                driver.batch_end(outputs)

        self.module = BenchLightningModule(copy.deepcopy(spec.model).to(spec.device))
        self._tmp = tempfile.TemporaryDirectory(prefix="fastloop-bench-pl-")
        self.trainer = pl.Trainer(
            max_epochs=1, max_steps=spec.total_steps, accelerator="gpu" if spec.device.type == "cuda" else "cpu",
            devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, callbacks=[DriverCallback()],
            default_root_dir=self._tmp.name,
        )
        self.loader = BatchCycle(spec.batches, spec.total_steps)
        self.version = getattr(pl, "__version__", "?")

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
        return Outcome(loss_from_outputs(self.driver.last_outputs), f"lightning {self.version}")

    def close(self) -> None:
        if self.driver is not None:
            self.driver.abort()
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            tmp.cleanup()
            self._tmp = None
