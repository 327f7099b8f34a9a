"""The CUDA-graph step (GPU only). See ``build_cudagraph_train_step``."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple


def build_cudagraph_train_step(loop: Any, fused: Dict[int, Any], layouts: Dict[int, Any]) -> Tuple[Optional[Any], str]:
    """A step that replays a captured CUDA graph of the fused step, or ``(None, reason)``."""
    trainer = loop.trainer
    if trainer.device.type != "cuda":
        return None, f"CUDA graphs need a CUDA device; this run is on {trainer.device.type}"
    return None, "CUDA-graph capture is not available in this build"
