"""The environment a result was measured in (recorded in the JSON output)."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from typing import Any, Dict, Optional

import torch


def git_sha() -> Optional[str]:
    """The checkout's commit, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def environment(device: torch.device) -> Dict[str, Any]:
    from fastloop import __version__

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "fastloop": __version__,
        "git_sha": git_sha(),
        "device": device.type,
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,  # other load skews timings
        "argv": sys.argv[1:],
    }
