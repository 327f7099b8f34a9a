"""The callbacks a Trainer runs: the user's, checked, plus Lightning's defaults."""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

from fastloop.callback import Callback


def as_callback_list(callbacks: Optional[Union[Callback, Sequence[Callback]]]) -> List[Callback]:
    if callbacks is None:
        return []
    if isinstance(callbacks, Callback):
        return [callbacks]
    callbacks = list(callbacks)
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise TypeError(f"Trainer(callbacks=...) got a {type(cb).__name__}; callbacks must subclass fastloop.Callback")
    return callbacks


def with_default_callbacks(callbacks: List[Callback], enable_checkpointing: bool, enable_progress_bar: bool,
                       enable_model_summary: bool) -> List[Callback]:
    """The user's callbacks plus Lightning's defaults: a progress bar, a model summary and a
    ``ModelCheckpoint`` (each only when the user gave none of its kind)."""
    from fastloop.callbacks import ModelCheckpoint, ModelSummary, ProgressBar

    callbacks = list(callbacks)
    has_checkpoint = any(isinstance(cb, ModelCheckpoint) for cb in callbacks)
    if has_checkpoint and not enable_checkpointing:
        raise ValueError("Trainer(enable_checkpointing=False) was given a ModelCheckpoint callback; drop one of them")
    if enable_checkpointing and not has_checkpoint:
        callbacks.append(ModelCheckpoint())
    if enable_model_summary and not any(isinstance(cb, ModelSummary) for cb in callbacks):
        callbacks.append(ModelSummary())
    if enable_progress_bar and not any(isinstance(cb, ProgressBar) for cb in callbacks):
        callbacks.append(ProgressBar())
    # As in Lightning, checkpoint callbacks run last, so they see what other callbacks logged.
    return [cb for cb in callbacks if not isinstance(cb, ModelCheckpoint)] + [
        cb for cb in callbacks if isinstance(cb, ModelCheckpoint)
    ]
