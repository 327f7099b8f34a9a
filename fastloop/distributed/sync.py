"""Reducing logged values across processes: ``self.log(..., sync_dist=True)``.

Each function is a collective: every rank of the group must call it, in the same order (as with
Lightning, every rank must log the same ``sync_dist`` names at the same places). Without an
initialized process group, or in a group of one, they return the value unchanged and talk to no
one. A collective waits for every rank, which is why it only happens when asked for.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor


def group_size(group: Optional[Any] = None) -> int:
    """Processes in ``group`` (the default group when None); 1 without an initialized group."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _on_backend_device(value: Tensor, group: Optional[Any]) -> Tensor:
    """NCCL reduces CUDA tensors only: a value logged as a Python number (a CPU tensor) moves to
    this process's GPU for the collective."""
    if value.device.type != "cuda" and "nccl" in str(torch.distributed.get_backend(group)):
        return value.to(torch.device("cuda", torch.cuda.current_device()))
    return value


def _all_reduce(value: Tensor, op: str, group: Optional[Any]) -> Tensor:
    """A reduced copy of ``value`` (the input is left alone), on the input's device."""
    work = _on_backend_device(value.detach().clone(), group)
    # host sync: a collective, only for values logged with sync_dist=True
    torch.distributed.all_reduce(work, op=getattr(torch.distributed.ReduceOp, op.upper()), group=group)
    return work.to(value.device)


def sync_value(value: Tensor, reduce_fx: str, group: Optional[Any] = None) -> Tensor:
    """``value`` reduced over the ranks of ``group``: ``mean`` (the default of ``self.log``),
    ``sum``, ``max`` or ``min``. Integer values are averaged as floats."""
    if reduce_fx not in ("mean", "sum", "max", "min"):
        raise ValueError(f"sync_dist cannot reduce with {reduce_fx!r}; use 'mean', 'sum', 'max' or 'min'")
    size = group_size(group)
    if size == 1:
        return value
    if reduce_fx == "mean":
        if not value.is_floating_point():
            value = value.to(torch.get_default_dtype())
        return _all_reduce(value, "sum", group) / size
    return _all_reduce(value, reduce_fx, group)


def sync_weighted_mean(total: Tensor, weight: float, group: Optional[Any] = None) -> Tensor:
    """The mean over every sample of every rank of an epoch mean: each rank's numerator (sum of
    value x batch size) and weight (samples) are summed over the ranks in one collective."""
    if group_size(group) == 1:
        return total / weight
    dtype = total.dtype if total.is_floating_point() else torch.get_default_dtype()
    both = torch.stack([total.to(dtype), torch.tensor(float(weight), dtype=dtype, device=total.device)])
    summed = _all_reduce(both, "sum", group)
    return summed[0] / summed[1]
