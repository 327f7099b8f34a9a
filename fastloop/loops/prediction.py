"""``PredictionLoop`` (one advance per dataloader) and ``PredictionEpochLoop`` (one per batch).

Hook order::

    predict_dataloader, on_predict_model_eval, [on_predict_start], [on_predict_epoch_start]
    for each dataloader, for each batch:
        [on_predict_batch_start(batch, batch_idx, dataloader_idx)]
        predict_step(batch, batch_idx[, dataloader_idx])
        [on_predict_batch_end(outputs, batch, batch_idx, dataloader_idx)]
    [on_predict_epoch_end(results)], [on_predict_end]
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Union

import torch

from fastloop.data.fetcher import DataFetcher
from fastloop.loops.base import Loop
from fastloop.loops.progress import DataLoaderProgress, Progress
from fastloop.module import move_to_device


class PredictionEpochLoop(Loop):
    """Runs ``predict_step`` over the batches of one dataloader."""

    _runtime_attributes = {"eval_step": None}

    def __init__(self) -> None:
        super().__init__()
        self.batch_progress = Progress()
        self.eval_step: Optional[Callable[..., Any]] = None
        self.predictions: List[Any] = []
        self._max_batches: Union[int, float] = 0

    def connect(self, **loops: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no child loops to connect")

    def setup(self) -> None:
        from fastloop.step.build import build_eval_step

        self.eval_step = build_eval_step(self)

    @property
    def done(self) -> bool:
        return self.batch_progress.current.completed >= self._max_batches

    def reset(self) -> None:
        self.batch_progress.reset_on_run()
        self.predictions = []

    def on_run_start(self, fetcher: DataFetcher, max_batches: Union[int, float], dataloader_idx: int,
                     num_dataloaders: int, return_predictions: bool) -> None:
        self._max_batches = max_batches

    def advance(self, fetcher: DataFetcher, max_batches: Union[int, float], dataloader_idx: int,
                num_dataloaders: int, return_predictions: bool) -> None:
        trainer = self.trainer
        batch_idx = self.batch_progress.current.ready
        batch = trainer.data.transfer(next(fetcher), dataloader_idx)
        self.batch_progress.increment_ready()
        trainer.hooks.call("on_predict_batch_start", batch, batch_idx, dataloader_idx)
        self.batch_progress.increment_started()
        args = (batch, batch_idx, dataloader_idx) if num_dataloaders > 1 else (batch, batch_idx)
        step = self.eval_step if self.eval_step is not None else trainer.hooks.call_module
        output = step("predict_step", *args)
        self.batch_progress.increment_processed()
        trainer.hooks.call("on_predict_batch_end", output, batch, batch_idx, dataloader_idx)
        self.batch_progress.increment_completed()
        if return_predictions:
            self.predictions.append(move_to_device(output, torch.device("cpu")))

    def on_run_end(self) -> List[Any]:
        return self.predictions


class PredictionLoop(Loop):
    """Prediction over every dataloader; returns the predictions (a list per dataloader)."""

    def __init__(self, return_predictions: bool = True) -> None:
        super().__init__()
        self.return_predictions = return_predictions
        self.epoch_loop = PredictionEpochLoop()
        self.dataloader_progress = DataLoaderProgress()
        self.predictions: List[List[Any]] = []

    def connect(self, epoch_loop: Optional[PredictionEpochLoop] = None) -> None:  # type: ignore[override]
        super().connect(epoch_loop=epoch_loop)

    @property
    def skip(self) -> bool:
        data = self.trainer.predict_data()
        return not data.loaders or data.total_batches == 0

    def on_skip(self) -> Optional[List[Any]]:
        return [] if self.return_predictions else None

    @property
    def done(self) -> bool:
        return self.dataloader_progress.current.completed >= len(self.trainer.predict_data().loaders)

    def reset(self) -> None:
        self.dataloader_progress.reset_on_run()
        self.predictions = []

    def run(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return super().run(*args, **kwargs)

    def on_run_start(self) -> None:
        hooks = self.trainer.hooks
        hooks.call_module("on_predict_model_eval")
        hooks.call("on_predict_start")
        hooks.call("on_predict_epoch_start")

    def advance(self) -> None:
        data = self.trainer.predict_data()
        dl_idx = self.dataloader_progress.current.ready
        self.dataloader_progress.increment_ready()
        fetcher = DataFetcher(data.loaders[dl_idx], data.max_batches[dl_idx]).start()
        try:
            preds = self.epoch_loop.run(fetcher, data.max_batches[dl_idx], dl_idx, len(data.loaders),
                                        self.return_predictions)
        finally:
            fetcher.close()
        self.predictions.append(preds)
        self.dataloader_progress.increment_completed()

    def on_run_end(self) -> Optional[List[Any]]:
        hooks = self.trainer.hooks
        hooks.call("on_predict_epoch_end", self.predictions)
        hooks.call("on_predict_end")
        if not self.return_predictions:
            return None
        return self.predictions[0] if len(self.predictions) == 1 else self.predictions
