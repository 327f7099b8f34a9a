"""What a checkpoint holds and how a run is restored from one.

``dump`` gathers the state of a run (model, hyperparameters, optimizers, schedulers, loops, RNG
streams, callbacks, datamodule, the training loader's position); ``restore_model`` and
``restore_run_state`` put it back; ``resolve`` turns ``ckpt_path="last"``/``"best"`` into a file.
Files are written by ``fastloop.checkpoint.atomic_save``.
"""
from __future__ import annotations

import glob
import logging
import os
import warnings
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch
from torch.nn.parameter import is_lazy

from fastloop import __version__
from fastloop.checkpoint import FORMAT_VERSION, CheckpointError, LoadedCheckpoint, atomic_save
from fastloop.loops import Loop
from fastloop.seed import capture_rng_states

if TYPE_CHECKING:
    from fastloop.trainer import Trainer

log = logging.getLogger(__name__)

LOOP_KEYS = {"fit": "fit_loop", "validate": "validate_loop", "test": "test_loop", "predict": "predict_loop"}


def has_own_state(loader: Any) -> bool:
    """A loader that saves and restores its position (``TensorLoader``); torch's ``DataLoader``
    (whose state is recreated from the RNG instead) is not one."""
    return (not isinstance(loader, torch.utils.data.DataLoader) and callable(getattr(loader, "state_dict", None))
            and callable(getattr(loader, "load_state_dict", None)))


class CheckpointConnector:
    def __init__(self, trainer: "Trainer") -> None:
        self._weights_before: Optional[Dict[str, torch.Tensor]] = None
        self.trainer = trainer

    # ------------------------------------------------------------------ saving
    def save(self, filepath: str, weights_only: bool = False) -> None:
        """Write a checkpoint atomically: a reader sees the old file or the whole new one.

        Every rank gathers the state (the checkpoint hooks run everywhere, as in Lightning); only
        global rank 0 writes it, and the others wait for it at a barrier, so the file exists for
        every rank once this returns.
        """
        if self.trainer.module is None:
            raise RuntimeError("save_checkpoint() needs a model: call fit/validate/test/predict first")
        strategy = self.trainer.strategy
        checkpoint = self.dump(weights_only)
        if strategy.is_global_zero:
            atomic_save(checkpoint, filepath)
        strategy.barrier("save_checkpoint")

    def dump(self, weights_only: bool = False) -> Dict[str, Any]:
        from fastloop.hparams import checkpoint_entries

        trainer = self.trainer
        module = trainer.module
        assert module is not None
        datamodule = trainer.datamodule
        checkpoint: Dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "fastloop_version": __version__,
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "state_dict": module.state_dict(),
        }
        checkpoint.update(checkpoint_entries(module, datamodule))
        if not weights_only:
            checkpoint["loops"] = {key: getattr(trainer, key).state_dict() for key in LOOP_KEYS.values()}
            checkpoint["optimizer_states"] = [opt.state_dict() for opt in trainer.optimizers]
            checkpoint["lr_schedulers"] = [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs]
            checkpoint["rng_states"] = capture_rng_states()
            checkpoint["callbacks"] = {cb.state_key: cb.state_dict() for cb in trainer.hooks.callbacks}
            if datamodule is not None:
                # As Lightning 1.9: under the class's qualified name, and only a non-empty state.
                datamodule_state = datamodule.state_dict()
                if datamodule_state:
                    checkpoint[type(datamodule).__qualname__] = datamodule_state
            loader = trainer.train_data.loaders[0] if trainer.train_data is not None else None
            if loader is not None and has_own_state(loader):
                checkpoint["train_loader"] = loader.state_dict()
        trainer.hooks.call_callbacks("on_save_checkpoint", checkpoint)
        trainer.hooks.call_module("on_save_checkpoint", checkpoint)
        if datamodule is not None:
            datamodule.on_save_checkpoint(checkpoint)
        return checkpoint

    # ------------------------------------------------------------------ restoring
    def default_ckpt_path(self, fn: str, ckpt_path: Optional[str], model_given: bool) -> Optional[str]:
        """Lightning 1.9's choice of weights for ``validate/test/predict`` called without a model
        after an earlier call attached one: the best checkpoint (``"best"``, which needs a
        ``ModelCheckpoint`` that saved one), with a warning. A given model or path is used as is."""
        if ckpt_path is not None or model_given or fn == "fit" or self.trainer.module is None:
            return ckpt_path
        warnings.warn(
            f"`.{fn}(ckpt_path=None)` was called without a model. The best model of the previous `fit` call will "
            f"be used. You can pass `.{fn}(ckpt_path='best')` to use the best model or `.{fn}(ckpt_path='last')` "
            "to use the last model. If you pass a value, this warning will be silenced.",
            UserWarning, stacklevel=4,  # the user's validate/test/predict call
        )
        return "best"

    def resolve(self, ckpt_path: Optional[str], fn: str) -> Optional[str]:
        """``"last"``/``"best"`` through the checkpoint callbacks; a path as it is.

        ``"last"`` takes the callback's ``last_model_path``, else the newest ``last*.ckpt``, else
        the newest ``.ckpt`` in its directory; with none there the run starts from scratch (as in
        Lightning), so one command can both start and resume a preemptible job. With several
        processes, rank 0 decides and the others take its answer (or its error).
        """
        if ckpt_path not in ("last", "best"):
            return ckpt_path
        strategy = self.trainer.strategy
        if not strategy.is_distributed:
            return self._resolve_here(ckpt_path, fn)
        answer: Any = None
        if strategy.is_global_zero:
            try:
                answer = ("path", self._resolve_here(ckpt_path, fn))
            except ValueError as err:
                answer = ("error", str(err))
        kind, value = strategy.broadcast(answer)
        if kind == "error":
            raise ValueError(value)
        return value

    def _resolve_here(self, ckpt_path: str, fn: str) -> Optional[str]:
        callbacks = self.trainer.checkpoint_callbacks
        if ckpt_path == "best":
            paths = [cb.best_model_path for cb in callbacks if getattr(cb, "best_model_path", "")]
            if not paths:
                raise ValueError(
                    f'trainer.{fn}(ckpt_path="best") needs a ModelCheckpoint that has saved a best model; '
                    + ("none is configured" if not callbacks else "none has saved one yet")
                )
            return paths[0]
        candidates = [cb.last_model_path for cb in callbacks if getattr(cb, "last_model_path", "")]
        for cb in callbacks:
            dirpath = getattr(cb, "dirpath", None)
            if dirpath and os.path.isdir(dirpath):
                files = glob.glob(os.path.join(dirpath, "last*.ckpt")) or glob.glob(os.path.join(dirpath, "*.ckpt"))
                candidates.extend(files)
        existing = [p for p in candidates if os.path.isfile(p)]
        if not existing:
            log.warning('trainer.%s(ckpt_path="last"): no checkpoint found; starting from scratch', fn)
            return None
        return max(existing, key=os.path.getmtime)

    def restore_model(self, checkpoint: Dict[str, Any], fn: str) -> None:
        """Run the load hooks, check that the (possibly hook-edited) weights fit the module, then
        load them: torch's ``load_state_dict`` copies the matching tensors before it raises on the
        others, so a checkpoint of another model would otherwise leave the module half-loaded.
        The datamodule's and (when fitting) the callbacks' states follow, as in Lightning, before
        ``configure_optimizers``; the optimizers, schedulers and loops come in ``restore_run_state``
        once ``on_fit_start`` ran (a callback may rebuild param groups there)."""
        trainer = self.trainer
        assert trainer.module is not None
        datamodule = trainer.datamodule
        if datamodule is not None:
            datamodule.on_load_checkpoint(checkpoint)
        trainer.hooks.call_module("on_load_checkpoint", checkpoint)
        trainer.hooks.call_callbacks("on_load_checkpoint", checkpoint)
        check_weights_fit(trainer.module, checkpoint["state_dict"], checkpoint_name(checkpoint))
        if fn == "fit":
            # The optimizer states can only be checked after configure_optimizers; if they do not
            # fit, restore_run_state puts these weights back (a copy on the host, freed after).
            self._weights_before = {k: v.detach().to("cpu", copy=True)
                                    for k, v in trainer.module.state_dict().items()}
        trainer.module.load_state_dict(checkpoint["state_dict"])
        if datamodule is not None:
            # Lightning's key (the class's qualified name), or the fixed key "datamodule" that
            # checkpoints of earlier fastloop versions used.
            for key in (type(datamodule).__qualname__, "datamodule"):
                if key in checkpoint:
                    datamodule.load_state_dict(checkpoint[key])
                    break
        if fn == "fit":
            for cb in trainer.hooks.callbacks:
                if cb.state_key in checkpoint.get("callbacks", {}):
                    cb.load_state_dict(checkpoint["callbacks"][cb.state_key])

    def restore_run_state(self, checkpoint: Dict[str, Any], fn: str, loop: Loop) -> None:
        """Optimizers, LR schedulers and loop progress. Everything is checked before anything is
        loaded; on a mismatch the module gets back the weights it had before ``restore_model``."""
        if fn != "fit":
            return
        weights_before, self._weights_before = self._weights_before, None
        try:
            self._check_run_state(checkpoint)
        except CheckpointError:
            if weights_before is not None:
                self.trainer.module.load_state_dict(weights_before)
            raise
        trainer = self.trainer
        for opt, state in zip(trainer.optimizers, checkpoint["optimizer_states"]):
            opt.load_state_dict(state)
        for config, state in zip(trainer.lr_scheduler_configs, checkpoint.get("lr_schedulers", [])):
            config.scheduler.load_state_dict(state)
        loops = checkpoint.get("loops", {})
        if LOOP_KEYS[fn] in loops:
            loop.load_state_dict(loops[LOOP_KEYS[fn]])

    def _check_run_state(self, checkpoint: Dict[str, Any]) -> None:
        trainer = self.trainer
        name = checkpoint_name(checkpoint)
        states = checkpoint.get("optimizer_states")
        if states is None:
            raise CheckpointError(f"{name} holds weights only; it cannot resume training")
        if len(states) != len(trainer.optimizers):
            raise CheckpointError(
                f"{name} holds {len(states)} optimizer states but configure_optimizers returned "
                f"{len(trainer.optimizers)} optimizers"
            )
        scheds = checkpoint.get("lr_schedulers", [])
        if len(scheds) != len(trainer.lr_scheduler_configs):
            raise CheckpointError(
                f"{name} holds {len(scheds)} LR scheduler states but configure_optimizers returned "
                f"{len(trainer.lr_scheduler_configs)} schedulers"
            )
        for i, (opt, state) in enumerate(zip(trainer.optimizers, states)):
            check_optimizer_state_fits(opt, state, f"{name}, optimizer {i} ({type(opt).__name__})")


def checkpoint_name(checkpoint: Dict[str, Any]) -> str:
    """``checkpoint <file>`` for a checkpoint read by ``load_checkpoint``; ``the checkpoint`` otherwise."""
    return f"checkpoint {checkpoint.path}" if isinstance(checkpoint, LoadedCheckpoint) else "the checkpoint"


def _listed(names: List[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_weights_fit(module: torch.nn.Module, state_dict: Dict[str, Any], name: str) -> None:
    """Raise ``CheckpointError`` unless ``state_dict`` has exactly the module's keys, with the same
    shapes (what a strict ``load_state_dict`` needs), before any weight is copied."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
        if k in state_dict and isinstance(own[k], torch.Tensor) and isinstance(state_dict[k], torch.Tensor)
        and not is_lazy(own[k]) and state_dict[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listed(unexpected)}")
    if mismatched:
        problems.append(f"shapes differ (checkpoint vs model): {_listed(mismatched)}")
    if problems:
        raise CheckpointError(
            f"{name} does not fit {type(module).__name__} (another model's checkpoint?): " + "; ".join(problems)
        )


def check_optimizer_state_fits(opt: torch.optim.Optimizer, state: Any, name: str) -> None:
    """The checks ``Optimizer.load_state_dict`` makes, done up front so that a bad second
    optimizer state does not leave the first one already loaded."""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list) or "state" not in state:
        raise CheckpointError(f"{name}: the saved state is not an optimizer state_dict")
    if len(groups) != len(opt.param_groups):
        raise CheckpointError(f"{name}: the checkpoint has {len(groups)} parameter groups, "
                              f"the optimizer {len(opt.param_groups)}")
    for i, (saved, current) in enumerate(zip(groups, opt.param_groups)):
        if len(saved.get("params", ())) != len(current["params"]):
            raise CheckpointError(f"{name}: parameter group {i} has {len(saved.get('params', ()))} parameters "
                                  f"in the checkpoint, {len(current['params'])} in the optimizer")
