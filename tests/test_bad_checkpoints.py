"""Bad checkpoint files get a clear error naming the file and the problem, raised before anything
is restored: the module keeps its weights (``fit(ckpt_path=...)`` and ``load_from_checkpoint``)."""
from __future__ import annotations

import os
from typing import Any, Dict

import pytest
import torch
from torch import nn

from fastloop import Trainer
from fastloop.callbacks import EarlyStopping, ModelCheckpoint
from fastloop.checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint
from fastloop.data import TensorLoader
from fastloop.testing import BoringModel, random_dataset, random_loader


def trainer(**kwargs: Any) -> Trainer:
    return Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


def params(module: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(module: nn.Module, before: Dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before), "the failed load changed the module's weights"


class OtherModel(BoringModel):
    """Another architecture: different keys than BoringModel."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 10))


class HparamsModel(BoringModel):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__(hidden=hidden)
        self.save_hyperparameters()


@pytest.fixture(scope="module")
def good_bytes(tmp_path_factory) -> bytes:
    """A complete checkpoint of a BoringModel fitted one epoch (eager)."""
    os.environ.setdefault("FASTLOOP_MODE", "eager")
    path = tmp_path_factory.mktemp("good") / "good.ckpt"
    t = trainer(max_epochs=1, enable_checkpointing=False)
    t.fit(HparamsModel(), random_loader())
    t.save_checkpoint(path)
    return path.read_bytes()


def _truncated(good: bytes, path: Any) -> None:
    path.write_bytes(good[: len(good) // 2])


def _empty(good: bytes, path: Any) -> None:
    path.write_bytes(b"")


def _garbled_header(good: bytes, path: Any) -> None:
    path.write_bytes(bytes(64) + good[64:])


def _garbled_tensor_bytes(good: bytes, path: Any) -> None:
    # Inside a weight's data: torch.load alone would return wrong weights without a word.
    middle = len(good) // 2
    path.write_bytes(good[:middle] + bytes(range(64)) + good[middle + 64:])


def _other_model(good: bytes, path: Any) -> None:
    t = trainer(max_epochs=1, enable_checkpointing=False)
    t.fit(OtherModel(), random_loader())
    t.save_checkpoint(path)


def _other_shapes(good: bytes, path: Any) -> None:
    t = trainer(max_epochs=1, enable_checkpointing=False)
    t.fit(HparamsModel(hidden=48), random_loader())
    t.save_checkpoint(path)


def _newer_format(good: bytes, path: Any) -> None:
    tmp = path.with_suffix(".good")
    tmp.write_bytes(good)
    checkpoint = dict(load_checkpoint(tmp))
    checkpoint["format_version"] = FORMAT_VERSION + 1
    torch.save(checkpoint, path)


def _plain_state_dict(good: bytes, path: Any) -> None:
    torch.save(BoringModel().state_dict(), path)


FILE = r"checkpoint .*bad\.ckpt"
BAD = {
    "truncated": (_truncated, FILE + " is corrupted or truncated and cannot be read"),
    "zero_bytes": (_empty, FILE + r" is empty \(0 bytes\)"),
    "garbled_header": (_garbled_header, FILE + " is corrupted"),
    "garbled_tensor_bytes": (_garbled_tensor_bytes, FILE + " is corrupted: its record '.*' fails the CRC check"),
    "other_model": (_other_model, FILE + r" does not fit HparamsModel \(another model's checkpoint\?\): missing "
                                         r"keys net\.2\.weight, net\.2\.bias; shapes differ \(checkpoint vs model\): "
                                         r"net\.0\.weight \(10, 32\) vs \(64, 32\)"),
    "other_shapes": (_other_shapes, FILE + r" does not fit HparamsModel .*: shapes differ \(checkpoint vs model\): "
                                           r"net\.0\.weight \(48, 32\) vs \(64, 32\), net\.0\.bias \(48,\) vs \(64,\)"),
    "newer_format": (_newer_format, rf"bad\.ckpt has checkpoint format {FORMAT_VERSION + 1}, newer than this "
                                    rf"fastloop reads \({FORMAT_VERSION}\); upgrade fastloop"),
    "plain_state_dict": (_plain_state_dict, r"bad\.ckpt is not a fastloop checkpoint \(no `format_version`\)"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_fit_from_a_bad_checkpoint_fails_before_touching_the_module(tmp_path, good_bytes, kind):
    make, message = BAD[kind]
    bad = tmp_path / "bad.ckpt"
    make(good_bytes, bad)
    model = HparamsModel()
    before = params(model)
    with pytest.raises(CheckpointError, match=message):
        trainer(max_epochs=2, enable_checkpointing=False).fit(model, random_loader(), ckpt_path=str(bad))
    assert_unchanged(model, before)


@pytest.mark.parametrize("kind", ["truncated", "zero_bytes", "garbled_tensor_bytes", "newer_format",
                                  "plain_state_dict"])
def test_load_from_checkpoint_of_a_bad_file_names_it(tmp_path, good_bytes, kind):
    make, message = BAD[kind]
    bad = tmp_path / "bad.ckpt"
    make(good_bytes, bad)
    with pytest.raises(CheckpointError, match=message):
        HparamsModel.load_from_checkpoint(str(bad))


@pytest.mark.filterwarnings("ignore:Checkpoint directory")
def test_resume_last_from_a_truncated_last_ckpt_names_it_and_keeps_the_module(tmp_path, good_bytes):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    (ckpts / "last.ckpt").write_bytes(good_bytes[:100])
    model = HparamsModel()
    before = params(model)
    t = trainer(max_epochs=2, callbacks=[ModelCheckpoint(dirpath=str(ckpts), save_last=True)])
    with pytest.raises(CheckpointError, match=r"last\.ckpt is corrupted or truncated"):
        t.fit(model, random_loader(), ckpt_path="last")
    assert_unchanged(model, before)


def test_mismatched_optimizer_count_is_an_error_naming_the_file(tmp_path, good_bytes):
    class TwoGroups(HparamsModel):
        def configure_optimizers(self):
            return torch.optim.SGD([{"params": self.net[0].parameters()}, {"params": self.net[2].parameters()}],
                                   lr=0.1)

    path = tmp_path / "good.ckpt"
    path.write_bytes(good_bytes)
    model = TwoGroups()
    before = params(model)
    with pytest.raises(CheckpointError, match=r"checkpoint .*good\.ckpt, optimizer 0 \(SGD\): the checkpoint has 1 "
                                              r"parameter groups, the optimizer 2"):
        trainer(max_epochs=2, enable_checkpointing=False).fit(model, random_loader(), ckpt_path=str(path))
    # The weights fitted and were loaded before configure_optimizers (Lightning's order); the
    # optimizer mismatch found after puts the module's own weights back.
    assert_unchanged(model, before)


def test_every_checkpoint_fastloop_writes_loads_with_weights_only(tmp_path):
    """Hyperparameters, optimizer and scheduler state, callbacks (ModelCheckpoint top-k scores,
    EarlyStopping), loops, RNG streams (numpy's included) and a TensorLoader's position."""

    class Scheduled(HparamsModel):
        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=1e-3)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1)}

    data = random_dataset(n=64)
    ckpts = tmp_path / "ckpts"
    t = trainer(max_epochs=2, callbacks=[EarlyStopping(monitor="val_loss", patience=5),
                                         ModelCheckpoint(dirpath=str(ckpts), monitor="val_loss", save_last=True)])
    t.fit(Scheduled(hidden=16), TensorLoader(*data.tensors, batch_size=16, shuffle=True), random_loader())
    t.save_checkpoint(tmp_path / "manual.ckpt")
    t.save_checkpoint(tmp_path / "weights.ckpt", weights_only=True)
    files = sorted(ckpts.iterdir()) + [tmp_path / "manual.ckpt", tmp_path / "weights.ckpt"]
    assert len(files) == 4
    for path in files:
        checkpoint = torch.load(path, weights_only=True)
        assert checkpoint["format_version"] == FORMAT_VERSION and checkpoint["hyper_parameters"] == {"hidden": 16}
    full = torch.load(tmp_path / "manual.ckpt", weights_only=True)
    assert {"optimizer_states", "lr_schedulers", "loops", "rng_states", "callbacks", "train_loader"} <= full.keys()
    assert full["lr_schedulers"][0]["last_epoch"] == 2 and "numpy" in full["rng_states"]
