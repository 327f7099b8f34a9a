"""``Module``: a ``torch.nn.Module`` with the training hooks of Lightning 1.x.

Override ``training_step`` and ``configure_optimizers`` (plus the ``*_dataloader`` methods or a
``DataModule``); every other hook has a default. Hook call order is documented in
``fastloop.loops`` and checked by the golden hook-order test.
"""
from __future__ import annotations

import builtins
import os
import warnings
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from fastloop import hparams as _hparams
from fastloop.hparams import HyperparametersMixin
from fastloop.optim import LoopOptimizer, clip_gradients
from fastloop.results import REDUCE_FX_CALLABLES

if TYPE_CHECKING:
    from fastloop.trainer import Trainer


# Reductions given as functions, by the name the metric logger takes.


class Module(HyperparametersMixin, nn.Module):
    """Base class for models trained by ``fastloop.Trainer``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._example_input_array: Optional[Union[Tensor, Tuple[Any, ...], Dict[str, Any]]] = None
        self._automatic_optimization = True
        self._trainer: Optional["Trainer"] = None
        self._param_requires_grad_state: Dict[Tensor, bool] = {}

    # ------------------------------------------------------------- properties
    @property
    def trainer(self) -> "Trainer":
        if self._trainer is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a Trainer.")
        return self._trainer

    @property
    def automatic_optimization(self) -> bool:
        return self._automatic_optimization

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        self._automatic_optimization = value

    @property
    def current_epoch(self) -> int:
        return self._trainer.current_epoch if self._trainer is not None else 0

    @property
    def global_step(self) -> int:
        return self._trainer.global_step if self._trainer is not None else 0

    @property
    def global_rank(self) -> int:
        """This process's rank among all processes (0 without a trainer)."""
        return self._trainer.global_rank if self._trainer is not None else 0

    @property
    def local_rank(self) -> int:
        """This process's rank on its machine (0 without a trainer)."""
        return self._trainer.local_rank if self._trainer is not None else 0

    @property
    def logger(self) -> Any:
        """The trainer's first logger (None without a trainer or a logger)."""
        return getattr(self._trainer, "logger", None) if self._trainer is not None else None

    @property
    def loggers(self) -> List[Any]:
        """The trainer's loggers ([] without a trainer)."""
        return getattr(self._trainer, "loggers", []) if self._trainer is not None else []

    @property
    def example_input_array(self) -> Optional[Union[Tensor, Tuple[Any, ...], Dict[str, Any]]]:
        """What ``forward`` can take: a tensor (one argument), a tuple (positional) or a dict (keywords)."""
        return self._example_input_array

    @example_input_array.setter
    def example_input_array(self, example: Optional[Union[Tensor, Tuple[Any, ...], Dict[str, Any]]]) -> None:
        self._example_input_array = example

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")

    # ---------------------------------------------------------------- logging
    def log(
        self,
        name: str,
        value: Any,
        prog_bar: bool = False,
        logger: Optional[bool] = None,
        on_step: Optional[bool] = None,
        on_epoch: Optional[bool] = None,
        reduce_fx: Union[str, Callable[..., Any]] = "mean",
        enable_graph: bool = False,
        sync_dist: bool = False,
        sync_dist_group: Optional[Any] = None,
        add_dataloader_idx: bool = True,
        batch_size: Optional[int] = None,
        metric_attribute: Optional[str] = None,
        rank_zero_only: bool = False,
    ) -> None:
        """Record a scalar. Defaults: per step in training steps, per epoch elsewhere.

        Takes Lightning 1.x's arguments. With several processes, ``sync_dist=True`` reduces the
        value across the ranks of ``sync_dist_group`` (default: all) with ``reduce_fx``: a per-step
        value when logged, an epoch value at epoch end; a collective, so every rank must log it.
        ``rank_zero_only=True`` (logged from rank 0 only) never syncs. On one process these change
        nothing. Without a trainer (a step called directly, as in a unit test) it warns and does
        nothing, as Lightning does.
        """
        if self._trainer is None:
            warnings.warn(f"self.log({name!r}) was called but the module is not attached to a Trainer: "
                          "the value is dropped")
            return
        if logger is None:
            logger = True
        if not isinstance(reduce_fx, str):  # torch.mean & co. by name (identity tests also trace well)
            reduce_fx = next((n for fn, n in REDUCE_FX_CALLABLES if reduce_fx is fn), reduce_fx)
        self._trainer.metrics.log(
            name, value, prog_bar=prog_bar, logger=logger, on_step=on_step, on_epoch=on_epoch,
            reduce_fx=reduce_fx, batch_size=batch_size,
            sync_dist=bool(sync_dist) and not rank_zero_only, sync_dist_group=sync_dist_group,
        )

    def log_dict(
        self,
        dictionary: Dict[str, Any],
        prog_bar: bool = False,
        logger: Optional[bool] = None,
        on_step: Optional[bool] = None,
        on_epoch: Optional[bool] = None,
        reduce_fx: Union[str, Callable[..., Any]] = "mean",
        enable_graph: bool = False,
        sync_dist: bool = False,
        sync_dist_group: Optional[Any] = None,
        add_dataloader_idx: bool = True,
        batch_size: Optional[int] = None,
        rank_zero_only: bool = False,
    ) -> None:
        """``self.log`` for each item of ``dictionary``, with the same options."""
        for name, value in dictionary.items():
            self.log(
                name, value, prog_bar=prog_bar, logger=logger, on_step=on_step, on_epoch=on_epoch,
                reduce_fx=reduce_fx, enable_graph=enable_graph, sync_dist=sync_dist,
                sync_dist_group=sync_dist_group, add_dataloader_idx=add_dataloader_idx,
                batch_size=batch_size, rank_zero_only=rank_zero_only,
            )

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on the global-zero process only (through the progress bar when it has one)."""
        trainer = self._trainer
        is_zero = getattr(trainer, "is_global_zero", None) if trainer is not None else None
        if is_zero is None:
            is_zero = os.environ.get("RANK", "0") == "0"
        if not is_zero:
            return
        bar = getattr(trainer, "progress_bar_callback", None)
        if bar is not None and getattr(bar, "is_enabled", False) and hasattr(bar, "print"):
            bar.print(*args, **kwargs)
        else:
            builtins.print(*args, **kwargs)

    # ------------------------------------------------------------ inference
    def freeze(self) -> None:
        """Stop gradients to every parameter and switch to eval mode."""
        for param in self.parameters():
            param.requires_grad = False
        self.eval()

    def unfreeze(self) -> None:
        """Let gradients reach every parameter again and switch to train mode."""
        for param in self.parameters():
            param.requires_grad = True
        self.train()

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: Union[str, "os.PathLike[str]"],
        map_location: Any = None,
        hparams_file: Optional[str] = None,
        strict: bool = True,
        **kwargs: Any,
    ) -> Any:
        """A new module built from a checkpoint's hyperparameters (``kwargs`` override) and weights."""
        return _hparams.load_from_checkpoint(cls, checkpoint_path, map_location, hparams_file, strict, **kwargs)

    # ------------------------------------------------------------- optimizers
    def optimizers(self, use_pl_optimizer: bool = True) -> Union[LoopOptimizer, Optimizer, List[Any]]:
        """The optimizer(s) from ``configure_optimizers``: wrapped (counting steps) by default."""
        trainer = self.trainer
        opts: List[Any] = trainer.optimizer_wrappers if use_pl_optimizer else trainer.optimizers
        return opts[0] if len(opts) == 1 else opts

    def lr_schedulers(self) -> Any:
        configs = self.trainer.lr_scheduler_configs
        if not configs:
            return None
        scheds = [c.scheduler for c in configs]
        return scheds[0] if len(scheds) == 1 else scheds

    def manual_backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Backward pass for manual optimization, with the backward hooks."""
        self.trainer._run_backward(loss, None, None, *args, **kwargs)

    def clip_gradients(
        self,
        optimizer: Union[Optimizer, LoopOptimizer],
        gradient_clip_val: Optional[float] = None,
        gradient_clip_algorithm: Optional[str] = None,
    ) -> None:
        if isinstance(optimizer, LoopOptimizer):
            optimizer = optimizer.optimizer
        clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def toggle_optimizer(self, optimizer: Union[Optimizer, LoopOptimizer], optimizer_idx: int) -> None:
        """Freeze parameters owned only by other optimizers (``requires_grad=False``)."""
        if isinstance(optimizer, LoopOptimizer):
            optimizer = optimizer.optimizer
        state: Dict[Tensor, bool] = {}
        for opt in self.trainer.optimizers:
            for group in opt.param_groups:
                for param in group["params"]:
                    if param not in state:
                        state[param] = param.requires_grad
                        param.requires_grad = False
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.requires_grad = state[param]
        self._param_requires_grad_state = state

    def untoggle_optimizer(self, optimizer_idx: int) -> None:
        for param, requires_grad in self._param_requires_grad_state.items():
            param.requires_grad = requires_grad
        self._param_requires_grad_state = {}

    # ------------------------------------------------------------ user steps
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not define `training_step`")

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not define `validation_step`")

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not define `test_step`")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        return self(batch)

    def training_epoch_end(self, outputs: List[Any]) -> None: ...
    def validation_epoch_end(self, outputs: List[Any]) -> None: ...
    def test_epoch_end(self, outputs: List[Any]) -> None: ...

    def configure_optimizers(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not define `configure_optimizers`")

    def configure_callbacks(self) -> List[Any]:
        return []

    # ------------------------------------------------------------ data hooks
    def prepare_data(self) -> None: ...
    def setup(self, stage: str) -> None: ...
    def teardown(self, stage: str) -> None: ...

    def train_dataloader(self) -> Any:
        raise NotImplementedError("no `train_dataloader`")

    def val_dataloader(self) -> Any:
        raise NotImplementedError("no `val_dataloader`")

    def test_dataloader(self) -> Any:
        raise NotImplementedError("no `test_dataloader`")

    def predict_dataloader(self) -> Any:
        raise NotImplementedError("no `predict_dataloader`")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return batch

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return move_to_device(batch, device)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return batch

    # ----------------------------------------------------- optimization hooks
    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Union[Optimizer, LoopOptimizer],
        optimizer_idx: int = 0,
        optimizer_closure: Optional[Callable[[], Any]] = None,
        on_tpu: bool = False,
        using_lbfgs: bool = False,
    ) -> None:
        """Default: ``optimizer.step(closure=optimizer_closure)``; the closure runs the step."""
        optimizer.step(closure=optimizer_closure)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Optimizer, optimizer_idx: int) -> None:
        optimizer.zero_grad()

    def backward(self, loss: Tensor, optimizer: Optional[Optimizer], optimizer_idx: Optional[int], *args: Any,
                 **kwargs: Any) -> None:
        loss.backward(*args, **kwargs)

    def configure_gradient_clipping(
        self,
        optimizer: Optimizer,
        optimizer_idx: int,
        gradient_clip_val: Optional[float] = None,
        gradient_clip_algorithm: Optional[str] = None,
    ) -> None:
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def lr_scheduler_step(self, scheduler: Any, optimizer_idx: int, metric: Optional[Any]) -> None:
        if metric is None:
            scheduler.step()
        else:
            scheduler.step(metric)

    # ------------------------------------------------------ observation hooks
    def on_fit_start(self) -> None: ...
    def on_fit_end(self) -> None: ...
    def on_train_start(self) -> None: ...
    def on_train_end(self) -> None: ...
    def on_train_epoch_start(self) -> None: ...
    def on_train_epoch_end(self) -> None: ...
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Optional[int]: ...
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None: ...
    def on_validation_start(self) -> None: ...
    def on_validation_end(self) -> None: ...
    def on_validation_epoch_start(self) -> None: ...
    def on_validation_epoch_end(self) -> None: ...
    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_validation_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_test_start(self) -> None: ...
    def on_test_end(self) -> None: ...
    def on_test_epoch_start(self) -> None: ...
    def on_test_epoch_end(self) -> None: ...
    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_test_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_predict_start(self) -> None: ...
    def on_predict_end(self) -> None: ...
    def on_predict_epoch_start(self) -> None: ...
    def on_predict_epoch_end(self, results: List[Any]) -> None: ...
    def on_predict_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_predict_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_before_zero_grad(self, optimizer: Optimizer) -> None: ...
    def on_before_backward(self, loss: Tensor) -> None: ...
    def on_after_backward(self) -> None: ...
    def on_before_optimizer_step(self, optimizer: Optimizer, optimizer_idx: int) -> None: ...
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None: ...
    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None: ...

    def on_validation_model_eval(self) -> None:
        self.eval()

    def on_validation_model_train(self) -> None:
        self.train()

    def on_test_model_eval(self) -> None:
        self.eval()

    def on_test_model_train(self) -> None:
        self.train()

    def on_predict_model_eval(self) -> None:
        self.eval()


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``; other values pass through."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True) if batch.device != device else batch
    if isinstance(batch, dict):
        return type(batch)((k, move_to_device(v, device)) for k, v in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch
