"""The smaller last batch of an epoch runs through the eager step instead of a second graph.

Why: with ``dynamic=False`` a batch of another shape is another full compile (for
small-transformer 28 % of the cold compile time, ~11 s warm), paid for one step per epoch. The
compiled steps ask :class:`EagerLastBatch` before each call; it says yes only when

* ``CompileConfig(eager_last_batch=True)`` (the default),
* the batch is the last one of the epoch (or dataloader) and the loader's length is known,
* the batch has the structure of the first batch the compiled graph ran, every tensor the same
  trailing dims, and at least one a smaller leading dim (none larger).

A loader whose shapes vary throughout still compiles each shape as before: only the last batch
is ever diverted. ``trainer.explain()`` counts the diverted calls (``note()``).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

from torch import Tensor
from torch.utils._pytree import tree_flatten

__all__ = ["EagerLastBatch", "batch_signature", "is_smaller"]

# (tree structure, per leaf: the tensor's shape or None for a non-tensor leaf)
Signature = Tuple[Any, Tuple[Optional[Tuple[int, ...]], ...]]


def batch_signature(batch: Any) -> Signature:
    """What the shape comparison needs of a batch (one ``tree_flatten``)."""
    leaves, spec = tree_flatten(batch)
    return spec, tuple(tuple(leaf.shape) if isinstance(leaf, Tensor) else None for leaf in leaves)


def is_smaller(signature: Signature, reference: Signature) -> bool:
    """Same structure and trailing dims as ``reference``, some leading dim smaller, none larger."""
    spec, shapes = signature
    ref_spec, ref_shapes = reference
    if spec != ref_spec or len(shapes) != len(ref_shapes):
        return False
    smaller = False
    for shape, ref in zip(shapes, ref_shapes):
        if shape is None or ref is None:
            if shape is not ref:
                return False
            continue
        if len(shape) != len(ref) or not shape or shape[1:] != ref[1:] or shape[0] > ref[0]:
            return False
        smaller = smaller or shape[0] < ref[0]
    return smaller


class EagerLastBatch:
    """Per compiled step (per eval hook, keyed): the reference batch shapes and the diverted calls."""

    def __init__(self, enabled: bool, blocker: str = "") -> None:
        self.enabled = enabled and not blocker
        self.blocker = blocker if enabled else ""
        self.calls = 0  # calls served eagerly
        self._reference: dict = {}  # key -> Signature of the first batch that ran compiled

    def remember(self, key: Any, batch: Any) -> None:
        """After a compiled call: the first batch's shapes become the reference for ``key``."""
        if self.enabled and key not in self._reference:
            self._reference[key] = batch_signature(batch)

    def has_reference(self, key: Any) -> bool:
        return key in self._reference

    def applies(self, key: Any, batch: Any) -> bool:
        """Whether this (last) batch should run eagerly: smaller than ``key``'s reference."""
        reference = self._reference.get(key)
        return reference is not None and is_smaller(batch_signature(batch), reference)

    def note(self, what: str) -> Optional[str]:
        """The ``trainer.explain()`` line (None when there is nothing to say)."""
        if self.calls:
            return f"the smaller last batch of each {what} ran eagerly: {self.calls} call(s)"
        if self.blocker:
            return f"a smaller last batch compiles its own graph: {self.blocker}"
        return None
