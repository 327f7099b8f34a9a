"""fastloop: Lightning 1.x's Loop API over a fused, compiled optimizer step."""
__version__ = "0.1.0"

from fastloop.callback import Callback  # noqa: E402
from fastloop.config import CompileConfig  # noqa: E402
from fastloop.datamodule import DataModule  # noqa: E402
from fastloop.module import Module  # noqa: E402
from fastloop.seed import seed_everything  # noqa: E402
from fastloop.trainer import Trainer  # noqa: E402

__all__ = ["Callback", "CompileConfig", "DataModule", "Module", "Trainer", "seed_everything", "__version__"]
