"""What ``configure_optimizers`` returned, parsed once, and the optimizer wrapper users step.

Accepted return values (Lightning 1.x): one optimizer; a list/tuple of optimizers;
``(optimizers, schedulers)``; a dict with ``optimizer`` and optional ``lr_scheduler`` and
``monitor``; a list of such dicts, each optionally with a ``frequency`` (all or none).
A scheduler is either a scheduler object or a dict with ``scheduler`` and optional ``interval``
("epoch" or "step"), ``frequency``, ``monitor``, ``strict`` and ``name``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau

if TYPE_CHECKING:
    from fastloop.trainer import Trainer

_SCHEDULER_KEYS = {"scheduler", "interval", "frequency", "monitor", "strict", "name", "opt_idx", "reduce_on_plateau"}


@dataclass
class SchedulerConfig:
    scheduler: Any
    interval: str = "epoch"
    frequency: int = 1
    monitor: Optional[str] = None
    strict: bool = True
    name: Optional[str] = None
    opt_idx: int = 0

    @property
    def reduce_on_plateau(self) -> bool:
        return isinstance(self.scheduler, ReduceLROnPlateau)


@dataclass
class OptimizationSetup:
    optimizers: List[Optimizer]
    schedulers: List[SchedulerConfig]
    frequencies: List[int]


def _scheduler_config(obj: Any, monitor: Optional[str], optimizers: Sequence[Optimizer]) -> SchedulerConfig:
    if isinstance(obj, dict):
        if "scheduler" not in obj:
            raise ValueError("an `lr_scheduler` dict from `configure_optimizers` needs a `scheduler` key")
        unknown = set(obj) - _SCHEDULER_KEYS
        if unknown:
            raise ValueError(f"unknown keys in an `lr_scheduler` dict from `configure_optimizers`: {sorted(unknown)}")
        config = SchedulerConfig(**{k: v for k, v in obj.items() if k != "reduce_on_plateau"})
        if config.monitor is None:
            config.monitor = monitor
    else:
        config = SchedulerConfig(scheduler=obj, monitor=monitor)
    if config.interval not in ("epoch", "step"):
        raise ValueError(f"scheduler `interval` must be 'epoch' or 'step', got {config.interval!r}")
    if not isinstance(config.frequency, int) or config.frequency < 1:
        raise ValueError(f"scheduler `frequency` must be a positive int, got {config.frequency!r}")
    if config.reduce_on_plateau and config.monitor is None:
        raise ValueError(
            "`configure_optimizers` returned a ReduceLROnPlateau scheduler without `monitor`: "
            'return {"optimizer": opt, "lr_scheduler": sched, "monitor": "val_loss"}'
        )
    scheduler_optimizer = getattr(config.scheduler, "optimizer", None)
    if scheduler_optimizer is None:
        raise TypeError(f"{type(config.scheduler).__name__} is not an LR scheduler (it has no `optimizer`)")
    for idx, opt in enumerate(optimizers):
        if opt is scheduler_optimizer:
            config.opt_idx = idx
            break
    else:
        raise ValueError(
            f"the scheduler {type(config.scheduler).__name__} steps an optimizer that "
            "`configure_optimizers` did not return"
        )
    return config


def parse_optimizers(returned: Any) -> OptimizationSetup:
    """Normalise the value returned by ``configure_optimizers``; raise a clear error otherwise."""
    optimizers: List[Optimizer] = []
    raw_schedulers: List[Tuple[Any, Optional[str]]] = []
    frequencies: List[int] = []
    if isinstance(returned, Optimizer):
        optimizers = [returned]
    elif isinstance(returned, dict):
        optimizers = [_dict_optimizer(returned)]
        if "lr_scheduler" in returned:
            raw_schedulers.append((returned["lr_scheduler"], returned.get("monitor")))
    elif isinstance(returned, (list, tuple)) and len(returned) == 2 and isinstance(returned[0], (list, tuple)):
        optimizers = list(returned[0])
        scheds = returned[1] if isinstance(returned[1], (list, tuple)) else [returned[1]]
        raw_schedulers = [(s, None) for s in scheds]
    elif isinstance(returned, (list, tuple)) and returned and all(isinstance(d, dict) for d in returned):
        with_freq = ["frequency" in d for d in returned]
        if any(with_freq) and not all(with_freq):
            raise ValueError("when optimizer dicts carry a `frequency`, every dict must have one")
        for d in returned:
            optimizers.append(_dict_optimizer(d))
            if "lr_scheduler" in d:
                raw_schedulers.append((d["lr_scheduler"], d.get("monitor")))
            if "frequency" in d:
                frequencies.append(int(d["frequency"]))
    elif isinstance(returned, (list, tuple)):
        optimizers = list(returned)
    else:
        what = "None (did it forget to `return`?)" if returned is None else f"a {type(returned).__name__}"
        raise TypeError(
            f"`configure_optimizers` returned {what}; expected {_EXPECTED}"
        )
    if not optimizers:
        raise ValueError(
            "`configure_optimizers` returned no optimizer"
            + (f" for its {len(raw_schedulers)} scheduler(s)" if raw_schedulers else "") + f"; expected {_EXPECTED}"
        )
    for i, opt in enumerate(optimizers):
        if not isinstance(opt, Optimizer):
            hint = (": return ([optimizers], [schedulers]) or {\"optimizer\": ..., \"lr_scheduler\": ...}"
                    if hasattr(opt, "optimizer") and hasattr(opt, "step") else "")
            raise TypeError(
                f"`configure_optimizers` optimizer {i} is a {type(opt).__name__}, not a torch Optimizer{hint}"
            )
    if any(f < 1 for f in frequencies):
        raise ValueError(f"optimizer frequencies must be positive ints, got {frequencies}")
    schedulers = [_scheduler_config(s, m, optimizers) for s, m in raw_schedulers]
    return OptimizationSetup(optimizers, schedulers, frequencies)


_EXPECTED = ("an optimizer, a list of optimizers, (optimizers, schedulers), a dict with an `optimizer` key, "
             "or a list of such dicts")


def _dict_optimizer(d: Dict[str, Any]) -> Optimizer:
    if "optimizer" not in d:
        raise ValueError(
            f"a dict returned by `configure_optimizers` needs an `optimizer` key (keys: {sorted(d, key=str)})"
        )
    unknown = set(d) - {"optimizer", "lr_scheduler", "monitor", "frequency"}
    if unknown:
        raise ValueError(f"unknown keys in a dict from `configure_optimizers`: {sorted(unknown)}")
    return d["optimizer"]


def check_parameters_belong(optimizers: Sequence[Optimizer], module: torch.nn.Module) -> None:
    """Every tensor an optimizer updates must be a parameter of ``module``: other tensors are
    neither saved in checkpoints nor moved to the device, and no fused step can update them."""
    owned = {id(p) for p in module.parameters()}
    for idx, optimizer in enumerate(optimizers):
        foreign = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in owned]
        if foreign:
            shapes = ", ".join(str(tuple(p.shape)) for p in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise ValueError(
                f"`configure_optimizers` optimizer {idx} ({type(optimizer).__name__}) holds {len(foreign)} tensor(s) "
                f"that are not parameters of {type(module).__name__} (shapes {shapes}): they would not be saved "
                "in checkpoints nor moved to the device; make them `nn.Parameter` attributes of the module, "
                "or build the optimizer over `self.parameters()`"
            )


def active_optimizer_indices(num_optimizers: int, frequencies: Sequence[int], batch_idx: int) -> List[int]:
    """Without frequencies every optimizer runs; with them, exactly one per batch in turn."""
    if not frequencies:
        return list(range(num_optimizers))
    position = batch_idx % sum(frequencies)
    for idx, freq in enumerate(frequencies):
        if position < freq:
            return [idx]
        position -= freq
    raise AssertionError("unreachable: position is below the sum of frequencies")


class LoopOptimizer:
    """Wraps a torch optimizer so that ``step`` runs the trainer's hooks and counts steps.

    ``step(closure)`` calls the torch optimizer's ``step`` with a closure that first runs the
    given closure (forward and backward in automatic optimization), then the
    ``on_before_optimizer_step`` hooks and gradient clipping. Any other attribute is the torch
    optimizer's own.
    """

    def __init__(self, optimizer: Optimizer, optimizer_idx: int, trainer: "Trainer") -> None:
        self._optimizer = optimizer
        self._optimizer_idx = optimizer_idx
        self._trainer = trainer
        cls = type(optimizer)
        self._closure_runs_first = cls.__module__.startswith("torch.optim") and cls is not torch.optim.LBFGS
        # Set by the loop that owns step counting (manual optimization counts here).
        self.on_before_step: Callable[[], None] = _noop
        self.on_after_step: Callable[[], None] = _noop

    @property
    def optimizer(self) -> Optimizer:
        return self._optimizer

    def __getattr__(self, name: str) -> Any:
        # Read through __dict__: copy/pickle call this on an instance whose __init__ has not run.
        optimizer = self.__dict__.get("_optimizer")
        if optimizer is None:
            raise AttributeError(name)
        return getattr(optimizer, name)

    def __repr__(self) -> str:
        return f"LoopOptimizer({self._optimizer!r})"

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Optional[Callable[[], Any]] = None, **kwargs: Any) -> Any:
        self.on_before_step()
        trainer = self._trainer

        def closure_then_hooks() -> Any:
            result = closure() if closure is not None else None
            trainer._after_closure(self._optimizer, self._optimizer_idx)
            return result

        scaler = getattr(trainer, "grad_scaler", None)
        module = getattr(trainer, "module", None)
        if scaler is not None and module is not None and module.automatic_optimization:
            # GradScaler takes no closure: run it, unscale, hooks and clipping, then step
            # (skipped on inf/nan; GradScaler reads found_inf on the host: eager path only).
            output = closure() if closure is not None else None
            scaler.unscale_(self._optimizer)
            trainer._after_closure(self._optimizer, self._optimizer_idx)
            scaler.step(self._optimizer, **kwargs)
            scaler.update()
        elif self._closure_runs_first:
            # Built-in torch optimizers call the closure once, first: do that directly and
            # spare the per-step closure plumbing (same order, same results).
            output = closure_then_hooks()
            self._optimizer.step(**kwargs)
        else:  # LBFGS and user optimizers decide when (and how often) to call the closure
            output = self._optimizer.step(closure=closure_then_hooks, **kwargs)
        self.on_after_step()
        return output


def _noop() -> None:
    pass


def clip_gradients(optimizer: Optimizer, clip_val: Optional[float], algorithm: Optional[str]) -> None:
    """Clip the gradients of ``optimizer``'s parameters by norm (2-norm) or by value."""
    if clip_val is None or clip_val <= 0:
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if algorithm in (None, "norm"):
        torch.nn.utils.clip_grad_norm_(params, clip_val)
    elif algorithm == "value":
        torch.nn.utils.clip_grad_value_(params, clip_val)
    else:
        raise ValueError(f"gradient_clip_algorithm must be 'norm' or 'value', got {algorithm!r}")
