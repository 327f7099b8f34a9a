"""Checkpoint files: atomic writes and versioned, validated reads."""
from __future__ import annotations

import os
import tempfile
from typing import Any, Dict

import torch

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: corrupted, truncated, foreign or too new."""


def atomic_save(obj: Dict[str, Any], path: str) -> None:
    """Write ``obj`` to ``path`` so that ``path`` is either the old file or the complete new one.

    The data goes to a temporary file in the same directory (so the final rename stays on one
    file system), is flushed and fsynced, then ``os.replace``d over ``path``.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable where the platform allows it
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str, map_location: Any = None) -> Dict[str, Any]:
    """Read a fastloop checkpoint (``weights_only=True``) and check its format version.

    ``map_location`` is torch.load's (a device, a dict of devices or a function); None loads
    every tensor onto the CPU.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu" if map_location is None else map_location,
                                weights_only=True)
    except Exception as exc:  # torch raises several types for damaged zip archives
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated and cannot be read: {exc}") from exc
    if not isinstance(checkpoint, dict) or "format_version" not in checkpoint:
        raise CheckpointError(f"{path} is not a fastloop checkpoint (no `format_version`)")
    version = checkpoint["format_version"]
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version}, newer than this fastloop reads ({FORMAT_VERSION}); "
            "upgrade fastloop"
        )
    for key in ("state_dict",):
        if key not in checkpoint:
            raise CheckpointError(f"checkpoint {path} lacks the required key `{key}`")
    return checkpoint
