"""``DataModule``: the data hooks of a run gathered in one object, as in Lightning."""
from __future__ import annotations

from typing import Any, Dict


class DataModule:
    """Override ``setup`` and the ``*_dataloader`` methods you need."""

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
