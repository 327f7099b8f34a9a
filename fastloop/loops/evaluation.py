"""``EvaluationLoop`` (one advance per dataloader) and ``EvaluationEpochLoop`` (one per batch).

Hook order for validation (test is the same with ``test`` in the names)::

    val_dataloader (once per entry-point call)
    on_validation_model_eval, [on_validation_start], [on_validation_epoch_start]
    for each dataloader, for each batch:
        [on_validation_batch_start(batch, batch_idx, dataloader_idx)]
        validation_step(batch, batch_idx[, dataloader_idx])     # dataloader_idx only with several loaders
        [on_validation_batch_end(outputs, batch, batch_idx, dataloader_idx)]
    validation_epoch_end(outputs)   # only if overridden
    [on_validation_epoch_end]; epoch metrics reduced; [on_validation_end]; on_validation_model_train
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Union

import torch

from fastloop.data.fetcher import DataFetcher
from fastloop.loops.base import Loop
from fastloop.loops.progress import BatchProgress, DataLoaderProgress


class EvaluationEpochLoop(Loop):
    """Runs the batches of one evaluation dataloader."""

    _runtime_attributes = {"eval_step": None}

    def __init__(self) -> None:
        super().__init__()
        self.batch_progress = BatchProgress()
        self.eval_step: Optional[Callable[..., Any]] = None  # built by ``setup`` for the mode
        self._outputs: List[Any] = []
        self._max_batches: Union[int, float] = 0

    def setup(self) -> None:
        from fastloop.step.build import build_eval_step

        self.eval_step = build_eval_step(self)

    @property
    def done(self) -> bool:
        return self.batch_progress.current.completed >= self._max_batches

    def reset(self) -> None:
        if self.restarting:
            self.batch_progress.reset_on_restart()
        else:
            self.batch_progress.reset_on_run()
        self._outputs = []

    def on_run_start(self, fetcher: DataFetcher, max_batches: Union[int, float], dataloader_idx: int,
                     num_dataloaders: int) -> None:
        self._max_batches = max_batches

    def advance(self, fetcher: DataFetcher, max_batches: Union[int, float], dataloader_idx: int,
                num_dataloaders: int) -> None:
        trainer = self.trainer
        stage = trainer.state.eval_stage
        batch_idx = self.batch_progress.current.ready
        batch = next(fetcher)
        self.batch_progress.is_last_batch = fetcher.done
        batch = trainer.data.transfer(batch, dataloader_idx)
        trainer.metrics.current_batch = batch
        self.batch_progress.increment_ready()
        trainer.hooks.call(f"on_{stage}_batch_start", batch, batch_idx, dataloader_idx)
        self.batch_progress.increment_started()
        args = (batch, batch_idx, dataloader_idx) if num_dataloaders > 1 else (batch, batch_idx)
        step = self.eval_step if self.eval_step is not None else self._eager_step
        output = step(f"{stage}_step", *args)
        self.batch_progress.increment_processed()
        trainer.hooks.call(f"on_{stage}_batch_end", output, batch, batch_idx, dataloader_idx)
        self.batch_progress.increment_completed()
        trainer.logger_connector.on_evaluation_batch_end(dataloader_idx)
        if trainer.hooks.module_overrides(f"{stage}_epoch_end"):
            self._outputs.append(output)

    def _eager_step(self, hook: str, *args: Any) -> Any:
        return self.trainer.hooks.call_module(hook, *args)

    def on_run_end(self) -> List[Any]:
        outputs, self._outputs = self._outputs, []
        return outputs


class EvaluationLoop(Loop):
    """Validation or test over every dataloader; returns one dict of metrics per dataloader."""

    def __init__(self, verbose: bool = True) -> None:
        super().__init__()
        self.verbose = verbose
        self.epoch_loop = EvaluationEpochLoop()
        self.dataloader_progress = DataLoaderProgress()
        self._outputs: List[List[Any]] = []
        self._logged: List[Dict[str, float]] = []

    def connect(self, epoch_loop: Optional[EvaluationEpochLoop] = None) -> None:  # type: ignore[override]
        super().connect(epoch_loop=epoch_loop)

    @property
    def _data(self) -> Any:
        return self.trainer.eval_data()

    @property
    def skip(self) -> bool:
        data = self._data
        return not data.loaders or data.total_batches == 0

    def on_skip(self) -> List[Dict[str, float]]:
        return []

    @property
    def done(self) -> bool:
        return self.dataloader_progress.current.completed >= len(self._data.loaders)

    def reset(self) -> None:
        if self.restarting:
            self.dataloader_progress.reset_on_restart()
        else:
            self.dataloader_progress.reset_on_run()
        self._outputs = []
        self._logged = []

    def run(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return super().run(*args, **kwargs)

    def on_run_start(self) -> None:
        trainer = self.trainer
        stage = trainer.state.eval_stage
        trainer.hooks.call_module(f"on_{stage}_model_eval")
        trainer.metrics.begin_evaluation()  # keeps a running training epoch's values aside
        trainer.hooks.call(f"on_{stage}_start")
        trainer.hooks.call(f"on_{stage}_epoch_start")

    def advance(self) -> None:
        trainer = self.trainer
        data = self._data
        dl_idx = self.dataloader_progress.current.ready
        self.dataloader_progress.increment_ready()
        fetcher = DataFetcher(data.loaders[dl_idx], data.max_batches[dl_idx]).start()
        trainer.metrics.dataloader_suffix = f"/dataloader_idx_{dl_idx}" if len(data.loaders) > 1 else ""
        try:
            outputs = self.epoch_loop.run(fetcher, data.max_batches[dl_idx], dl_idx, len(data.loaders))
        finally:
            fetcher.close()
            trainer.metrics.dataloader_suffix = ""
        self._outputs.append(outputs)
        self.dataloader_progress.increment_completed()

    def on_run_end(self) -> List[Dict[str, float]]:
        trainer = self.trainer
        stage = trainer.state.eval_stage
        if trainer.hooks.module_overrides(f"{stage}_epoch_end"):
            outputs = self._outputs[0] if len(self._outputs) == 1 else self._outputs
            trainer.hooks.call_module(f"{stage}_epoch_end", outputs)
        trainer.metrics.publish_epoch_values()
        trainer.hooks.call(f"on_{stage}_epoch_end")
        reduced = trainer.metrics.epoch_end()
        trainer.logger_connector.on_evaluation_end()
        trainer.metrics.end_evaluation()
        results = self._split_by_dataloader(reduced, len(self._data.loaders))
        trainer.hooks.call(f"on_{stage}_end")
        model_train = f"on_{stage}_model_train"
        trainer.hooks.call_module(model_train)
        if self.verbose and not trainer.state.fitting:
            _print_results(stage, results)
        self._outputs = []
        return results

    @staticmethod
    def _split_by_dataloader(reduced: Dict[str, torch.Tensor], count: int) -> List[Dict[str, float]]:
        results: List[Dict[str, float]] = [{} for _ in range(count)]
        for key, value in reduced.items():
            idx = 0
            if "/dataloader_idx_" in key:
                idx = int(key.rsplit("_", 1)[1])
            results[idx][key] = float(value)  # host sync: once per evaluation run
        return results

    def reset_progress(self) -> None:
        """Zero every counter (after a sanity check, whose batches do not count)."""
        self.dataloader_progress.reset()
        self.epoch_loop.batch_progress.reset()


def _print_results(stage: str, results: List[Dict[str, float]]) -> None:
    for idx, metrics in enumerate(results):
        if not metrics:
            continue
        title = f"{stage} results" + (f" (dataloader {idx})" if len(results) > 1 else "")
        width = max(len(k) for k in metrics)
        print(title)
        for key, value in sorted(metrics.items()):
            print(f"  {key:<{width}}  {value:.6g}")
