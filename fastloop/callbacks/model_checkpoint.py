"""``ModelCheckpoint``: save checkpoints during ``fit``, keeping the best ``save_top_k`` by a
monitored metric, as Lightning 1.9.5 does (same file names, triggers, attributes and state).

When it saves:

- ``every_n_train_steps=N``: after a training batch whose ``global_step`` is a multiple of N;
- ``every_n_epochs=N`` (the default, N=1, when no trigger is given): at the end of the training
  epoch, or at the end of validation when validation runs more or less often than once per
  epoch (``save_on_train_epoch_end`` overrides the choice);
- never while sanity checking, outside ``fit``, with ``fast_dev_run``, nor twice for one
  ``global_step``.

File names come from ``filename`` (default ``"{epoch}-{step}"``): ``"{epoch:02d}-{val_loss:.2f}"``
gives ``epoch=03-val_loss=0.12.ckpt``; a name already taken gets ``-v1``, ``-v2``...
Reading the metrics (formatting, comparing scores) synchronises with the device, and happens
only when a checkpoint is due.

Non-finite parameters: when a checkpoint is due, pending non-finite checks of the compiled step
are read first (``Trainer(nonfinite="raise")`` raises there, before anything is written), then
the parameters are checked; if one holds NaN/inf (possible under ``nonfinite="ignore"``) no file
is written or removed at that step, with a ``RuntimeWarning`` naming the step and the
parameter: the last good checkpoint stays the latest, rather than being replaced by a broken one.
"""
from __future__ import annotations

import logging
import math
import os
import re
import warnings
from typing import TYPE_CHECKING, Any, Dict, Optional

import torch

from fastloop.callback import Callback

if TYPE_CHECKING:
    from fastloop.module import Module
    from fastloop.trainer import Trainer

log = logging.getLogger(__name__)

_MODES = ("min", "max")


class ModelCheckpoint(Callback):
    """Save the model periodically, keeping the best ``save_top_k`` by ``monitor``.

    After ``fit``, ``best_model_path`` and ``best_model_score`` name the best checkpoint;
    ``last_model_path`` is ``last.ckpt`` when ``save_last`` is set.
    """

    CHECKPOINT_JOIN_CHAR = "-"
    CHECKPOINT_EQUALS_CHAR = "="
    CHECKPOINT_NAME_LAST = "last"
    FILE_EXTENSION = ".ckpt"
    STARTING_VERSION = 1

    def __init__(
        self,
        dirpath: Optional[str] = None,
        filename: Optional[str] = None,
        monitor: Optional[str] = None,
        verbose: bool = False,
        save_last: Optional[bool] = None,
        save_top_k: int = 1,
        save_weights_only: bool = False,
        mode: str = "min",
        auto_insert_metric_name: bool = True,
        every_n_train_steps: Optional[int] = None,
        train_time_interval: Any = None,
        every_n_epochs: Optional[int] = None,
        save_on_train_epoch_end: Optional[bool] = None,
    ) -> None:
        if train_time_interval is not None:
            raise NotImplementedError(
                f"ModelCheckpoint(train_time_interval={train_time_interval!r}) is not supported by fastloop; "
                "use every_n_train_steps or every_n_epochs"
            )
        if mode not in _MODES:
            raise ValueError(f"ModelCheckpoint(mode={mode!r}): `mode` can be 'min' or 'max'")
        self.monitor = monitor
        self.verbose = verbose
        self.save_last = save_last
        self.save_top_k = save_top_k
        self.save_weights_only = save_weights_only
        self.mode = mode
        self.auto_insert_metric_name = auto_insert_metric_name
        self.dirpath: Optional[str] = os.path.realpath(dirpath) if dirpath else None
        self.filename = filename
        self._save_on_train_epoch_end = save_on_train_epoch_end
        # No trigger given: once per epoch. Any trigger given: the others are off.
        if every_n_train_steps is None and every_n_epochs is None:
            every_n_train_steps, every_n_epochs = 0, 1
        self._every_n_train_steps: int = every_n_train_steps or 0
        self._every_n_epochs: int = every_n_epochs or 0
        self._train_time_interval = None
        self._last_global_step_saved = 0  # nothing to save before the first optimizer step
        self._validation_has_run = False  # a missing monitor is an error only once validation ran

        self.current_score: Optional[torch.Tensor] = None
        self.best_k_models: Dict[str, torch.Tensor] = {}
        self.kth_best_model_path = ""
        self.kth_value = torch.tensor(math.inf if mode == "min" else -math.inf)
        self.best_model_score: Optional[torch.Tensor] = None
        self.best_model_path = ""
        self.last_model_path = ""
        self._check_configuration()

    def _check_configuration(self) -> None:
        if self.save_top_k < -1:
            raise ValueError(f"ModelCheckpoint(save_top_k={self.save_top_k}): must be >= -1")
        if self._every_n_train_steps < 0:
            raise ValueError(f"ModelCheckpoint(every_n_train_steps={self._every_n_train_steps}): must be >= 0")
        if self._every_n_epochs < 0:
            raise ValueError(f"ModelCheckpoint(every_n_epochs={self._every_n_epochs}): must be >= 0")
        if self._every_n_train_steps >= 1 and self._every_n_epochs >= 1:
            raise ValueError(
                f"ModelCheckpoint(every_n_train_steps={self._every_n_train_steps}, "
                f"every_n_epochs={self._every_n_epochs}): the triggers are mutually exclusive"
            )
        if self.monitor is None and self.save_top_k not in (-1, 0, 1):
            raise ValueError(
                f"ModelCheckpoint(save_top_k={self.save_top_k}, monitor=None): no quantity to rank the "
                "top k by; set `monitor` or use save_top_k in (-1, 0, 1)"
            )

    @property
    def every_n_epochs(self) -> int:
        return self._every_n_epochs

    @property
    def state_key(self) -> str:
        # The same text as Lightning 1.9.5: the key a checkpoint stores this callback's state under.
        key = {
            "monitor": self.monitor, "mode": self.mode, "every_n_train_steps": self._every_n_train_steps,
            "every_n_epochs": self._every_n_epochs, "train_time_interval": self._train_time_interval,
        }
        return f"{type(self).__qualname__}{key!r}"

    # ------------------------------------------------------------------- hooks
    def setup(self, trainer: "Trainer", pl_module: "Module", stage: str) -> None:
        self.dirpath = self._resolve_dirpath(trainer)
        if trainer.is_global_zero and stage == "fit" and self.save_top_k != 0 and os.path.isdir(self.dirpath) \
                and os.listdir(self.dirpath):
            warnings.warn(f"Checkpoint directory {self.dirpath} exists and is not empty.")

    def on_train_batch_end(
        self, trainer: "Trainer", pl_module: "Module", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._every_n_train_steps < 1 or self._skip_saving(trainer):
            return
        if trainer.global_step % self._every_n_train_steps != 0:
            return
        if not self._parameters_finite(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_train_epoch_end(self, trainer: "Trainer", pl_module: "Module") -> None:
        if not self._skip_saving(trainer) and self._should_save_on_train_epoch_end(trainer):
            self._save_epoch_checkpoints(trainer)

    def on_validation_end(self, trainer: "Trainer", pl_module: "Module") -> None:
        if not trainer.sanity_checking:
            self._validation_has_run = True
        if not self._skip_saving(trainer) and not self._should_save_on_train_epoch_end(trainer):
            self._save_epoch_checkpoints(trainer)

    def _save_epoch_checkpoints(self, trainer: "Trainer") -> None:
        if not self._parameters_finite(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        if self._every_n_epochs >= 1 and (trainer.current_epoch + 1) % self._every_n_epochs == 0:
            self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    # ------------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        return {
            "monitor": self.monitor,
            "best_model_score": self.best_model_score,
            "best_model_path": self.best_model_path,
            "current_score": self.current_score,
            "dirpath": self.dirpath,
            "best_k_models": self.best_k_models,
            "kth_best_model_path": self.kth_best_model_path,
            "kth_value": self.kth_value,
            "last_model_path": self.last_model_path,
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        saved_dirpath = state_dict.get("dirpath", self.dirpath)
        if saved_dirpath == self.dirpath:
            self.best_model_score = state_dict["best_model_score"]
            self.kth_best_model_path = state_dict.get("kth_best_model_path", self.kth_best_model_path)
            self.kth_value = state_dict.get("kth_value", self.kth_value)
            self.best_k_models = state_dict.get("best_k_models", self.best_k_models)
            self.last_model_path = state_dict.get("last_model_path", self.last_model_path)
        else:
            warnings.warn(
                f"The dirpath has changed from {saved_dirpath!r} to {self.dirpath!r}, therefore "
                "`best_model_score`, `kth_best_model_path`, `kth_value`, `last_model_path` and `best_k_models` "
                "won't be reloaded. Only `best_model_path` will be reloaded."
            )
        self.best_model_path = state_dict["best_model_path"]

    # ------------------------------------------------------------------ naming
    @classmethod
    def _format_checkpoint_name(cls, filename: Optional[str], metrics: Dict[str, Any],
                                auto_insert_metric_name: bool = True) -> str:
        if not filename:
            filename = "{epoch}" + cls.CHECKPOINT_JOIN_CHAR + "{step}"
        # Each "{name" (up to ':' or '}') becomes "name={0[name]" so that str.format reads the dict.
        for group in re.findall(r"(\{.*?)[:\}]", filename):
            name = group[1:]
            if auto_insert_metric_name:
                filename = filename.replace(group, name + cls.CHECKPOINT_EQUALS_CHAR + "{" + name)
            filename = filename.replace(group, "{0[" + name + "]")
            metrics.setdefault(name, torch.tensor(0))  # a missing metric formats as 0, as in Lightning
        return filename.format(metrics)  # host sync: formats tensor values, only when saving

    def format_checkpoint_name(self, metrics: Dict[str, Any], filename: Optional[str] = None,
                               ver: Optional[int] = None) -> str:
        """The checkpoint path for ``metrics`` (``{name}`` fields filled from it), with ``-v<ver>``
        appended when ``ver`` is given; a bare file name while ``dirpath`` is unresolved."""
        name = self._format_checkpoint_name(filename or self.filename, metrics, self.auto_insert_metric_name)
        if ver is not None:
            name = self.CHECKPOINT_JOIN_CHAR.join((name, f"v{ver}"))
        name += self.FILE_EXTENSION
        return os.path.join(self.dirpath, name) if self.dirpath else name

    def _resolve_dirpath(self, trainer: "Trainer") -> str:
        """``dirpath`` if given; else ``<save_dir>/<name>/<version>/checkpoints`` of the first
        logger; else ``<default_root_dir>/checkpoints``."""
        if self.dirpath is not None:
            return self.dirpath
        if trainer.loggers:
            logger = trainer.loggers[0]
            save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
            version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
            return os.path.join(save_dir, str(logger.name), version, "checkpoints")
        return os.path.join(trainer.default_root_dir, "checkpoints")

    def _free_path(self, candidates: Dict[str, Any], filename: Optional[str] = None,
                   reusable: Optional[str] = None) -> str:
        """The formatted path, versioned (``-v1``...) past files that exist, unless the existing
        one is ``reusable`` (the file about to be replaced)."""
        path = self.format_checkpoint_name(candidates, filename)
        version = self.STARTING_VERSION
        while os.path.exists(path) and path != reusable:
            path = self.format_checkpoint_name(candidates, filename, ver=version)
            version += 1
        return path

    # ------------------------------------------------------------------ saving
    @staticmethod
    def _parameters_finite(trainer: "Trainer") -> bool:
        """False (with a warning) when a parameter holds NaN/inf: then nothing is saved."""
        from fastloop.step.nonfinite import check_pending

        check_pending(trainer)  # a pending non-finite step raises here, before any write
        params = list(trainer.module.named_parameters()) if trainer.module is not None else []
        if not params:
            return True
        # host sync: once per due checkpoint
        if bool(torch.stack([torch.isfinite(p).all() for _, p in params]).all()):
            return True
        name = next(n for n, p in params if not bool(torch.isfinite(p).all()))
        warnings.warn(f"ModelCheckpoint: no checkpoint saved at global step {trainer.global_step}: parameter "
                      f"{name!r} is not finite (NaN or inf)", RuntimeWarning, stacklevel=2)
        return False

    def _skip_saving(self, trainer: "Trainer") -> bool:
        return (
            bool(trainer.fast_dev_run)
            or not trainer.state.fitting
            or trainer.sanity_checking
            or self._last_global_step_saved == trainer.global_step  # saved at this step already
        )

    def _should_save_on_train_epoch_end(self, trainer: "Trainer") -> bool:
        if self._save_on_train_epoch_end is not None:
            return self._save_on_train_epoch_end
        if trainer.check_val_every_n_epoch != 1:
            return False  # validation does not run every epoch: save after it, when it does
        if sum(trainer.num_val_batches) == 0:
            return True  # no validation
        return trainer.val_check_interval == 1.0  # several validations per epoch: save after each

    def _monitor_candidates(self, trainer: "Trainer") -> Dict[str, Any]:
        candidates = dict(trainer.callback_metrics)
        epoch = candidates.get("epoch")
        candidates["epoch"] = epoch.int() if isinstance(epoch, torch.Tensor) else torch.tensor(trainer.current_epoch)
        step = candidates.get("step")
        candidates["step"] = step.int() if isinstance(step, torch.Tensor) else torch.tensor(trainer.global_step)
        return candidates

    def _save_topk_checkpoint(self, trainer: "Trainer", candidates: Dict[str, Any]) -> None:
        if self.save_top_k == 0:
            return
        if self.monitor is None:
            self._save_unmonitored(trainer, candidates)
            return
        if self.monitor not in candidates:
            message = (
                f"`ModelCheckpoint(monitor={self.monitor!r})` could not find the monitored key in the returned "
                f"metrics: {list(candidates)}. HINT: Did you call `log({self.monitor!r}, value)` in the module?"
            )
            if self._validation_has_run:
                raise ValueError(message)
            warnings.warn(message)
            return
        current = candidates[self.monitor]
        if self._is_top_k(current):
            self._update_best_and_save(current, trainer, candidates)
        elif self.verbose:
            log.info("Epoch %d, global step %d: %r was not in top %d", int(candidates["epoch"]),
                     int(candidates["step"]), self.monitor, self.save_top_k)

    def _is_top_k(self, current: torch.Tensor) -> bool:
        if self.save_top_k == -1 or len(self.best_k_models) < self.save_top_k:
            return True
        better = torch.lt if self.mode == "min" else torch.gt
        # host sync: one comparison per due checkpoint
        return bool(better(current, self.best_k_models[self.kth_best_model_path]))

    def _save_unmonitored(self, trainer: "Trainer", candidates: Dict[str, Any]) -> None:
        path = self._free_path(candidates)
        previous, self.best_model_path = self.best_model_path, path
        self._save_checkpoint(trainer, path)
        if self.save_top_k == 1 and previous and previous != path:
            self._remove_checkpoint(trainer, previous)

    def _update_best_and_save(self, current: torch.Tensor, trainer: "Trainer", candidates: Dict[str, Any]) -> None:
        k = len(self.best_k_models) + 1 if self.save_top_k == -1 else self.save_top_k
        worst_path = None
        if len(self.best_k_models) == k and k > 0:
            worst_path = self.kth_best_model_path
            self.best_k_models.pop(worst_path)
        if torch.isnan(current):  # host sync: a NaN score ranks last
            current = torch.tensor(math.inf if self.mode == "min" else -math.inf, device=current.device)
        path = self._free_path(candidates, reusable=worst_path)
        self.current_score = current
        self.best_k_models[path] = current
        # host sync: ranking the kept scores, only when saving
        if len(self.best_k_models) == k:
            worst = max if self.mode == "min" else min
            self.kth_best_model_path = worst(self.best_k_models, key=self.best_k_models.get)  # type: ignore[arg-type]
            self.kth_value = self.best_k_models[self.kth_best_model_path]
        best = min if self.mode == "min" else max
        self.best_model_path = best(self.best_k_models, key=self.best_k_models.get)  # type: ignore[arg-type]
        self.best_model_score = self.best_k_models[self.best_model_path]
        if self.verbose:
            log.info("Epoch %d, global step %d: %r reached %.5f (best %.5f), saving model to %r as top %d",
                     int(candidates["epoch"]), int(candidates["step"]), self.monitor, float(current),
                     float(self.best_model_score), path, k)
        self._save_checkpoint(trainer, path)
        # The displaced file goes only once the new one is completely written.
        if worst_path is not None and path != worst_path:
            self._remove_checkpoint(trainer, worst_path)

    def _save_last_checkpoint(self, trainer: "Trainer", candidates: Dict[str, Any]) -> None:
        if not self.save_last:
            return
        path = self._free_path(candidates, self.CHECKPOINT_NAME_LAST, reusable=self.last_model_path)
        previous, self.last_model_path = self.last_model_path, path
        self._save_checkpoint(trainer, path)
        if previous and previous != path:
            self._remove_checkpoint(trainer, previous)

    def _save_checkpoint(self, trainer: "Trainer", path: str) -> None:
        trainer.save_checkpoint(path, self.save_weights_only)  # atomic
        self._last_global_step_saved = trainer.global_step
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)

    @staticmethod
    def _remove_checkpoint(trainer: "Trainer", path: str) -> None:
        if trainer.is_global_zero and os.path.exists(path):
            os.remove(path)
