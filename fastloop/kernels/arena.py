"""A flat arena: many tensors packed into one contiguous 1-D buffer.

A fused optimizer kernel wants one pointer and one length, not a list of tensors. The
arena copies the given tensors into one flat buffer and re-points each tensor's ``.data``
at its slice, so ``nn.Parameter`` objects stay the same Python objects (optimizers, hooks
and ``state_dict`` keep working) while their storage is shared with the flat buffer.

The same layout (offsets, padding) is used for a flat gradient buffer, whose views are
installed as ``.grad`` (autograd then accumulates into them in place), and for any
optimizer state (``exp_avg``, ``exp_avg_sq``, momentum), via :meth:`FlatArena.new_buffer`.

Each slot starts at a multiple of ``align`` elements so kernels can use vector loads;
padding elements are zero in every buffer the arena creates, so they contribute nothing to
gradient norms and are left at zero by the optimizer updates (zero grad, zero param).

Pure torch; no triton needed.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


class FlatArena:
    """Packs ``tensors`` (same dtype and device) into one flat buffer, in place.

    After construction ``t.data`` of every tensor is a view of :attr:`flat`, and
    :attr:`grad` is a zeroed flat buffer of the same layout (``None`` when
    ``with_grad=False``). Views of ``grad`` are installed as ``.grad`` when
    ``install_grads=True``.

    Writing a new tensor to ``p.data`` later, or letting ``zero_grad(set_to_none=True)``
    drop the grad views, detaches that tensor from the arena; use :meth:`zero_grad` and
    :meth:`gather_grads` instead.
    """

    def __init__(
        self,
        tensors: Sequence[Tensor],
        *,
        align: int = 16,
        with_grad: bool = True,
        install_grads: bool = True,
    ) -> None:
        tensors = list(tensors)
        if not tensors:
            raise ValueError("FlatArena needs at least one tensor")
        if align < 1:
            raise ValueError(f"align must be >= 1, got {align}")
        dtype, device = tensors[0].dtype, tensors[0].device
        for i, t in enumerate(tensors):
            if t.dtype != dtype or t.device != device:
                raise ValueError(
                    f"all tensors must share dtype and device: tensor 0 is {dtype} on "
                    f"{device}, tensor {i} is {t.dtype} on {t.device}"
                )
        if len({id(t) for t in tensors}) != len(tensors):
            raise ValueError("the same tensor appears twice")

        self.tensors: list[Tensor] = tensors
        self.shapes: list[torch.Size] = [t.shape for t in tensors]
        self.numels: list[int] = [t.numel() for t in tensors]
        self.offsets: list[int] = []
        end = 0
        for n in self.numels:
            self.offsets.append(end)
            end = _round_up(end + n, align)
        self.numel: int = end  # including padding
        self.dtype, self.device = dtype, device

        self.flat: Tensor = self.new_buffer()
        with torch.no_grad():
            for t, view in zip(tensors, self.views(self.flat)):
                view.copy_(t)
        for t, view in zip(tensors, self.views(self.flat)):
            t.data = view

        self.grad: Optional[Tensor] = None
        if with_grad:
            self.grad = self.new_buffer()
            if install_grads:
                self.install_grads()

    # -- layout -------------------------------------------------------------------------
    def new_buffer(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """A zeroed flat buffer with the arena's layout (e.g. for optimizer state)."""
        return torch.zeros(self.numel, dtype=dtype or self.dtype, device=self.device)

    def views(self, buffer: Tensor) -> list[Tensor]:
        """Per-tensor views of ``buffer`` (any flat buffer with the arena's layout)."""
        if buffer.dim() != 1 or buffer.numel() != self.numel or not buffer.is_contiguous():
            raise ValueError(
                f"expected a contiguous 1-D buffer of {self.numel} elements, "
                f"got shape {tuple(buffer.shape)}"
            )
        return [
            buffer[off : off + n].view(shape)
            for off, n, shape in zip(self.offsets, self.numels, self.shapes)
        ]

    def is_packed(self) -> bool:
        """True while every tensor's storage is still its slice of :attr:`flat`."""
        return all(
            t.data_ptr() == v.data_ptr() and t.shape == v.shape
            for t, v in zip(self.tensors, self.views(self.flat))
        )

    # -- gradients ------------------------------------------------------------------------
    def _require_grad_buffer(self) -> Tensor:
        if self.grad is None:
            raise RuntimeError("this arena was built with with_grad=False")
        return self.grad

    def install_grads(self) -> None:
        """Set each tensor's ``.grad`` to its view of the flat grad buffer."""
        for t, view in zip(self.tensors, self.views(self._require_grad_buffer())):
            t.grad = view

    def grads_installed(self) -> bool:
        """True while every ``.grad`` is still its view of the flat grad buffer."""
        flat = self._require_grad_buffer()
        return all(
            t.grad is not None and t.grad.data_ptr() == v.data_ptr()
            for t, v in zip(self.tensors, self.views(flat))
        )

    def gather_grads(self) -> Tensor:
        """Copy separate ``.grad`` tensors into the flat grad buffer and reinstall the views.

        A tensor whose ``.grad`` is ``None`` gets zeros (the fused update then treats it as
        having a zero gradient, unlike ``torch.optim``, which skips it). Grads that already
        are views of the buffer are left alone. Returns the flat grad buffer.
        """
        flat = self._require_grad_buffer()
        with torch.no_grad():
            for t, view in zip(self.tensors, self.views(flat)):
                g = t.grad
                if g is None:
                    view.zero_()
                elif g.data_ptr() != view.data_ptr():
                    view.copy_(g)
        self.install_grads()
        return flat

    def zero_grad(self) -> None:
        """Zero the flat grad buffer (one kernel), keeping the views installed."""
        self._require_grad_buffer().zero_()

    def __repr__(self) -> str:
        return (
            f"FlatArena(tensors={len(self.tensors)}, numel={self.numel}, "
            f"dtype={self.dtype}, device={self.device})"
        )


def group_for_arenas(tensors: Iterable[Tensor]) -> dict[tuple[torch.dtype, torch.device], list[Tensor]]:
    """Split ``tensors`` by (dtype, device), keeping order: one arena per group."""
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return groups
