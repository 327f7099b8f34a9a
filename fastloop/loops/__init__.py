"""The Loop API: ``Loop`` and the built-in loops of ``Trainer.fit/validate/test/predict``."""
from fastloop.loops.base import Loop
from fastloop.loops.evaluation import EvaluationEpochLoop, EvaluationLoop
from fastloop.loops.fit import FitLoop
from fastloop.loops.manual import ManualOptimization
from fastloop.loops.optimizer import OptimizerLoop, StepOutput
from fastloop.loops.prediction import PredictionEpochLoop, PredictionLoop
from fastloop.loops.progress import (
    BatchProgress,
    DataLoaderProgress,
    OptimizationProgress,
    OptimizerProgress,
    Progress,
    SchedulerProgress,
)
from fastloop.loops.training_batch import TrainingBatchLoop
from fastloop.loops.training_epoch import TrainingEpochLoop
from fastloop.loops.yield_loop import YieldLoop

__all__ = [
    "BatchProgress", "DataLoaderProgress", "EvaluationEpochLoop", "EvaluationLoop", "FitLoop", "Loop",
    "ManualOptimization", "OptimizationProgress", "OptimizerLoop", "OptimizerProgress", "PredictionEpochLoop",
    "PredictionLoop", "Progress", "SchedulerProgress", "StepOutput", "TrainingBatchLoop", "TrainingEpochLoop",
    "YieldLoop",
]
