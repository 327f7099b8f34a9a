"""Checkpoints: contents, weights_only loading, atomic writes, corruption, and exact resume."""
import copy
import os
from typing import List

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from fastloop import Callback, LightningDataModule, Trainer
from fastloop.checkpoint import FORMAT_VERSION, CheckpointError, atomic_save, load_checkpoint
from fastloop.testing import BoringModel, random_dataset


class ResumableModel(BoringModel):
    """Dropout, Adam and a per-step LR schedule: resume must restore all of their state."""

    def __init__(self):
        super().__init__(optimizer="adam", lr=0.01)
        self.drop = nn.Dropout(0.3)
        self.seen: List[float] = []

    def forward(self, x):
        return self.net(self.drop(x))

    def training_step(self, batch, batch_idx):
        self.seen.append(float(batch[0].sum()))  # identifies the batch
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def shuffled_loader():
    return DataLoader(random_dataset(n=64), batch_size=16, shuffle=True)


def trainer(**kwargs):
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    return Trainer(enable_progress_bar=False, num_sanity_val_steps=0, **kwargs)


class SaveAt(Callback):
    """Saves a checkpoint in ``on_train_batch_end`` at the given global step."""

    def __init__(self, path, step):
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_checkpoint_contents_load_with_weights_only(tmp_path):
    model = ResumableModel()
    t = trainer(max_epochs=1)
    t.fit(model, shuffled_loader())
    path = tmp_path / "model.ckpt"
    t.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["format_version"] == FORMAT_VERSION
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 4
    assert set(ckpt["loops"]) == {"fit_loop", "validate_loop", "test_loop", "predict_loop"}
    assert ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 1
    assert len(ckpt["optimizer_states"]) == 1 and ckpt["lr_schedulers"][0]["last_epoch"] == 4
    assert set(ckpt["rng_states"]) >= {"python", "numpy", "torch"}
    assert [f for f in os.listdir(tmp_path)] == ["model.ckpt"]


def test_two_epochs_equal_one_epoch_save_and_resume(tmp_path):
    torch.manual_seed(1)
    model = ResumableModel()
    initial = copy.deepcopy(model.state_dict())
    trainer(max_epochs=2).fit(model, shuffled_loader())

    torch.manual_seed(1)
    first = ResumableModel()
    first.load_state_dict(initial)
    t1 = trainer(max_epochs=1)
    t1.fit(first, shuffled_loader())
    t1.save_checkpoint(tmp_path / "epoch1.ckpt")

    torch.manual_seed(123)  # a different process state: the checkpoint must carry the RNG
    resumed = ResumableModel()
    t2 = trainer(max_epochs=2)
    t2.fit(resumed, shuffled_loader(), ckpt_path=tmp_path / "epoch1.ckpt")
    assert torch.equal(params(model), params(resumed))
    assert first.seen + resumed.seen == model.seen
    assert t2.global_step == 8 and t2.current_epoch == 2
    assert t2.lr_scheduler_configs[0].scheduler.last_epoch == 8


@pytest.mark.parametrize("save_step", [2, 4, 6])
def test_resume_from_a_mid_epoch_checkpoint_is_exact(tmp_path, save_step):
    path = tmp_path / "mid.ckpt"
    torch.manual_seed(2)
    model = ResumableModel()
    initial = copy.deepcopy(model.state_dict())
    trainer(max_epochs=2, callbacks=[SaveAt(path, save_step)]).fit(model, shuffled_loader())

    resumed = ResumableModel()
    resumed.load_state_dict(initial)
    t = trainer(max_epochs=2)
    t.fit(resumed, shuffled_loader(), ckpt_path=path)
    assert resumed.seen == model.seen[save_step:]  # no batch repeated or skipped
    assert torch.equal(params(model), params(resumed))
    assert t.global_step == 8


def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_save({"format_version": FORMAT_VERSION, "state_dict": {"w": torch.ones(2)}}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        atomic_save({"format_version": FORMAT_VERSION, "state_dict": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.ones(2))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind


def test_corrupted_and_foreign_checkpoints_get_clear_errors(tmp_path):
    good = tmp_path / "good.pt"
    atomic_save({"format_version": FORMAT_VERSION, "state_dict": {}}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="truncated.pt is corrupted"):
        load_checkpoint(truncated)
    future = tmp_path / "future.pt"
    torch.save({"format_version": FORMAT_VERSION + 1, "state_dict": {}}, future)
    with pytest.raises(CheckpointError, match="newer than this fastloop reads"):
        load_checkpoint(future)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": 1}, foreign)
    with pytest.raises(CheckpointError, match="not a fastloop checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_weights_only_checkpoint_cannot_resume_but_can_test(tmp_path):
    model = BoringModel()
    t = trainer(max_epochs=1)
    t.fit(model, shuffled_loader())
    t.save_checkpoint(tmp_path / "w.pt", weights_only=True)
    fresh = BoringModel()
    result = trainer().test(fresh, shuffled_loader(), ckpt_path=tmp_path / "w.pt")
    assert torch.equal(params(fresh), params(model)) and "test_loss" in result[0]
    with pytest.raises(CheckpointError, match="weights only"):
        trainer(max_epochs=2).fit(BoringModel(), shuffled_loader(), ckpt_path=tmp_path / "w.pt")


def test_module_and_callback_checkpoint_hooks(tmp_path):
    class Stateful(Callback):
        def __init__(self):
            self.count = 0

        def on_train_batch_end(self, *args):
            self.count += 1

        def state_dict(self):
            return {"count": self.count}

        def load_state_dict(self, state):
            self.count = state["count"]

    class Hooked(BoringModel):
        def on_save_checkpoint(self, checkpoint):
            checkpoint["extra"] = torch.tensor(7)

        def on_load_checkpoint(self, checkpoint):
            self.loaded_extra = int(checkpoint["extra"])

    cb = Stateful()
    t = trainer(max_epochs=1, callbacks=[cb])
    t.fit(Hooked(), shuffled_loader())
    t.save_checkpoint(tmp_path / "c.pt")
    cb2, model2 = Stateful(), Hooked()
    trainer(max_epochs=2, callbacks=[cb2]).fit(model2, shuffled_loader(), ckpt_path=tmp_path / "c.pt")
    assert model2.loaded_extra == 7 and cb2.count == 8


def tensor_loader(seed=5):
    from fastloop.data import TensorLoader

    data = random_dataset(n=64)
    return TensorLoader(*data.tensors, batch_size=16, shuffle=True, seed=seed)


@pytest.mark.parametrize("save_step", [3, 4])
def test_tensor_loader_resumes_at_the_exact_next_batch(tmp_path, save_step):
    path = tmp_path / "tl.ckpt"
    torch.manual_seed(4)
    model = ResumableModel()
    initial = copy.deepcopy(model.state_dict())
    trainer(max_epochs=3, callbacks=[SaveAt(path, save_step)]).fit(model, tensor_loader())
    assert torch.load(path, weights_only=True)["train_loader"]["seed"] == 5

    resumed = ResumableModel()
    resumed.load_state_dict(initial)
    # a loader built with another seed still resumes the checkpoint's order
    trainer(max_epochs=3).fit(resumed, tensor_loader(seed=99), ckpt_path=path)
    assert resumed.seen == model.seen[save_step:]
    assert torch.equal(params(model), params(resumed))


def test_tensor_loader_seed_comes_from_the_checkpoint_at_epoch_boundaries(tmp_path):
    torch.manual_seed(4)
    model = ResumableModel()
    initial = copy.deepcopy(model.state_dict())
    trainer(max_epochs=2).fit(model, tensor_loader())
    torch.manual_seed(4)
    first = ResumableModel()
    first.load_state_dict(initial)
    t1 = trainer(max_epochs=1)
    t1.fit(first, tensor_loader())
    t1.save_checkpoint(tmp_path / "e1.ckpt")
    resumed = ResumableModel()
    trainer(max_epochs=2).fit(resumed, tensor_loader(seed=99), ckpt_path=tmp_path / "e1.ckpt")
    assert first.seen + resumed.seen == model.seen
    assert torch.equal(params(model), params(resumed))


class CountingDataModule(LightningDataModule):
    """A stateful datamodule: counts the train loaders it made, and keeps the count in checkpoints."""

    def __init__(self):
        super().__init__()
        self.loaders_made = 0
        self.loaded = None

    def train_dataloader(self):
        self.loaders_made += 1
        return DataLoader(random_dataset(n=32), batch_size=16)

    def state_dict(self):
        return {"loaders_made": self.loaders_made}

    def load_state_dict(self, state_dict):
        self.loaded = dict(state_dict)


class StatelessDataModule(LightningDataModule):
    def train_dataloader(self):
        return DataLoader(random_dataset(n=32), batch_size=16)


def test_datamodule_state_is_saved_under_its_qualified_name_and_restored(tmp_path):
    """As Lightning 1.9: ``checkpoint[type(dm).__qualname__]``, written only when the state is
    non-empty, handed to ``load_state_dict`` on resume (an old fixed "datamodule" key too)."""
    path = str(tmp_path / "dm.ckpt")
    dm = CountingDataModule()
    t = trainer(max_epochs=1, mode="eager")
    t.fit(BoringModel(), datamodule=dm)
    t.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    assert saved["CountingDataModule"] == {"loaders_made": dm.loaders_made}
    assert "datamodule" not in saved

    resumed = CountingDataModule()
    trainer(max_epochs=2, mode="eager").fit(BoringModel(), datamodule=resumed, ckpt_path=path)
    assert resumed.loaded == {"loaders_made": dm.loaders_made}

    saved["datamodule"] = saved.pop("CountingDataModule")  # a checkpoint of an earlier fastloop
    atomic_save(saved, path)
    older = CountingDataModule()
    trainer(max_epochs=2, mode="eager").fit(BoringModel(), datamodule=older, ckpt_path=path)
    assert older.loaded == {"loaders_made": dm.loaders_made}

    t = trainer(max_epochs=1, mode="eager")
    t.fit(BoringModel(), datamodule=StatelessDataModule())
    t.save_checkpoint(path)
    assert "StatelessDataModule" not in torch.load(path, weights_only=False)
    t = trainer(max_epochs=1, mode="eager")
    t.fit(BoringModel(), datamodule=CountingDataModule())
    t.save_checkpoint(path)
    assert CountingDataModule.load_from_checkpoint(path).loaded == {"loaders_made": 1}
