"""``DataModule``: the data hooks of a run gathered in one object, as in Lightning."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, Optional, Union

from fastloop import hparams as _hparams
from fastloop.hparams import HyperparametersMixin

if TYPE_CHECKING:
    from fastloop.trainer import Trainer


class DataModule(HyperparametersMixin):
    """Override ``setup`` and the ``*_dataloader`` methods you need."""

    CHECKPOINT_HYPER_PARAMS_KEY = "datamodule_hyper_parameters"
    CHECKPOINT_HYPER_PARAMS_NAME = "datamodule_hparams_name"
    trainer: Optional["Trainer"] = None  # set by the trainer; a class default so subclasses may skip __init__

    def __init__(self) -> None:
        super().__init__()
        self.trainer = None

    def prepare_data(self) -> None: ...
    def setup(self, stage: str) -> None: ...
    def teardown(self, stage: str) -> None: ...

    def train_dataloader(self) -> Any:
        raise NotImplementedError("no `train_dataloader`")

    def val_dataloader(self) -> Any:
        raise NotImplementedError("no `val_dataloader`")

    def test_dataloader(self) -> Any:
        raise NotImplementedError("no `test_dataloader`")

    def predict_dataloader(self) -> Any:
        raise NotImplementedError("no `predict_dataloader`")

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        pass

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None: ...
    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None: ...

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: Union[str, "os.PathLike[str]"],
        hparams_file: Optional[str] = None,
        **kwargs: Any,
    ) -> Any:
        """A new datamodule built from a checkpoint's ``datamodule_hyper_parameters`` (``kwargs`` override).

        The signature is Lightning 1.9's: no ``map_location``/``strict``, a datamodule holds no weights.
        """
        return _hparams.load_from_checkpoint(cls, checkpoint_path, None, hparams_file, True, **kwargs)
