"""Where each stage's data comes from, how many batches it gives, and batch transfer.

Sources, first found wins: loaders passed to the entry point, the ``DataModule``'s method, the
module's ``*_dataloader`` method. Eval stages accept a list of loaders (``dataloader_idx``).
With several processes, each ``DataLoader`` is rebuilt to read this rank's shard
(``fastloop/distributed/sampler.py``) unless ``Trainer(use_distributed_sampler=False)``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Union

import torch

from fastloop.datamodule import DataModule
from fastloop.hooks import is_overridden
from fastloop.module import Module

if TYPE_CHECKING:
    from fastloop.trainer import Trainer

Limit = Union[int, float]
_HOOK_NAMES = {"train": "train_dataloader", "val": "val_dataloader", "test": "test_dataloader",
               "predict": "predict_dataloader"}


@dataclass
class StageData:
    loaders: List[Any]
    max_batches: List[Limit]
    # What the batches were counted with (``check_lengths``); None: not checked.
    limit: Optional[Limit] = None
    hook: str = ""

    @property
    def total_batches(self) -> Limit:
        return sum(self.max_batches) if self.loaders else 0

    def check_lengths(self, epoch: int) -> None:
        """Raise if a loader now gives a different number of batches than when they were counted
        (once per entry point, or per reload): validation points, the last accumulation window and
        epoch-end work were placed on that count."""
        if self.limit is None:
            return
        for i, (loader, counted) in enumerate(zip(self.loaders, self.max_batches)):
            now = count_batches(loader, self.limit, f"limit_{self.hook.split('_')[0]}_batches")
            if now != counted:
                source = f"`{self.hook}`" + (f" source {i}" if len(self.loaders) > 1 else "")
                raise ValueError(
                    f"{source} ({type(loader).__name__}) gave {counted} batches when they were counted and gives "
                    f"{now} at epoch {epoch}: its length must not change between epochs; return a loader of "
                    "fixed length, or set Trainer(reload_dataloaders_every_n_epochs=1) to count again each epoch"
                )


def loader_length(loader: Any) -> Limit:
    """``len(loader)``, or infinity for a loader without one."""
    try:
        return len(loader)
    except (TypeError, NotImplementedError):
        return math.inf


def count_batches(loader: Any, limit: Limit, what: str) -> Limit:
    """Batches to run from ``loader`` given a ``limit_*_batches`` value (int count or fraction)."""
    n = loader_length(loader)
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit < 0:
        raise ValueError(f"{what} must be a non-negative int or a float in [0, 1], got {limit!r}")
    if isinstance(limit, int):
        return min(n, limit)
    if limit > 1.0:
        raise ValueError(f"{what}={limit} is a fraction above 1.0; pass an int to count batches")
    if limit == 1.0:
        return n
    if n == math.inf:
        raise ValueError(f"{what}={limit} is a fraction, which needs a loader with len(); pass an int")
    if limit > 0 and int(n * limit) == 0:
        # As Lightning 1.9: a non-zero fraction that rounds to no batch is a mistake, not a request.
        raise ValueError(
            f"{what}={limit} of the {n} batches of the {what.split('_')[1]} dataloader is less than one batch; "
            f"pass at least {what}={1 / n:.4g}, or an int"
        )
    return int(n * limit)


def warn_if_empty(loader: Any, hook: str, index: int, several: bool) -> None:
    """Lightning 1.9 warns about a loader of zero length and goes on (fit then trains nothing)."""
    if loader_length(loader) != 0:
        return
    source = f"`{hook}`" + (f" source {index}" if several else "")
    consequence = {"train_dataloader": "fit runs no training step (global_step stays 0)"}.get(
        hook, f"{hook.split('_')[0]} runs no step on it")
    warnings.warn(
        f"{source} ({type(loader).__name__}) has zero length: {consequence}. Please make sure this was your "
        "intention.", UserWarning, stacklevel=5,
    )


class DataConnector:
    """Resolves and caches the loaders of one entry-point call."""

    def __init__(self, trainer: "Trainer") -> None:
        self._trainer = trainer
        self._explicit: Dict[str, Any] = {}
        self.datamodule: Optional[DataModule] = None
        self._cache: Dict[str, StageData] = {}
        self._transfer_needed = True
        self._copier: Any = None

    def attach(self, datamodule: Optional[DataModule] = None, **explicit: Any) -> None:
        self.datamodule = datamodule
        self._explicit = {k: v for k, v in explicit.items() if v is not None}
        self._cache = {}
        module = self._trainer.module
        hooks = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")
        self._transfer_needed = self._trainer.device.type != "cpu" or any(
            is_overridden(h, module, Module) for h in hooks
        )

    def device_copier(self) -> Any:
        """A ``DeviceCopier`` that prefetches training batches to the GPU on a side stream, or None.

        None on CPU, and when the module overrides a batch-transfer hook: those hooks must
        see the batch on the host, in the loop's order.
        """
        device = self._trainer.device
        if device.type != "cuda":
            return None
        module = self._trainer.module
        hooks = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")
        if any(is_overridden(h, module, Module) for h in hooks):
            return None
        if self._copier is None:
            from fastloop.data.device_copy import DeviceCopier

            self._copier = DeviceCopier(device)
        return self._copier

    def clear_cache(self) -> None:
        self._cache = {}

    def has_source(self, stage: str) -> bool:
        name = _HOOK_NAMES[stage]
        if stage in self._explicit:
            return True
        if self.datamodule is not None and is_overridden(name, self.datamodule, DataModule):
            return True
        return is_overridden(name, self._trainer.module, Module)

    def stage_data(self, stage: str, limit: Limit) -> StageData:
        """Loaders of ``stage`` and the batches to run from each (requested once per call)."""
        if stage not in self._cache:
            loaders = self._request(stage)
            if self._trainer.overfit_batches > 0:
                from fastloop.trainer_args import without_shuffling

                loaders = [without_shuffling(dl, stage) for dl in loaders]
            what = f"limit_{stage}_batches"
            name = _HOOK_NAMES[stage]
            if getattr(self._trainer, "use_distributed_sampler", True):
                from fastloop.distributed.sampler import distribute_loader

                loaders = [distribute_loader(dl, stage, name) for dl in loaders]
            for i, loader in enumerate(loaders):
                warn_if_empty(loader, name, i, len(loaders) > 1)
            self._cache[stage] = StageData(loaders, [count_batches(dl, limit, what) for dl in loaders], limit, name)
        return self._cache[stage]

    def _request(self, stage: str) -> List[Any]:
        name = _HOOK_NAMES[stage]
        if stage in self._explicit:
            source = self._explicit[stage]
        elif self.datamodule is not None and is_overridden(name, self.datamodule, DataModule):
            source = getattr(self.datamodule, name)()
        elif is_overridden(name, self._trainer.module, Module):
            source = self._trainer.hooks.call_module(name)
        else:
            return []
        if source is None:
            return []
        # Training takes one iterable (a list is a list of batches); evaluation stages take a
        # loader or a list of loaders (``dataloader_idx``).
        several = stage != "train" and isinstance(source, (list, tuple))
        loaders = list(source) if several else [source]
        for i, loader in enumerate(loaders):
            if not hasattr(loader, "__iter__"):
                raise TypeError(f"{name} source {i} is a {type(loader).__name__}, which is not iterable")
        return loaders

    def transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Check the batch, then run the batch-transfer hooks: before, to device, after."""
        if batch is None or isinstance(batch, (str, bytes)):
            what = "None" if batch is None else f"a {type(batch).__name__} ({batch[:20]!r})"
            raise TypeError(
                f"dataloader {dataloader_idx} yielded {what} as a batch; a batch must be a tensor or a "
                "tuple/list/dict of tensors"
            )
        if not self._transfer_needed:
            return batch
        hooks = self._trainer.hooks
        batch = hooks.call_module("on_before_batch_transfer", batch, dataloader_idx)
        batch = hooks.call_module("transfer_batch_to_device", batch, self._trainer.device, dataloader_idx)
        return hooks.call_module("on_after_batch_transfer", batch, dataloader_idx)


def set_epoch(loader: Any, epoch: int) -> None:
    """Tell a loader (or its sampler) which epoch starts, for per-epoch shuffling."""
    for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if obj is not None and callable(getattr(obj, "set_epoch", None)):
            obj.set_epoch(epoch)
            return


def device_of(accelerator: str) -> torch.device:
    if accelerator == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"accelerator={accelerator!r} was requested but CUDA is not available")
        return torch.device("cuda")
    if accelerator == "cpu":
        return torch.device("cpu")
    raise ValueError(f"accelerator must be 'auto', 'cpu', 'cuda' or 'gpu', got {accelerator!r}")
