"""Lightning 1.x Trainer arguments: fast_dev_run, overfit_batches, unsupported arguments, devices,
precision, determinism, datamodule entry points, detect_anomaly, dataloader reloading,
estimated_stepping_batches and the default logger's paths.

Every expected number, call count and path below was produced by the same script run under
Lightning 1.9.5; where fastloop differs on purpose the test says so.
"""
import math
import os
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastloop import Callback, DataModule, Module, Trainer
from fastloop.callbacks import ModelCheckpoint
from fastloop.data import TensorLoader
from fastloop.testing import BoringModel, random_loader
from fastloop.trainer_args import without_shuffling

QUIET = dict(enable_progress_bar=False, enable_model_summary=False)


def loader(n_batches=8, batch_size=2, seed=0, shuffle=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * batch_size, 4, generator=g)
    y = torch.randn(n_batches * batch_size, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


class Counting(Module):
    """Counts steps per stage (sanity-check steps apart) and remembers each training batch."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.calls = {"train": 0, "val": 0, "sanity": 0, "test": 0}
        self.train_batches = []

    def loss(self, batch):
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def training_step(self, batch, batch_idx):
        self.calls["train"] += 1
        self.train_batches.append(batch[0])
        loss = self.loss(batch)
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.calls["sanity" if self.trainer.sanity_checking else "val"] += 1
        self.log("val_loss", self.loss(batch))

    def test_step(self, batch, batch_idx):
        self.calls["test"] += 1
        self.log("test_loss", self.loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def files_under(root="."):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names)


# --------------------------------------------------------------------------- fast_dev_run
@pytest.mark.parametrize("fast_dev_run, n", [(True, 1), (3, 3)])
def test_fast_dev_run_runs_n_batches_per_stage_and_writes_nothing(fast_dev_run, n):
    model = Counting()
    trainer = Trainer(fast_dev_run=fast_dev_run, **QUIET)
    assert trainer.fast_dev_run == n
    trainer.fit(model, loader(), loader(seed=1))
    assert model.calls == {"train": n, "val": n, "sanity": 0, "test": 0}
    assert (trainer.global_step, trainer.current_epoch) == (n, 1)
    assert sorted(trainer.logged_metrics) == sorted(trainer.callback_metrics) == ["loss", "val_loss"]
    trainer.validate(model, loader(seed=1), verbose=False)
    trainer.test(model, loader(seed=2), verbose=False)
    assert model.calls == {"train": n, "val": 2 * n, "sanity": 0, "test": n}
    assert sorted(trainer.logged_metrics) == ["test_loss"]
    # No lightning_logs, no checkpoint. (Lightning keeps a DummyLogger in trainer.loggers; fastloop none.)
    assert files_under() == []
    assert trainer.loggers == []
    assert trainer.checkpoint_callback.dirpath == os.path.join(os.getcwd(), "checkpoints")


@pytest.mark.parametrize("bad", [-1, 1.5, "x"])
def test_fast_dev_run_rejects_negative_and_non_int(bad):
    with pytest.raises(ValueError, match="fast_dev_run"):
        Trainer(fast_dev_run=bad)


# ------------------------------------------------------------------------ overfit_batches
@pytest.mark.parametrize("overfit", [2, 0.25])
def test_overfit_batches_limits_train_and_val_not_test(overfit):
    model = Counting()
    trainer = Trainer(overfit_batches=overfit, max_epochs=2, logger=False, enable_checkpointing=False, **QUIET)
    trainer.fit(model, loader(), loader(seed=1))
    assert model.calls == {"train": 4, "val": 4, "sanity": 2, "test": 0}
    assert (trainer.global_step, trainer.num_training_batches, trainer.num_val_batches) == (4, 2, [2])
    assert (trainer.overfit_batches, trainer.limit_train_batches, trainer.limit_val_batches) == (overfit,) * 3
    trainer.test(model, loader(seed=2), verbose=False)
    assert model.calls["test"] == 8


def test_overfit_batches_turns_off_train_shuffling():
    model = Counting()
    trainer = Trainer(overfit_batches=2, max_epochs=2, logger=False, enable_checkpointing=False, **QUIET)
    with pytest.warns(UserWarning, match="turning off the train dataloader shuffling"):
        trainer.fit(model, loader(shuffle=True), loader(seed=1))
    first_two = list(loader())[:2]
    for seen, expected in zip(model.train_batches, first_two * 2):
        assert torch.equal(seen, expected[0])


def test_without_shuffling_rebuilds_a_shuffling_dataloader_in_order():
    shuffled = loader(n_batches=4, shuffle=True)
    with pytest.warns(UserWarning, match="turning off the train dataloader shuffling"):
        ordered = without_shuffling(shuffled, "train")
    assert isinstance(shuffled.sampler, torch.utils.data.RandomSampler)  # the user's loader is untouched
    assert [b[0].tolist() for b in ordered] == [b[0].tolist() for b in loader(n_batches=4)]
    plain = loader(n_batches=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert without_shuffling(plain, "val") is plain


def test_without_shuffling_copies_a_shuffling_tensor_loader():
    x = torch.arange(12.0).reshape(12, 1)
    shuffled = TensorLoader(x, batch_size=3, shuffle=True, seed=1)
    with pytest.warns(UserWarning, match="shuffling"):
        ordered = without_shuffling(shuffled, "train")
    assert shuffled.shuffle and not ordered.shuffle
    assert torch.equal(torch.cat(list(ordered)), x)  # one tensor: each batch is a tensor


# -------------------------------------------------------------- unknown and unsupported args
def test_unknown_argument_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="'no_such_flag'"):
        Trainer(no_such_flag=1)


def test_lightning_only_arguments_at_their_defaults_are_accepted():
    Trainer(profiler=None, gpus=0, strategy=None, num_nodes=1, track_grad_norm=-1, logger=False)


@pytest.mark.parametrize("name, value", [
    ("profiler", "simple"), ("gpus", 1), ("num_nodes", 2), ("track_grad_norm", 2),
    ("max_time", "00:00:01:00"), ("auto_lr_find", True),
])
def test_lightning_only_arguments_with_other_values_are_named(name, value):
    with pytest.raises(ValueError, match=rf"Trainer\({name}="):
        Trainer(**{name: value})


@pytest.mark.parametrize("devices", [2, [0, 1], "2", -1])
def test_several_devices_are_an_error(devices):
    with pytest.raises(ValueError, match="devices"):
        Trainer(devices=devices)


@pytest.mark.parametrize("devices", [1, "auto", [0], None])
def test_one_device_is_accepted_on_cpu(devices):
    trainer = Trainer(devices=devices, accelerator="cpu", logger=False)
    assert trainer.device == torch.device("cpu")


@pytest.mark.parametrize("precision, expected", [
    (32, "32"), ("32", "32"), (16, "16-mixed"), ("16-mixed", "16-mixed"), ("bf16", "bf16-mixed"),
    ("bf16-mixed", "bf16-mixed"),
])
def test_precision_spellings(precision, expected):
    # Lightning 1.9 turns precision=16 on a CPU into bf16 (with a warning); fastloop keeps fp16 autocast.
    assert Trainer(precision=precision, logger=False).config.precision == expected


def test_unknown_precision_is_named():
    with pytest.raises(ValueError, match="precision=64"):
        Trainer(precision=64)


@pytest.fixture
def restore_determinism(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.backends.cudnn.benchmark = before[2]


def test_deterministic_true_turns_on_deterministic_algorithms(restore_determinism):
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = True
    Trainer(deterministic=True, logger=False)
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.benchmark is False
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    Trainer(deterministic="warn", logger=False)
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    Trainer(deterministic=False, benchmark=True, logger=False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark is True


def test_deterministic_bad_value_is_named(restore_determinism):
    with pytest.raises(ValueError, match="deterministic"):
        Trainer(deterministic="always")


# ------------------------------------------------------------------------- datamodules
class CountingDataModule(DataModule):
    def __init__(self):
        super().__init__()
        self.requests = []

    def train_dataloader(self):
        self.requests.append("train")
        return loader()

    def val_dataloader(self):
        self.requests.append("val")
        return loader(seed=1)


def test_datamodule_positional_in_fit_and_validate_then_test_without_the_model():
    model, dm = Counting(), CountingDataModule()
    trainer = Trainer(max_epochs=1, logger=False, **QUIET)
    trainer.fit(model, dm)
    assert trainer.datamodule is dm
    assert dm.requests == ["val", "train"]
    assert model.calls == {"train": 8, "val": 8, "sanity": 2, "test": 0}
    results = trainer.validate(model, dm, verbose=False)
    assert dm.requests == ["val", "train", "val"] and list(results[0]) == ["val_loss"]
    results = trainer.test(dataloaders=loader(seed=2), verbose=False)
    assert trainer.lightning_module is model and model.calls["test"] == 8
    assert list(results[0]) == ["test_loss"]


@pytest.mark.parametrize("entry", ["fit", "validate", "test"])
def test_datamodule_both_positional_and_by_keyword_is_an_error(entry):
    # Lightning 1.9 silently takes the positional one; fastloop asks for one of them.
    trainer = Trainer(logger=False, **QUIET)
    with pytest.raises(ValueError, match="datamodule"):
        getattr(trainer, entry)(Counting(), CountingDataModule(), datamodule=CountingDataModule())


class Snapshots(Callback):
    def __init__(self):
        self.weights = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.weights.append(pl_module.layer.weight.detach().clone())


class ScoredByEpoch(Counting):
    def validation_step(self, batch, batch_idx):
        self.log("score", -float(self.current_epoch))  # best (mode="max") at epoch 0


def test_default_ckpt_path_is_best_without_a_model_after_fit():
    trainer = Trainer(logger=False, **QUIET)
    connector = trainer.checkpoint_connector
    assert connector.default_ckpt_path("test", None, model_given=False) is None  # nothing attached yet
    trainer.fit(Counting(), loader(n_batches=1))
    with pytest.warns(UserWarning, match="best model of the previous `fit`"):
        assert connector.default_ckpt_path("test", None, model_given=False) == "best"
    assert connector.default_ckpt_path("test", None, model_given=True) is None
    assert connector.default_ckpt_path("validate", "last", model_given=False) == "last"


def test_test_without_a_model_uses_the_best_checkpoint_as_lightning():
    snapshots = Snapshots()
    checkpoint = ModelCheckpoint(monitor="score", mode="max")
    trainer = Trainer(max_epochs=3, logger=False, callbacks=[checkpoint, snapshots], num_sanity_val_steps=0, **QUIET)
    trainer.fit(ScoredByEpoch(), loader(), loader(seed=1))
    with pytest.warns(UserWarning, match="best model"):
        trainer.test(dataloaders=loader(seed=2), verbose=False)
    weights = trainer.lightning_module.layer.weight
    assert [torch.equal(weights, w) for w in snapshots.weights] == [True, False, False]
    bare = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, **QUIET)
    bare.fit(Counting(), loader(n_batches=1))
    with pytest.raises(ValueError, match="ModelCheckpoint"):
        bare.test(dataloaders=loader(seed=2), verbose=False)


# ------------------------------------------------------------------------ detect_anomaly
class NaNBackward(Counting):
    def training_step(self, batch, batch_idx):
        x, _ = batch
        return (self.layer(x) * 0 - 1).sqrt().sum()  # sqrt of -1: NaN forward and backward


def test_detect_anomaly_raises_on_a_nan_backward_in_eager_mode():
    trainer = Trainer(detect_anomaly=True, max_steps=1, logger=False, enable_checkpointing=False, **QUIET)
    with pytest.raises(RuntimeError, match="returned nan values"):
        trainer.fit(NaNBackward(), loader(n_batches=1))
    quiet = Trainer(max_steps=1, nonfinite="ignore", logger=False, enable_checkpointing=False, **QUIET)
    quiet.fit(NaNBackward(), loader(n_batches=1))  # without it (and with the non-finite check off), the NaN passes
    assert not torch.is_anomaly_enabled()


def test_detect_anomaly_makes_the_compiled_mode_fall_back_to_eager(no_mode_override):
    trainer = Trainer(mode="compiled", detect_anomaly=True, max_steps=1, logger=False, enable_checkpointing=False,
                      **QUIET)
    trainer.fit(Counting(), loader(n_batches=1))
    assert "detect_anomaly=True" in trainer.explain()


# ----------------------------------------------------------- reload_dataloaders_every_n_epochs
class Reloading(Counting):
    def __init__(self):
        super().__init__()
        self.requests = {"train": 0, "val": 0}

    def train_dataloader(self):
        self.requests["train"] += 1
        return loader(n_batches=2)

    def val_dataloader(self):
        self.requests["val"] += 1
        return loader(n_batches=2, seed=1)


@pytest.mark.parametrize("every, sanity_steps, check_val_every, expected", [
    (0, 2, 1, (1, 1)), (0, 0, 2, (1, 1)),
    (1, 2, 1, (4, 4)), (1, 0, 1, (4, 4)), (1, 0, 2, (4, 2)),
    (2, 2, 1, (2, 2)), (2, 0, 1, (2, 2)), (2, 0, 2, (2, 2)),
])
def test_reload_dataloaders_every_n_epochs_requests_as_lightning(every, sanity_steps, check_val_every, expected):
    model = Reloading()
    trainer = Trainer(max_epochs=4, reload_dataloaders_every_n_epochs=every, num_sanity_val_steps=sanity_steps,
                      check_val_every_n_epoch=check_val_every, logger=False, enable_checkpointing=False, **QUIET)
    trainer.fit(model)
    assert (model.requests["train"], model.requests["val"]) == expected
    assert model.calls["train"] == 8


def test_reload_dataloaders_every_n_epochs_must_be_a_non_negative_int():
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs"):
        Trainer(reload_dataloaders_every_n_epochs=-1)


# ---------------------------------------------------------------- estimated_stepping_batches
class _Stop(Exception):
    pass


class Estimating(Counting):
    def configure_optimizers(self):
        self.estimate = self.trainer.estimated_stepping_batches
        raise _Stop  # the estimate is all this test needs


class Endless(torch.utils.data.IterableDataset):
    def __iter__(self):
        for _ in range(6):
            yield torch.randn(4), torch.randn(1)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(max_epochs=3), 21), (dict(max_epochs=3, accumulate_grad_batches=3), 9),
    (dict(max_epochs=3, max_steps=5), 5), (dict(max_epochs=-1, max_steps=7), 7),
    (dict(max_epochs=2, limit_train_batches=3, accumulate_grad_batches=2), 4),
    (dict(max_epochs=2, limit_train_batches=0.5), 6),
    (dict(), 7000),  # neither limit: Lightning's max_epochs=1000
    (dict(max_epochs=-1), math.inf),
])
def test_estimated_stepping_batches_as_lightning(kwargs, expected):
    model = Estimating()
    trainer = Trainer(logger=False, enable_checkpointing=False, limit_val_batches=0, **QUIET, **kwargs)
    with pytest.raises(_Stop):
        trainer.fit(model, loader(n_batches=7))
    assert model.estimate == expected


def test_estimated_stepping_batches_without_len_is_max_steps():
    model = Estimating()
    trainer = Trainer(max_epochs=2, logger=False, enable_checkpointing=False, **QUIET)
    with pytest.raises(_Stop):
        trainer.fit(model, DataLoader(Endless(), batch_size=2))
    assert model.estimate == -1


# ------------------------------------------------------------------ default logger and paths
@pytest.mark.parametrize("root", [None, "root"])
def test_default_logger_paths_as_lightning_with_its_csv_logger(root):
    # Lightning 1.9's default logger is TensorBoard when tensorboard is installed (then
    # trainer.log_dir is the version directory); fastloop's is CSV, for which Lightning's
    # trainer.log_dir is the save_dir, that is default_root_dir.
    kwargs = dict(default_root_dir=root) if root else {}
    base = root or os.getcwd()
    for version in (0, 1):
        trainer = Trainer(max_epochs=1, **QUIET, **kwargs)
        assert (trainer.log_dir, trainer.logger.version) == (base, version)
        trainer.fit(Counting(), loader(n_batches=2))
        assert type(trainer.logger).__name__ == "CSVLogger" and trainer.logger.name == "lightning_logs"
        version_dir = os.path.join(base, "lightning_logs", f"version_{version}")
        assert (trainer.log_dir, trainer.logger.version, trainer.logger.log_dir) == (base, version, version_dir)
        assert trainer.checkpoint_callback.dirpath == os.path.join(version_dir, "checkpoints")
    assert files_under(base) == [
        "lightning_logs/version_0/checkpoints/epoch=0-step=2.ckpt", "lightning_logs/version_0/hparams.yaml",
        "lightning_logs/version_1/checkpoints/epoch=0-step=2.ckpt", "lightning_logs/version_1/hparams.yaml",
    ]


def test_ckpt_path_names_the_file_the_run_restored_from():
    model = BoringModel()
    trainer = Trainer(max_epochs=1, logger=False, **QUIET)
    trainer.fit(model, random_loader(n=8, batch_size=4))
    assert trainer.ckpt_path is None  # started fresh
    last = trainer.checkpoint_callback.best_model_path
    resumed = Trainer(max_epochs=2, logger=False, **QUIET)
    resumed.fit(model, random_loader(n=8, batch_size=4), ckpt_path=last)
    assert resumed.ckpt_path == last and resumed.global_step == 4
