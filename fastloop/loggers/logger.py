"""Lightning 1.9's module path ``pytorch_lightning.loggers.logger``, for scripts that import from it."""
from fastloop.loggers._rank import DummyExperiment, rank_zero_experiment
from fastloop.loggers.base import Logger

__all__ = ["DummyExperiment", "Logger", "rank_zero_experiment"]
