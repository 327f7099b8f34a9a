"""Checkpoint files: atomic writes and versioned, validated reads."""
from __future__ import annotations

import glob
import os
import re
import secrets
import zipfile
from typing import IO, Any, Dict, Tuple

import torch

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used (corrupted, truncated, foreign, too new, another
    model's) or cannot be written."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint write that failed on an ``OSError`` (full disk, permissions...): still an
    ``OSError`` with the cause's ``errno``, for code that handles those."""


class LoadedCheckpoint(dict):
    """A checkpoint's dictionary that remembers the file it came from (``path``), so errors found
    while restoring it can name the file."""

    path: str = "<checkpoint>"


_TEMP_SUFFIX = re.compile(r"(\d+)\.[0-9a-f]{8}\.tmp")  # <pid>.<random>.tmp, after _temp_prefix


def _temp_prefix(path: str) -> str:
    return "." + os.path.basename(path) + "."


def _open_temp(path: str) -> Tuple[IO[bytes], str]:
    """A new hidden file ``.<name>.<pid>.<random>.tmp`` next to ``path``, created with the mode a
    plain ``open`` would give (the umask applies; ``mkstemp``'s 0600 would silently change the
    permissions of a replaced checkpoint)."""
    directory = os.path.dirname(path)
    while True:
        tmp = os.path.join(directory, f"{_temp_prefix(path)}{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        return os.fdopen(fd, "wb"), tmp


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def remove_stale_temporaries(path: str) -> None:
    """Delete the temporary files a killed writer of ``path`` left behind: those of this process
    (which writes one at a time) or of a process that no longer runs. A live writer's stay."""
    prefix = os.path.join(os.path.dirname(path), _temp_prefix(path))
    for tmp in glob.glob(glob.escape(prefix) + "*.tmp"):
        match = _TEMP_SUFFIX.fullmatch(tmp[len(prefix):])
        if match is None:  # another file's temporary (``model.ckpt.v2`` vs ``model.ckpt``)
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or not _process_alive(pid):
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _write_error(path: str, exc: Exception) -> CheckpointError:
    message = f"could not write checkpoint {path}: {exc}"
    if isinstance(exc, OSError):
        error = CheckpointWriteError(message)
        error.errno = exc.errno
        return error
    return CheckpointError(message)


def atomic_save(obj: Dict[str, Any], path: str) -> None:
    """Write ``obj`` to ``path`` so that ``path`` is either the old file or the complete new one.

    The data goes to a temporary file in the same directory (so the final rename stays on one
    file system), is flushed and fsynced, then ``os.replace``d over ``path``. A failure removes
    the temporary file and raises ``CheckpointError`` naming ``path`` and the cause (an
    ``OSError`` cause gives a ``CheckpointWriteError``, also an ``OSError``); temporaries left by
    a killed writer are removed by the next save of the same path.
    """
    shown = os.fspath(path)
    path = os.path.abspath(shown)
    directory = os.path.dirname(path)
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        remove_stale_temporaries(path)
        f, tmp = _open_temp(path)
        with f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if isinstance(exc, Exception):
            raise _write_error(shown, exc) from exc
        raise  # KeyboardInterrupt, SystemExit: as they are
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


def _check_records(path: str) -> None:
    """Verify the CRC-32 of every record of a zip-format checkpoint: ``torch.load`` does not,
    so damaged tensor bytes would load silently as wrong weights (reading a file costs about
    half of a ``torch.load`` more)."""
    if not zipfile.is_zipfile(path):
        return  # truncated (no central directory) or torch's legacy format: torch.load decides
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except Exception as exc:  # BadZipFile, zlib.error, EOFError...
        raise CheckpointError(f"checkpoint {path} is corrupted and cannot be read: {exc}") from exc
    if damaged is not None:
        raise CheckpointError(f"checkpoint {path} is corrupted: its record {damaged!r} fails the CRC check "
                              "(damaged bytes)")


def load_checkpoint(path: str, map_location: Any = None) -> LoadedCheckpoint:
    """Read a fastloop checkpoint (``weights_only=True``) and check its format version.

    ``map_location`` is torch.load's (a device, a dict of devices or a function); None loads
    every tensor onto the CPU. Every problem is a ``CheckpointError`` naming the file, raised
    before anything is restored from it.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); it was never completely written")
    _check_records(path)
    try:
        checkpoint = torch.load(path, map_location="cpu" if map_location is None else map_location,
                                weights_only=True)
    except Exception as exc:  # torch raises several types for damaged zip archives
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated and cannot be read: {exc}") from exc
    if not isinstance(checkpoint, dict) or "format_version" not in checkpoint:
        raise CheckpointError(f"{path} is not a fastloop checkpoint (no `format_version`)")
    version = checkpoint["format_version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"checkpoint {path} has an invalid `format_version` {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version}, newer than this fastloop reads ({FORMAT_VERSION}); "
            "upgrade fastloop"
        )
    if "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} lacks the required key `state_dict`")
    if not isinstance(checkpoint["state_dict"], dict):
        raise CheckpointError(f"checkpoint {path}: `state_dict` is a {type(checkpoint['state_dict']).__name__}, "
                              "not a dict of tensors")
    loaded = LoadedCheckpoint(checkpoint)
    loaded.path = path
    return loaded
