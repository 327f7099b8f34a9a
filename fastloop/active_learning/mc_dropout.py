"""Monte-Carlo dropout prediction: a ``PredictionLoop`` whose passes each draw their own dropout mask.

``MCDropoutPredictionLoop(iterations)`` runs ``predict_step`` on every batch replicated
``iterations`` times along the first dimension, in one forward, with the module in eval mode
except its dropout layers (so BatchNorm uses its running statistics). Each replica draws its
own mask, which a repeated forward of the same shape does not guarantee (BaaL's "consistent"
dropout reuses one; see the reference notes, Flash caveat 3). The output of a batch of ``B``
rows, ``[iterations * B, *rest]``, is returned as ``[B, *rest, iterations]``: for logits
``[B, C]`` that is BaaL's ``[B, C, iterations]`` layout.

Usable on its own, ``trainer.predict_loop = MCDropoutPredictionLoop(20)``, or as a child of a
loop that predicts during fit (``ActiveLearningLoop``), which gets its step built for the mode
with the rest of the fit tree. In compiled mode a smaller last batch is padded to the first
batch's size (rows are independent in eval mode), so a shrinking pool costs no new graph.
"""
from __future__ import annotations

from typing import Any, Callable, List

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from fastloop.loops.prediction import PredictionEpochLoop, PredictionLoop


def dropout_layers(module: nn.Module) -> List[nn.Module]:
    """The ``torch.nn`` dropout modules (``Dropout``, ``Dropout1d/2d/3d``, alpha dropouts) of ``module``."""
    return [m for m in module.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


def _rows(batch: Any) -> int:
    leaves = [leaf for leaf in tree_flatten(batch)[0] if isinstance(leaf, Tensor) and leaf.ndim > 0]
    if not leaves:
        raise TypeError("MC-dropout prediction needs a batch holding at least one tensor with a batch dimension")
    return leaves[0].shape[0]


class MCStep:
    """Wraps a prediction step: replicate the batch, run it once, regroup the passes last."""

    def __init__(self, inner: Callable[..., Any], iterations: int) -> None:
        self.inner = inner
        self.iterations = iterations
        self.pad = getattr(inner, "mode", "eager") != "eager"  # keep graph shapes fixed when compiled
        self._rows = 0
        self.mode = getattr(inner, "mode", "eager")

    def __getattr__(self, name: str) -> Any:  # graph_count, compile_seconds... of the wrapped step
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, hook: str, batch: Any, batch_idx: int, *rest: Any) -> Any:
        rows = _rows(batch)
        self._rows = max(self._rows, rows)
        pad = self._rows - rows if self.pad else 0
        t = self.iterations

        def replicate(leaf: Any) -> Any:
            if not isinstance(leaf, Tensor) or leaf.ndim == 0:
                return leaf
            if pad:
                leaf = torch.cat([leaf, leaf[-1:].expand(pad, *leaf.shape[1:])])
            return leaf.repeat(t, *([1] * (leaf.ndim - 1)))

        output = self.inner(hook, tree_map(replicate, batch), batch_idx, *rest)
        if not isinstance(output, Tensor) or output.ndim == 0 or output.shape[0] != t * (rows + pad):
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise TypeError(
                f"MC-dropout prediction needs {hook} to return one tensor row per batch row "
                f"({t * (rows + pad)} rows for {t} passes), got {shape}"
            )
        passes = output.reshape(t, rows + pad, *output.shape[1:])[:, :rows]
        return passes.movedim(0, -1)


class MCDropoutEpochLoop(PredictionEpochLoop):
    """The batches of one dataloader through ``MCStep``."""

    def __init__(self, iterations: int) -> None:
        super().__init__()
        self.iterations = iterations

    def setup(self) -> None:
        super().setup()  # the mode's prediction step
        self.eval_step = MCStep(self.eval_step, self.iterations)


class MCDropoutPredictionLoop(PredictionLoop):
    """Prediction with dropout active and ``iterations`` passes per batch, in one forward."""

    def __init__(self, iterations: int = 2) -> None:
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"MCDropoutPredictionLoop(iterations={iterations!r}): expected an int >= 1")
        super().__init__(return_predictions=True)
        self.iterations = iterations
        self.epoch_loop = MCDropoutEpochLoop(iterations)

    def setup(self) -> None:
        module = self.trainer.module
        if not dropout_layers(module):
            raise TypeError(
                f"MC-dropout prediction needs dropout: {type(module).__name__} has no torch.nn.Dropout* layer, so "
                "every pass would give the same prediction"
            )

    def on_run_start(self) -> None:
        super().on_run_start()  # on_predict_model_eval: the module in eval mode
        for layer in dropout_layers(self.trainer.module):
            layer.train()
