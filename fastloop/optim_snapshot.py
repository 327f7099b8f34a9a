"""The state of a run's optimizers and LR schedulers as ``configure_optimizers`` built them,
restorable in place (``FitLoop.reset_optimizers``).

Restoring in place, rather than calling ``configure_optimizers`` again, keeps the optimizer
objects, and with them every built step (in compiled mode its graphs and direct calls): outer
loops that restart training (active-learning cycles, folds) get fresh optimizer state without
rebuilding or recompiling anything.

What "fresh" means per optimizer state entry created during training:

* ``torch.optim.Adam``/``AdamW`` with the step count on the CPU (torch's default): every state
  tensor is zeroed in place. Zero moments and ``step == 0`` are exactly what Adam creates on its
  first step, so the next update equals a new optimizer's, and the tensors stay the same objects.
* any other optimizer (SGD's momentum buffer is the gradient itself on the first step, not a
  zero), and Adam with its step on the device (the fused step mirrors a device step count on
  the host, keyed by the tensor): the entry is emptied, as in a new optimizer; the next step
  creates it again (in compiled mode a new tensor is a new graph input value, not a recompile).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Sequence

import torch
from torch import Tensor

_ZERO_IN_PLACE = (torch.optim.Adam, torch.optim.AdamW)


class OptimizerSnapshot:
    """Hyperparameters, initial state and scheduler states of ``optimizers``, taken now."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer], scheduler_configs: Sequence[Any]) -> None:
        self.optimizers = list(optimizers)
        self.groups: List[List[Dict[str, Any]]] = [
            [copy.deepcopy({k: v for k, v in group.items() if k != "params"}) for group in opt.param_groups]
            for opt in self.optimizers
        ]
        self.states: List[Dict[int, Dict[str, Any]]] = [
            {id(p): copy.deepcopy(dict(state)) for p, state in opt.state.items()} for opt in self.optimizers
        ]
        self.schedulers = [config.scheduler for config in scheduler_configs]
        self.scheduler_states = [copy.deepcopy(s.state_dict()) for s in self.schedulers]

    def restore(self) -> None:
        """Put every optimizer and scheduler back to the snapshot's state, in place."""
        for idx, (opt, groups, states) in enumerate(zip(self.optimizers, self.groups, self.states)):
            if len(opt.param_groups) != len(groups):
                raise RuntimeError(
                    f"optimizer {idx} has {len(opt.param_groups)} param groups, {len(groups)} when it was "
                    "configured; call trainer.setup_optimizers() to build new optimizers instead"
                )
            for group, saved in zip(opt.param_groups, groups):
                for key, value in saved.items():
                    _set(group, key, value)
            for p, state in opt.state.items():
                saved_state = states.get(id(p))
                if saved_state is not None:
                    for key in [k for k in state if k not in saved_state]:
                        del state[key]
                    for key, value in saved_state.items():
                        _set(state, key, value)
                elif type(opt) in _ZERO_IN_PLACE and _step_on_cpu(state):
                    for value in state.values():
                        if isinstance(value, Tensor):
                            value.zero_()
                else:
                    state.clear()
        for scheduler, saved in zip(self.schedulers, self.scheduler_states):
            scheduler.load_state_dict(copy.deepcopy(saved))


def _step_on_cpu(state: Dict[str, Any]) -> bool:
    step = state.get("step")
    return not isinstance(step, Tensor) or step.device.type == "cpu"


def _set(mapping: Dict[str, Any], key: str, value: Any) -> None:
    """``mapping[key] = value``, copying into an existing tensor of the same shape (same object)."""
    current = mapping.get(key)
    if isinstance(current, Tensor) and isinstance(value, Tensor) and current.shape == value.shape:
        current.copy_(value)
    else:
        mapping[key] = copy.deepcopy(value)
