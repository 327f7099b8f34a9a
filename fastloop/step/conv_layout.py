"""Convolution weights and single-channel images in channels_last inside the fused step (CPU).

On the 2-core CPU VM (oneDNN convolutions) the fused small-cnn step ran at 0.74-0.95x the raw
loop with its contiguous (NCHW) tensors, at the same speed with only the conv weights converted,
and at 1.5-1.9x with the weights and the input images both channels_last (benchmarks/RESULTS.md).
The weights are converted inside the graph: the user's parameters, gradients and optimizer state
keep their layout. Converting the images inside the graph did not help (inductor keeps its own
layout for an intermediate): they must enter the graph channels_last. Only a one-channel batch
tensor (N x 1 x H x W, where both layouts are the same memory order) is restrided, as a view on
the host: no copy, and every ``view`` valid before stays valid. A multi-channel batch is left as
it is (converting it would copy it and change what ``view`` accepts).
"""
from __future__ import annotations

from typing import Any, Dict, FrozenSet

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

__all__ = ["conv_weight_names", "with_channels_last", "single_channel_last"]


def conv_weight_names(module: nn.Module, device: torch.device) -> FrozenSet[str]:
    """Qualified names of the ``nn.Conv2d`` weights of ``module`` worth presenting channels_last
    (empty off the CPU, or without oneDNN)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return frozenset()
    return frozenset(f"{name}.weight" if name else "weight" for name, sub in module.named_modules()
                     if type(sub) is nn.Conv2d and sub.weight.dim() == 4)


def with_channels_last(params: Dict[str, Tensor], names: FrozenSet[str]) -> Dict[str, Tensor]:
    """``params`` with the tensors named in ``names`` in channels_last layout (traced in the graph)."""
    return {name: t.contiguous(memory_format=torch.channels_last) if name in names else t
            for name, t in params.items()}


def single_channel_last(batch: Any) -> Any:
    """``batch`` with its contiguous one-channel 4-D float tensors restrided channels_last: views of
    the same memory (``.contiguous(memory_format=...)`` would keep NCHW strides for one channel);
    other leaves as they are."""
    def convert(t: Any) -> Any:
        if isinstance(t, Tensor) and t.dim() == 4 and t.shape[1] == 1 and t.is_floating_point() and t.is_contiguous():
            n, _, h, w = t.shape
            return t.as_strided(t.shape, (h * w, 1, w, 1))
        return t

    return tree_map(convert, batch)
