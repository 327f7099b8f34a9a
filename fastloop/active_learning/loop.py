"""``ActiveLearningLoop``: train on the labelled pool, score the unlabelled pool, label, repeat.

Used as Flash's loop is::

    trainer = Trainer(max_epochs=3)                      # 3 active-learning cycles
    loop = ActiveLearningLoop(label_epoch_frequency=1)   # 1 training epoch per cycle
    loop.connect(trainer.fit_loop)
    trainer.fit_loop = loop
    trainer.fit(model, datamodule=ActiveLearningDataModule(dataset, initial_labels=5, query_size=5))

One advance is one cycle (``trainer.datamodule`` is the ``ActiveLearningDataModule``)::

    loaders reloaded (the pools changed)
    fit_loop.run()            # label_epoch_frequency epochs on the labelled pool; skipped, with a
                              # warning, while nothing is labelled
    test_loop.run()           # when the datamodule has test data (metrics logged at global_step)
    predict_loop.run()        # MC dropout over the whole unlabelled pool: [N, C, iterations]
    label the query_size highest heuristic scores
    unless this was the last cycle: weights back to their initial values, epochs back to 0,
    optimizers and schedulers back to their configured state, all in place

It stops after ``max_epochs`` cycles, or after a cycle that found the pool empty.
``progress.total.completed`` counts finished cycles. Built on the public Loop API only: the
wrapped ``FitLoop``, an ``EvaluationLoop`` and an ``MCDropoutPredictionLoop`` are its child
loops (set up for the mode with the fit tree, saved in checkpoints);
``FitLoop.reset_epochs``/``reset_optimizers`` restart training without touching
``global_step`` or rebuilding a step, so compiled graphs keep serving every cycle.

State saved by ``trainer.save_checkpoint``: the cycle counters and the initial weights here, the
pools in the datamodule's state, the fit loop's position in its own. A checkpoint taken during a
cycle's training resumes that training where it was; one taken during its test or prediction
runs them again from their start.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Dict, Optional, Union

import torch
from torch import Tensor

from fastloop.active_learning.data import ActiveLearningDataModule
from fastloop.active_learning.heuristics import resolve_heuristic, score, top_k
from fastloop.active_learning.mc_dropout import MCDropoutPredictionLoop
from fastloop.loops.base import Loop
from fastloop.loops.evaluation import EvaluationLoop
from fastloop.loops.fit import FitLoop
from fastloop.loops.progress import Progress


def softmax_over_classes(outputs: Tensor) -> Tensor:
    """Logits ``[N, C, iterations]`` to probabilities over ``C``."""
    return torch.softmax(outputs.double(), dim=1)


class ActiveLearningLoop(Loop):
    """Active-learning cycles around a ``FitLoop`` (see the module docstring).

    Args:
        label_epoch_frequency: training epochs per cycle.
        inference_iteration: MC-dropout passes per unlabelled sample.
        should_reset_weights: retrain from the initial weights each cycle (and fresh optimizers).
        heuristic: ``"bald"``, ``"entropy"``, ``"margin"``, ``"least_confidence"``, ``"random"``,
            a callable ``probabilities [N, C, T] -> scores [N]`` (higher: more informative), or a
            BaaL heuristic object.
        to_probabilities: turns the stacked ``predict_step`` outputs into probabilities
            (default: softmax over dim 1, for logits); None when ``predict_step`` returns
            probabilities already.
    """

    child_slots = ("fit_loop",)

    def __init__(self, label_epoch_frequency: int = 1, inference_iteration: int = 2,
                 should_reset_weights: bool = True, heuristic: Union[str, Callable[[Tensor], Tensor], Any] = "bald",
                 to_probabilities: Optional[Callable[[Tensor], Tensor]] = softmax_over_classes) -> None:
        super().__init__()
        if isinstance(label_epoch_frequency, bool) or not isinstance(label_epoch_frequency, int) \
                or label_epoch_frequency < 1:
            raise ValueError(f"ActiveLearningLoop(label_epoch_frequency={label_epoch_frequency!r}): "
                             "expected an int >= 1")
        self.label_epoch_frequency = label_epoch_frequency
        self.inference_iteration = inference_iteration
        self.should_reset_weights = should_reset_weights
        self.heuristic = resolve_heuristic(heuristic)
        self.to_probabilities = to_probabilities
        self.max_epochs: Optional[int] = None  # cycles; taken from the fit loop by ``connect``
        self.fit_loop: Optional[FitLoop] = None
        self.test_loop = EvaluationLoop(verbose=False)
        self.predict_loop = MCDropoutPredictionLoop(inference_iteration)
        self.progress = Progress()
        self.last_scores: Optional[Tensor] = None  # the last query's scores, in unlabelled_indices order
        self._initial_weights: Optional[Dict[str, Tensor]] = None
        self._pool_exhausted = False

    # ---------------------------------------------------------------- wiring
    def connect(self, fit_loop: FitLoop) -> None:  # type: ignore[override]
        """Wrap ``fit_loop``: its ``max_epochs`` becomes the number of cycles, and it trains
        ``label_epoch_frequency`` epochs per cycle."""
        if not isinstance(fit_loop, FitLoop):
            raise TypeError(f"ActiveLearningLoop.connect() takes the trainer's FitLoop, got {type(fit_loop).__name__}")
        cycles = fit_loop.max_epochs
        if cycles is None or cycles == -1:
            raise ValueError("ActiveLearningLoop.connect(): the fit loop has no max_epochs; set "
                             "Trainer(max_epochs=...) to the number of cycles")
        self.max_epochs = cycles
        fit_loop.max_epochs = self.label_epoch_frequency
        super().connect(fit_loop=fit_loop)

    def __getattr__(self, name: str) -> Any:
        # Unknown attributes come from the wrapped fit loop (``trainer.fit_loop.epoch_loop``...).
        fit_loop = self.__dict__.get("fit_loop")
        if fit_loop is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return getattr(fit_loop, name)

    def setup(self) -> None:
        if self.fit_loop is None:
            raise RuntimeError("ActiveLearningLoop has no fit loop: call loop.connect(trainer.fit_loop) first")
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, ActiveLearningDataModule):
            raise TypeError("ActiveLearningLoop needs trainer.fit(model, datamodule=ActiveLearningDataModule(...)), "
                            f"got {type(datamodule).__name__ if datamodule is not None else 'no datamodule'}")

    @property
    def datamodule(self) -> ActiveLearningDataModule:
        return self.trainer.datamodule  # type: ignore[return-value]

    # -------------------------------------------------------------- skeleton
    @property
    def done(self) -> bool:
        return self._pool_exhausted or self.progress.current.completed >= self.max_epochs

    def reset(self) -> None:
        if self.restarting:
            self.progress.reset_on_restart()
        else:
            self.progress.reset_on_run()
            self._pool_exhausted = False

    def on_run_start(self) -> None:
        if self.restarting and self._initial_weights is not None:
            return  # resuming: the checkpoint's initial weights and positions stand
        self._initial_weights = copy.deepcopy(self.trainer.module.state_dict())
        self.fit_loop.reset_epochs()  # a second trainer.fit() with this loop starts at epoch 0 too

    def on_advance_start(self) -> None:
        self.progress.increment_ready()
        self.trainer.reload_dataloaders()  # the pools changed since the loaders were made

    def advance(self) -> None:
        trainer = self.trainer
        datamodule = self.datamodule
        self.progress.increment_started()
        if datamodule.has_labelled_data:
            self.fit_loop.run()
        else:
            warnings.warn("ActiveLearningLoop: no labels provided for the initial step; this cycle trains nothing",
                          UserWarning, stacklevel=2)
        if datamodule.has_test:
            self.test_loop.restarting = False  # evaluation never resumes mid-way
            with trainer.state.stage_as("test"):
                self.test_loop.run()
        if datamodule.has_unlabelled_data:
            self._query(datamodule)
        else:
            self._pool_exhausted = True
        self.progress.increment_processed()

    def _query(self, datamodule: ActiveLearningDataModule) -> None:
        """Predict over the whole pool, score every sample, label the highest scores."""
        trainer = self.trainer
        pool = datamodule.unlabelled_indices
        self.predict_loop.restarting = False
        with trainer.state.stage_as("predict"):
            outputs = self.predict_loop.run()
        outputs = torch.cat(outputs) if isinstance(outputs, list) else outputs
        if outputs.shape[0] != len(pool):
            raise RuntimeError(f"ActiveLearningLoop: the prediction gave {outputs.shape[0]} rows for the "
                               f"{len(pool)} unlabelled samples; limit_predict_batches must stay at 1.0")
        probabilities = self.to_probabilities(outputs) if self.to_probabilities is not None else outputs
        scores = score(self.heuristic, probabilities)
        self.last_scores = scores
        chosen = top_k(scores, min(datamodule.query_size, len(pool))).tolist()
        datamodule.label([pool[i] for i in chosen])

    def on_advance_end(self) -> None:
        if not self._last_cycle:  # the last cycle's model stays trained
            if self.should_reset_weights:
                self.trainer.module.load_state_dict(self._initial_weights)  # in place: same tensors, same graphs
                self.fit_loop.reset_optimizers()
            self.fit_loop.reset_epochs()
        self.progress.increment_completed()

    @property
    def _last_cycle(self) -> bool:
        return self._pool_exhausted or self.progress.current.completed + 1 >= self.max_epochs

    def on_run_end(self) -> None:
        self.trainer.reload_dataloaders()

    # ------------------------------------------------------------------ state
    def on_save_checkpoint(self) -> Dict[str, Any]:
        return {"max_epochs": self.max_epochs, "pool_exhausted": self._pool_exhausted,
                "initial_weights": self._initial_weights}

    def on_load_checkpoint(self, state_dict: Dict[str, Any]) -> None:
        self._pool_exhausted = bool(state_dict.get("pool_exhausted", False))
        if state_dict.get("initial_weights") is not None:
            self._initial_weights = state_dict["initial_weights"]
