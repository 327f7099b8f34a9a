"""The module ``DistributedDataParallel`` wraps: its ``forward`` is the ``training_step``.

DDP's reducer learns which gradients to all-reduce from its ``forward`` (it prepares the
backward when the forward returns), so the training step must run *through* the DDP object.
``TrainingStepWrapper.forward`` redirects to the module's ``training_step`` (through the
trainer's hook dispatcher, so ``self.log`` sees the hook name), as Lightning's wrapper does.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, List

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.parallel.distributed import _find_tensors

if TYPE_CHECKING:
    from fastloop.distributed.strategy import DDPStrategy


class TrainingStepWrapper(nn.Module):
    """``forward(*args)`` = ``module.training_step(*args)``; the user module is ``self.module``."""

    def __init__(self, module: nn.Module, strategy: "DDPStrategy") -> None:
        super().__init__()
        self.module = module
        self._strategy = [strategy]  # a list: not registered as a submodule, no reference loop in repr

    def forward(self, *args: Any) -> Any:
        strategy = self._strategy[0]
        trainer = strategy.trainer
        output = trainer.hooks.call_module("training_step", *args)
        if strategy.manual_step_active:
            # The backward already ran inside training_step (manual_backward prepared the reducer
            # for it): DDP must not prepare another one when this forward returns.
            strategy.model.require_backward_grad_sync = False
        elif output is None:
            raise RuntimeError(
                f"rank {strategy.global_rank}: training_step returned None under DDP. Skipping a batch on one rank "
                "would leave the other ranks waiting in the gradient all-reduce; return a loss on every rank "
                "(for example `loss * 0` to make this batch count for nothing)"
            )
        return output


def prepare_manual_backward(model: DistributedDataParallel, loss: torch.Tensor, find_unused: bool) -> None:
    """What DDP does when a synchronized forward returns, done right before a ``manual_backward``
    inside the forward (manual optimization): arm the reducer for this backward."""
    if not (torch.is_grad_enabled() and model.require_backward_grad_sync):
        return
    model.require_forward_param_sync = True
    outputs: List[torch.Tensor] = list(_find_tensors(loss)) if find_unused else []
    model.reducer._rebuild_buckets()
    model.reducer.prepare_for_backward(outputs)
