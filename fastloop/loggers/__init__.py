"""Experiment loggers with Lightning 1.x's interface: ``Logger`` (the base), ``CSVLogger`` and
``TensorBoardLogger`` (the latter needs ``pip install tensorboard`` when built, not when imported)."""
from fastloop.loggers._rank import rank_zero_experiment, rank_zero_only
from fastloop.loggers.base import Logger
from fastloop.loggers.csv_logs import CSVLogger
from fastloop.loggers.tensorboard import TensorBoardLogger

__all__ = ["CSVLogger", "Logger", "TensorBoardLogger", "rank_zero_experiment", "rank_zero_only"]
