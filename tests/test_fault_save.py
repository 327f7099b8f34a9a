"""A checkpoint write that fails (full disk, an error at any point of the write, a process killed
mid-save) leaves the previous checkpoint intact and loadable, no partial file under a final name,
and an error naming the file and the cause; stale temporaries are ignored by ``ckpt_path="last"``
and removed by the next save."""
from __future__ import annotations

import errno
import io
import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from fastloop import Trainer
from fastloop.callbacks import ModelCheckpoint
from fastloop.checkpoint import FORMAT_VERSION, CheckpointError, CheckpointWriteError, atomic_save, load_checkpoint
from fastloop.testing import BoringModel, random_loader

REAL_SAVE = torch.save


def state(value: float) -> dict:
    return {"format_version": FORMAT_VERSION, "state_dict": {"w": torch.full((1000,), value)}}


def saved_value(path) -> float:
    return float(load_checkpoint(path)["state_dict"]["w"][0])


def save_half_then(exc: BaseException):
    """A ``torch.save`` that writes half of the real bytes, then raises ``exc``."""
    def broken_save(obj, f):
        buffer = io.BytesIO()
        REAL_SAVE(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise exc
    return broken_save


def failing(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc
    return fail


ENOSPC = OSError(errno.ENOSPC, "No space left on device")
FAULTS = {
    "enospc_in_torch_save": ("torch.save", save_half_then(ENOSPC), ENOSPC),
    "error_in_torch_save": ("torch.save", save_half_then(RuntimeError("cannot pickle")), RuntimeError("cannot pickle")),
    "eio_at_fsync": ("os.fsync", failing(OSError(errno.EIO, "Input/output error")), OSError(errno.EIO, "x")),
    "error_at_replace": ("os.replace", failing(PermissionError(errno.EACCES, "Permission denied")),
                         PermissionError(errno.EACCES, "x")),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_failed_write_keeps_the_previous_checkpoint_and_names_path_and_cause(tmp_path, monkeypatch, fault):
    target, replacement, cause = FAULTS[fault]
    path = tmp_path / "model.ckpt"
    atomic_save(state(1.0), path)
    module, name = target.split(".")
    monkeypatch.setattr(torch if module == "torch" else os, name, replacement)
    expected = CheckpointWriteError if isinstance(cause, OSError) else CheckpointError
    with pytest.raises(expected, match=rf"^could not write checkpoint {path}: ") as info:
        atomic_save(state(2.0), path)
    monkeypatch.undo()
    assert type(info.value.__cause__) is type(cause) and str(info.value.__cause__) in str(info.value)
    if isinstance(cause, OSError):  # still an OSError with the cause's errno, for `except OSError`
        assert isinstance(info.value, OSError) and info.value.errno == cause.errno
    assert os.listdir(tmp_path) == ["model.ckpt"]  # no temporary left behind
    assert saved_value(path) == 1.0


def test_keyboard_interrupt_during_a_write_is_not_wrapped(tmp_path, monkeypatch):
    path = tmp_path / "model.ckpt"
    atomic_save(state(1.0), path)
    monkeypatch.setattr(torch, "save", save_half_then(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        atomic_save(state(2.0), path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["model.ckpt"] and saved_value(path) == 1.0


def test_checkpoints_get_the_permissions_a_plain_open_gives(tmp_path):
    path = tmp_path / "model.ckpt"
    atomic_save(state(1.0), path)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_full_disk_during_fit_leaves_last_ckpt_complete_and_resumable(tmp_path, monkeypatch):
    ckpts = tmp_path / "ckpts"
    calls = []

    def full_disk_on_the_third_save(obj, f):
        calls.append(obj["global_step"])
        if len(calls) == 3:
            save_half_then(ENOSPC)(obj, f)
        REAL_SAVE(obj, f)

    monkeypatch.setattr(torch, "save", full_disk_on_the_third_save)
    checkpoint = ModelCheckpoint(dirpath=str(ckpts), every_n_train_steps=2, save_top_k=0, save_last=True)
    t = Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                callbacks=[checkpoint])
    last = ckpts / "last.ckpt"
    with pytest.raises(CheckpointWriteError, match=rf"could not write checkpoint {last}: \[Errno 28\] No space left"):
        t.fit(BoringModel(), random_loader(n=128))  # 8 steps; saves at steps 2, 4, then 6 fails
    monkeypatch.undo()
    assert calls == [2, 4, 6] and os.listdir(ckpts) == ["last.ckpt"]
    assert load_checkpoint(last)["global_step"] == 4
    resumed = Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[ModelCheckpoint(dirpath=str(ckpts), every_n_train_steps=2, save_top_k=0,
                                                 save_last=True)])
    resumed.fit(BoringModel(), random_loader(n=128), ckpt_path="last")
    assert resumed.global_step == 8 and load_checkpoint(last)["global_step"] == 8


# A process killed while saving: the previous checkpoint survives, a temporary stays behind.
KILL_SCRIPT = textwrap.dedent("""
    import io, os, signal, sys
    import torch
    from fastloop.checkpoint import atomic_save

    path, where = sys.argv[1], sys.argv[2]
    atomic_save({"format_version": 1, "state_dict": {"w": torch.ones(1000)}}, path)
    real_save, real_fsync, real_replace = torch.save, os.fsync, os.replace
    kill = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
    def save_half_then_die(obj, f):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        kill()
    if where == "mid_write":
        torch.save = save_half_then_die
    elif where == "at_fsync":
        os.fsync = kill
    else:
        os.replace = kill
    atomic_save({"format_version": 1, "state_dict": {"w": torch.zeros(1000)}}, path)
""")


@pytest.mark.parametrize("where", ["mid_write", "at_fsync", "before_replace"])
def test_process_killed_mid_save_keeps_last_ckpt_complete(tmp_path, where):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    last = ckpts / "last.ckpt"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(last), where], timeout=120,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stdout
    stale = [name for name in os.listdir(ckpts) if name != "last.ckpt"]
    assert len(stale) == 1 and stale[0].startswith(".last.ckpt.") and stale[0].endswith(".tmp")
    assert saved_value(last) == 1.0  # the previous checkpoint, complete

    # ckpt_path="last" ignores the temporary; the next save of last.ckpt removes it.
    t = Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                callbacks=[ModelCheckpoint(dirpath=str(ckpts), save_top_k=0, save_last=True)])
    assert t.checkpoint_connector.resolve("last", "fit") == str(last)
    atomic_save(state(3.0), last)
    assert os.listdir(ckpts) == ["last.ckpt"] and saved_value(last) == 3.0


def test_only_temporaries_of_dead_writers_or_this_process_are_removed(tmp_path):
    path = tmp_path / "model.ckpt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], stdout=subprocess.PIPE,
                          text=True, check=True)
    live_other = os.getppid()
    names = {
        f".model.ckpt.{int(dead.stdout)}.0123abcd.tmp": False,  # its writer is gone
        f".model.ckpt.{os.getpid()}.0123abcd.tmp": False,       # ours, from an earlier failed attempt
        f".model.ckpt.{live_other}.0123abcd.tmp": True,         # another live process may be writing it
        f".other.ckpt.{int(dead.stdout)}.0123abcd.tmp": True,   # another file's
        f".model.ckpt.v2.ckpt.{int(dead.stdout)}.0123abcd.tmp": True,  # another file's, same prefix
    }
    for name in names:
        (tmp_path / name).write_bytes(b"partial")
    atomic_save(state(1.0), path)
    assert sorted(os.listdir(tmp_path)) == sorted(["model.ckpt"] + [n for n, stays in names.items() if stays])
