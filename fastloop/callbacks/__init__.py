"""Built-in callbacks, one file each."""
from fastloop.callback import Callback
from fastloop.callbacks.early_stopping import EarlyStopping
from fastloop.callbacks.finetuning import BackboneFinetuning, Freeze, FreezeUnfreeze, NoFreeze
from fastloop.callbacks.lr_monitor import LearningRateMonitor
from fastloop.callbacks.model_checkpoint import ModelCheckpoint
from fastloop.callbacks.model_summary import ModelSummary
from fastloop.callbacks.progress import ProgressBar, TQDMProgressBar

__all__ = ["BackboneFinetuning", "Callback", "EarlyStopping", "Freeze", "FreezeUnfreeze", "NoFreeze", "LearningRateMonitor", "ModelCheckpoint", "ModelSummary", "ProgressBar",
           "TQDMProgressBar"]
