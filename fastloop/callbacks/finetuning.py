"""Finetuning strategies as callbacks, for any module with a ``backbone`` submodule (Flash's).

* ``NoFreeze``: everything trains.
* ``Freeze``: the backbone is frozen (``requires_grad=False``) before ``configure_optimizers``
  runs, for the whole fit; build the optimizer from the parameters that require grad.
* ``FreezeUnfreeze(unfreeze_epoch)``: frozen until that epoch starts, then unfrozen and added to
  optimizer 0 as a new param group at its current learning rate divided by ``initial_denom_lr``
  (Lightning's ``BaseFinetuning.unfreeze_and_add_param_group``).

``finetuning_callback("freeze")`` / ``(("freeze_unfreeze", 5))`` builds one from Flash's strategy
names; ``finetune(trainer, model, ..., strategy=...)`` fits with it (what ``trainer.finetune``
does in Flash). BatchNorm layers of a frozen backbone keep training their statistics unless
``train_bn=False``, as in Lightning.

The fused step (compiled modes) updates every parameter its optimizer holds and cannot follow a
param group added mid-run: such configurations are rejected before the first step with a
message saying what to change, rather than trained differently from eager.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

from torch import nn

from fastloop.callback import Callback

_BN = (nn.modules.batchnorm._BatchNorm,)


def _backbone(module: Any, strategy: str) -> nn.Module:
    backbone = getattr(module, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise AttributeError(f"finetuning strategy {strategy!r} needs a `backbone` submodule on "
                             f"{type(module).__name__}")
    return backbone


def freeze(module: nn.Module, train_bn: bool = True) -> None:
    """``requires_grad=False`` for ``module``'s parameters (BatchNorm's stay trainable with ``train_bn``)."""
    for sub in module.modules():
        trainable = train_bn and isinstance(sub, _BN)
        for p in sub.parameters(recurse=False):
            p.requires_grad = trainable


def _fused(trainer: Any) -> bool:
    from fastloop.step.build import target_mode

    return target_mode(trainer) != "eager"


class BackboneFinetuning(Callback):
    """Base class: ``freeze_before_training`` at setup, ``finetune_function`` at each epoch start."""

    strategy = "no_freeze"

    def __init__(self, train_bn: bool = True) -> None:
        self.train_bn = train_bn

    def freeze_before_training(self, module: Any) -> None: ...

    def finetune_function(self, trainer: Any, module: Any, epoch: int) -> None: ...

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self.freeze_before_training(pl_module)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if not _fused(trainer):
            return
        frozen = {id(p) for p in pl_module.parameters() if not p.requires_grad}
        for idx, opt in enumerate(trainer.optimizers):
            held = sum(id(p) in frozen for g in opt.param_groups for p in g["params"])
            if held:
                raise ValueError(
                    f"finetuning strategy {self.strategy!r}: optimizer {idx} holds {held} frozen parameters, which "
                    f"the fused step (mode {trainer.mode!r}) would update; build it from "
                    "`filter(lambda p: p.requires_grad, self.parameters())` or use Trainer(mode='eager')"
                )

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.finetune_function(trainer, pl_module, trainer.current_epoch)


class NoFreeze(BackboneFinetuning):
    strategy = "no_freeze"


class Freeze(BackboneFinetuning):
    strategy = "freeze"

    def freeze_before_training(self, module: Any) -> None:
        freeze(_backbone(module, self.strategy), self.train_bn)


class FreezeUnfreeze(BackboneFinetuning):
    strategy = "freeze_unfreeze"

    def __init__(self, unfreeze_epoch: int = 10, initial_denom_lr: float = 10.0, train_bn: bool = True) -> None:
        super().__init__(train_bn)
        if isinstance(unfreeze_epoch, bool) or not isinstance(unfreeze_epoch, int) or unfreeze_epoch < 0:
            raise ValueError(f"FreezeUnfreeze(unfreeze_epoch={unfreeze_epoch!r}): expected an int >= 0")
        self.unfreeze_epoch = unfreeze_epoch
        self.initial_denom_lr = initial_denom_lr

    def freeze_before_training(self, module: Any) -> None:
        freeze(_backbone(module, self.strategy), self.train_bn)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if _fused(trainer):
            raise ValueError(
                f"finetuning strategy 'freeze_unfreeze' adds a param group at epoch {self.unfreeze_epoch}, which the "
                f"fused step (mode {trainer.mode!r}) cannot follow; use Trainer(mode='eager') or strategy 'freeze'"
            )
        self._trainer = trainer
        self._restore_param_groups(trainer, pl_module)
        super().on_fit_start(trainer, pl_module)

    # A resumed fit rebuilds the optimizer from configure_optimizers (backbone frozen, one group):
    # the checkpoint keeps the groups added since, by parameter name, to be put back at fit start
    # (before the optimizer states are restored), unfrozen as they were when saved.
    def state_dict(self) -> Dict[str, Any]:
        trainer = self._trainer
        if trainer is None:
            return {}
        names = {id(p): n for n, p in trainer.lightning_module.named_parameters()}
        return {"param_groups": [[{**{k: v for k, v in g.items() if k != "params"},
                                   "param_names": [names[id(p)] for p in g["params"]]} for g in opt.param_groups]
                                 for opt in trainer.optimizers]}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._restored_groups = state_dict.get("param_groups")

    _trainer: Any = None
    _restored_groups: Optional[List[List[Dict[str, Any]]]] = None

    def _restore_param_groups(self, trainer: Any, module: Any) -> None:
        saved, self._restored_groups = self._restored_groups, None
        if not saved:
            return
        named = dict(module.named_parameters())
        for opt, groups in zip(trainer.optimizers, saved):
            for group in groups[len(opt.param_groups):]:
                params = [named[n] for n in group["param_names"]]
                for p in params:
                    p.requires_grad = True
                opt.add_param_group({**{k: v for k, v in group.items() if k != "param_names"}, "params": params})

    def finetune_function(self, trainer: Any, module: Any, epoch: int) -> None:
        if epoch != self.unfreeze_epoch:
            return
        backbone = _backbone(module, self.strategy)
        optimizer = trainer.optimizers[0]
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        params = [p for p in backbone.parameters() if id(p) not in held]
        for p in backbone.parameters():
            p.requires_grad = True
        if params:
            lr = optimizer.param_groups[0]["lr"] / self.initial_denom_lr
            optimizer.add_param_group({"params": params, "lr": lr})


STRATEGIES = {"no_freeze": NoFreeze, "freeze": Freeze, "freeze_unfreeze": FreezeUnfreeze}
Strategy = Union[str, Tuple[str, Any], BackboneFinetuning]


def finetuning_callback(strategy: Strategy) -> BackboneFinetuning:
    """A callback from a strategy name, ``(name, argument)`` (``("freeze_unfreeze", 5)``) or a callback."""
    if isinstance(strategy, BackboneFinetuning):
        return strategy
    name, args = (strategy[0], strategy[1:]) if isinstance(strategy, tuple) and strategy else (strategy, ())
    if name not in STRATEGIES:
        raise ValueError(f"unknown finetuning strategy {strategy!r}; choose one of {', '.join(STRATEGIES)} "
                         "or pass a BackboneFinetuning callback")
    return STRATEGIES[name](*args)


def finetune(trainer: Any, model: Any, train_dataloaders: Any = None, val_dataloaders: Any = None,
             datamodule: Any = None, strategy: Strategy = "no_freeze", ckpt_path: Optional[str] = None) -> None:
    """``trainer.fit`` with the strategy's callback (replacing a finetuning callback given before)."""
    callback = finetuning_callback(strategy)
    trainer.callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, BackboneFinetuning)] + [callback]
    trainer.fit(model, train_dataloaders, val_dataloaders, datamodule=datamodule, ckpt_path=ckpt_path)
