"""fastloop: Lightning 1.x's Loop API over a fused, compiled optimizer step.

A Lightning 1.x script ports by changing ``pytorch_lightning`` to ``fastloop`` in its imports:
``LightningModule``/``LightningDataModule`` are ``Module``/``DataModule``, and ``callbacks``,
``loggers`` and ``loops`` are sub-packages of the same names.
"""
__version__ = "0.1.0"

from fastloop.callback import Callback  # noqa: E402
from fastloop.config import CompileConfig  # noqa: E402
from fastloop.datamodule import DataModule  # noqa: E402
from fastloop.module import Module  # noqa: E402
from fastloop.seed import seed_everything  # noqa: E402
from fastloop.step.nonfinite import NonFiniteError  # noqa: E402
from fastloop.trainer import Trainer  # noqa: E402
from fastloop import callbacks, loggers, loops  # noqa: E402,F401

LightningModule = Module
LightningDataModule = DataModule

__all__ = ["Callback", "CompileConfig", "DataModule", "LightningDataModule", "LightningModule", "Module", "NonFiniteError", "Trainer",
           "callbacks", "loggers", "loops", "seed_everything", "__version__"]
