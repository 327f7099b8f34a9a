"""``StepOutput``: what one optimizer's training step produced, as the loops and hooks see it.

It lives with the steps that build it (eager, compiled, CUDA graph); the loops import it from
here (``fastloop.loops.StepOutput`` re-exports it), so the step package never imports the loops.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from torch import Tensor


class StepOutput:
    """What one optimizer's ``training_step`` produced, as the loop and hooks see it.

    ``closure_loss`` is divided by ``accumulate_grad_batches`` and is what backward uses;
    ``loss`` is it detached (what hooks see); ``extra`` holds the other entries of a dict output.
    A plain class with slots: one is built per optimizer per batch.
    """

    __slots__ = ("closure_loss", "extra", "loss")

    def __init__(self, closure_loss: Optional[Tensor], extra: Optional[Dict[str, Any]] = None) -> None:
        self.closure_loss = closure_loss
        self.extra: Dict[str, Any] = {} if extra is None else extra
        self.loss: Optional[Tensor] = None if closure_loss is None else closure_loss.detach()

    def __repr__(self) -> str:
        return f"StepOutput(loss={self.loss!r}, extra={self.extra!r})"

    @classmethod
    def from_training_step_output(cls, output: Any, accumulate: int) -> "StepOutput":
        extra: Optional[Dict[str, Any]] = None
        if isinstance(output, Tensor):
            loss = output
        elif output is None:
            return cls(None)
        elif isinstance(output, dict):
            if "loss" not in output:
                raise ValueError(
                    "In automatic optimization, `training_step` returned a dict without a 'loss' key "
                    f"(keys: {sorted(output)}); return the loss tensor or a dict with 'loss'"
                )
            loss = output["loss"]
            extra = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in output.items() if k != "loss"}
        else:
            raise TypeError(
                f"In automatic optimization, `training_step` must return a Tensor, a dict with 'loss', or None "
                f"(to skip the batch); it returned {type(output).__name__}"
            )
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"`training_step` must return a scalar loss, got {shape}")
        if not loss.requires_grad:
            raise ValueError(
                "the loss returned by `training_step` does not require grad: it was computed without "
                "the model's parameters or under torch.no_grad()"
            )
        return cls(loss / accumulate if accumulate != 1 else loss, extra)

    def asdict(self) -> Dict[str, Any]:
        return {"loss": self.loss, **self.extra}
