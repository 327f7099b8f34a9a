"""Compiled DDP: what the fused step does to stay in step with the other ranks.

Under ``torch.distributed`` (an initialized default group of more than one process) the
compiled step keeps one graph per step and does what ``DistributedDataParallel`` does around an
eager step:

* **Gradients** (in the graph). The stepping call of the fused step all-reduces the accumulated
  gradients with the traceable functional collective ``_functional_collectives.all_reduce``,
  one flat buffer per dtype (DDP's buckets; one is enough at these sizes), each divided by the
  world size before the sum as DDP's reducer does. It runs after backward and accumulation and
  before the non-finite check, clipping and the optimizer update, so every rank applies the same
  update to the same parameters and keeps the same optimizer state. Accumulating calls
  (``step=False``) do not communicate, as under ``no_sync``.
* **Non-finite check**. Gradients are already reduced, so a NaN on one rank is a NaN on all. A
  bad loss is local: its flag rides in the first flat buffer (one extra element), so a bad loss
  on any rank withholds the update on every rank (each reports it as a bad loss).
* **Set-up** (beside the graph). :func:`broadcast_module_state` copies rank 0's parameters and
  buffers to every rank once, as DDP's constructor does.
* **Buffers** (beside the graph). DDP (``broadcast_buffers=True``) copies rank 0's buffers
  (BatchNorm running statistics) to every rank before the first forward after a synchronising
  one, which under ``no_sync`` accumulation is the first forward of each accumulation window.
  :meth:`GradSync.broadcast_buffers` does the same, from the host, before the fused call that
  opens a window (one coalesced broadcast, only for modules that have buffers). Evaluation
  loops do not broadcast (DDP's first evaluation forward after a training step would).

The CUDA-graph step does not capture these collectives (see :func:`capture_blocker`): under
DDP it runs the compiled step, uncaptured, and ``trainer.explain()`` says so.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["GradSync", "distributed_grad_sync", "broadcast_module_state", "capture_blocker"]

# Bytes per coalesced broadcast bucket (DDP's default broadcast_bucket_size).
_BROADCAST_BUCKET_BYTES = 250 * 1024 * 1024


def _initialized() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


class GradSync:
    """The fused step's collectives for one process group (the default group when None)."""

    placement = "in the fused graph"

    def __init__(self, group: Optional[Any] = None) -> None:
        dist = torch.distributed
        self.group = group if group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.backend = str(dist.get_backend(self.group))

    def all_reduce_mean(self, grads: Sequence[Tensor], flag: Optional[Tensor] = None
                        ) -> Tuple[List[Tensor], Optional[Tensor]]:
        """Traced inside the fused step: the mean of ``grads`` over the ranks, one flat buffer
        per dtype. ``flag`` (a 0-d bool, or None) rides along in the first buffer; the second
        result is True where it was True on any rank (None without a flag)."""
        import torch.distributed._functional_collectives as funcol

        by_dtype: Dict[torch.dtype, List[int]] = {}
        for i, g in enumerate(grads):
            by_dtype.setdefault(g.dtype, []).append(i)
        reduced: List[Tensor] = list(grads)
        any_flag: Optional[Tensor] = None
        for k, (dtype, indices) in enumerate(by_dtype.items()):
            parts = [grads[i].reshape(-1) for i in indices]
            carries_flag = flag is not None and k == 0
            if carries_flag:
                parts.append(flag.to(dtype).reshape(1))
            # Divided before the sum, as DDP's reducer divides each bucket.
            flat = torch.cat(parts) / self.world_size
            flat = funcol.all_reduce(flat, "sum", self.group)
            if not torch.compiler.is_compiling() and isinstance(flat, funcol.AsyncCollectiveTensor):
                flat = flat.wait()  # called eagerly (tests): the traced graph waits by itself
            pieces = flat.split([p.numel() for p in parts])
            for i, piece in zip(indices, pieces):
                reduced[i] = piece.view(grads[i].shape)
            if carries_flag:
                any_flag = pieces[-1].reshape(()) > 0
        return reduced, any_flag

    @staticmethod
    def buckets(params: Sequence[Tensor]) -> int:
        """Flat buffers (collectives) per stepping call for these parameters."""
        return len({p.dtype for p in params})

    def broadcast_buffers(self, buffers: Sequence[Tensor]) -> None:
        """Copy rank 0's ``buffers`` into every rank's, in place (host side, one coalesced call)."""
        if buffers:
            with torch.no_grad():
                torch.distributed._broadcast_coalesced(self.group, list(buffers), _BROADCAST_BUCKET_BYTES, 0)

    def describe(self, buckets: int, buffers: bool) -> str:
        text = (f"gradient all-reduce {self.placement} (stepping calls only; mean over {self.world_size} ranks, "
                f"{self.backend}, {buckets} flat bucket(s) per step); parameters and buffers broadcast from rank 0 "
                "at set-up")
        if buffers:
            text += "; buffers broadcast from rank 0 before the first forward of each accumulation window"
        return text


def distributed_grad_sync() -> Optional[GradSync]:
    """A ``GradSync`` for the default group when this process runs under ``torch.distributed``
    with more than one rank; None otherwise (one process: nothing to synchronise)."""
    if not _initialized() or torch.distributed.get_world_size() < 2:
        return None
    return GradSync()


def broadcast_module_state(module: nn.Module, sync: GradSync) -> None:
    """Give every rank rank 0's parameters and buffers (once, at set-up, as DDP's constructor)."""
    tensors = [p.detach() for p in module.parameters()] + list(module.buffers())
    if tensors:
        with torch.no_grad():
            torch.distributed._broadcast_coalesced(sync.group, tensors, _BROADCAST_BUCKET_BYTES, 0)


def capture_blocker(sync: Optional[GradSync]) -> str:
    """Why the CUDA-graph step must not capture a fused step that synchronises ('' if it may).

    Capturing a collective needs NCCL (gloo runs on the host) and torch's support for NCCL in
    ``torch.cuda.graphs``; an inductor graph holding functional collectives (whose ``wait_tensor``
    joins NCCL's stream) inside ``torch.cuda.graph`` was never run here, so capture stays off and
    the compiled step, with its in-graph all-reduce, serves instead.
    """
    if sync is None:
        return ""
    if "nccl" not in sync.backend:
        return (f"the gradient all-reduce runs on the {sync.backend} backend, which a CUDA graph cannot capture; "
                "the compiled step (all-reduce in its graph) serves")
    return ("capturing the in-graph NCCL all-reduce in a CUDA graph is not verified yet; the compiled step "
            "(all-reduce in its graph, uncaptured) serves")
