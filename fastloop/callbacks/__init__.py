"""Built-in callbacks."""
from fastloop.callbacks.progress import ProgressBar

__all__ = ["ProgressBar"]
