"""ModelCheckpoint: file names, triggers, top-k bookkeeping and state, each expected value
being what Lightning 1.9.5 produces for the same run (4 training batches per epoch, a
validation loss scripted per epoch)."""
import os

import pytest
import torch

from fastloop.callbacks.model_checkpoint import ModelCheckpoint
from tests.callback_helpers import RecordingLogger, ScriptedValLoss, loaders, make_trainer

VALUES = [0.5, 0.3, 0.4, 0.2, 0.6]  # val_loss by epoch


def fit(callback, values=VALUES, logger=None, ckpt_path=None, **trainer_kwargs):
    trainer = make_trainer([callback], logger=logger, **trainer_kwargs)
    trainer.fit(ScriptedValLoss(values), *loaders(), ckpt_path=ckpt_path)
    return trainer


def listing(directory):
    return sorted(f for f in os.listdir(directory) if not f.startswith("."))


def saved(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt["epoch"], ckpt["global_step"]


def test_default_keeps_the_last_epoch_checkpoint(tmp_path):
    cb = ModelCheckpoint(dirpath=tmp_path)
    trainer = fit(cb, max_epochs=3)
    assert listing(tmp_path) == ["epoch=2-step=12.ckpt"]
    assert cb.best_model_path == str(tmp_path / "epoch=2-step=12.ckpt")
    assert cb.best_model_score is None and cb.current_score is None and cb.best_k_models == {}
    assert saved(cb.best_model_path) == (2, 12) == (trainer.current_epoch - 1, trainer.global_step)


def test_top_k_min_keeps_the_k_lowest_and_deletes_the_displaced(tmp_path):
    cb = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=2, filename="{epoch:02d}-{val_loss:.2f}")
    fit(cb, max_epochs=5)
    # The two lowest of VALUES, by epoch.
    best_two = sorted(range(5), key=lambda e: VALUES[e])[:2]
    expected = sorted(f"epoch={e:02d}-val_loss={VALUES[e]:.2f}.ckpt" for e in best_two)
    assert expected == ["epoch=01-val_loss=0.30.ckpt", "epoch=03-val_loss=0.20.ckpt"]
    assert listing(tmp_path) == expected
    assert cb.best_model_path == str(tmp_path / "epoch=03-val_loss=0.20.ckpt")
    assert cb.best_model_score == torch.tensor(min(VALUES))
    assert cb.kth_best_model_path == str(tmp_path / "epoch=01-val_loss=0.30.ckpt")
    assert cb.kth_value == torch.tensor(0.3)
    assert cb.current_score == torch.tensor(0.2)  # the last score that was saved
    assert {os.path.basename(k): float(v) for k, v in cb.best_k_models.items()} == {
        "epoch=01-val_loss=0.30.ckpt": float(torch.tensor(0.3)),
        "epoch=03-val_loss=0.20.ckpt": float(torch.tensor(0.2)),
    }
    assert saved(cb.best_model_path) == (3, 16)


def test_top_k_max_mode(tmp_path):
    cb = ModelCheckpoint(dirpath=tmp_path, monitor="val_acc", mode="max", save_top_k=2)
    fit(cb, max_epochs=5)
    assert listing(tmp_path) == ["epoch=1-step=8.ckpt", "epoch=3-step=16.ckpt"]
    assert cb.best_model_path == str(tmp_path / "epoch=3-step=16.ckpt")
    assert cb.best_model_score == torch.tensor(-0.2)
    assert cb.kth_best_model_path == str(tmp_path / "epoch=1-step=8.ckpt")


def test_displaced_file_is_removed_only_after_the_new_one_is_written(tmp_path):
    cb = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=1)
    trainer = make_trainer([cb], max_epochs=4)
    present_during_save = []
    original = trainer.save_checkpoint

    def recording_save(filepath, weights_only=False):
        present_during_save.append((os.path.basename(filepath), listing(tmp_path)))
        original(filepath, weights_only)

    trainer.save_checkpoint = recording_save
    trainer.fit(ScriptedValLoss(VALUES), *loaders())
    # Epochs 0, 1 and 3 improve (0.5, 0.3, 0.2); each save happens while the old best still exists.
    assert present_during_save == [
        ("epoch=0-step=4.ckpt", []),
        ("epoch=1-step=8.ckpt", ["epoch=0-step=4.ckpt"]),
        ("epoch=3-step=16.ckpt", ["epoch=1-step=8.ckpt"]),
    ]
    assert listing(tmp_path) == ["epoch=3-step=16.ckpt"]


def test_every_n_train_steps_with_save_last(tmp_path):
    cb = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, save_last=True)
    trainer = fit(cb, max_epochs=2)
    assert listing(tmp_path) == ["epoch=0-step=3.ckpt", "epoch=1-step=6.ckpt", "last.ckpt"]
    assert cb.best_model_path == str(tmp_path / "epoch=1-step=6.ckpt")
    assert cb.last_model_path == str(tmp_path / "last.ckpt")
    # last.ckpt is rewritten at every save point, the end of the last epoch included.
    assert saved(cb.last_model_path) == (1, trainer.global_step) == (1, 8)
    assert saved(tmp_path / "epoch=0-step=3.ckpt") == (0, 3)


def test_a_taken_name_gets_a_version_suffix(tmp_path):
    cb = ModelCheckpoint(dirpath=tmp_path, filename="const", save_top_k=-1)
    fit(cb, max_epochs=3)
    assert listing(tmp_path) == ["const-v1.ckpt", "const-v2.ckpt", "const.ckpt"]
    assert [saved(tmp_path / f) for f in ("const.ckpt", "const-v1.ckpt", "const-v2.ckpt")] == [(0, 4), (1, 8), (2, 12)]
    assert cb.best_model_path == str(tmp_path / "const-v2.ckpt")


def test_several_validations_per_epoch_save_after_each(tmp_path):
    cb = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=-1)
    fit(cb, max_epochs=2, val_check_interval=0.5)
    assert listing(tmp_path) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=1-step=6.ckpt",
                                 "epoch=1-step=8.ckpt"]
    assert cb.best_model_path == str(tmp_path / "epoch=1-step=6.ckpt")  # first of the two 0.3 scores
    assert cb.kth_best_model_path == str(tmp_path / "epoch=0-step=2.ckpt")


def test_every_n_epochs_and_save_last(tmp_path):
    cb = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=2, save_top_k=-1, save_last=True)
    fit(cb, max_epochs=5)
    assert listing(tmp_path) == ["epoch=1-step=8.ckpt", "epoch=3-step=16.ckpt", "last.ckpt"]
    assert saved(tmp_path / "last.ckpt") == (4, 20)


def test_validation_every_second_epoch_saves_after_validation(tmp_path):
    cb = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss")
    fit(cb, max_epochs=4, check_val_every_n_epoch=2)
    assert listing(tmp_path) == ["epoch=3-step=16.ckpt"]
    assert cb.best_model_score == torch.tensor(0.2)


def test_nan_score_ranks_worst(tmp_path):
    cb = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=2)
    fit(cb, values=[0.5, float("nan"), 0.4, 0.7], max_epochs=4)
    # The NaN of epoch 1 is kept as +inf while there is room, then displaced by 0.4.
    assert listing(tmp_path) == ["epoch=0-step=4.ckpt", "epoch=2-step=12.ckpt"]
    assert cb.best_model_score == torch.tensor(0.4)
    assert cb.kth_value == torch.tensor(0.5)


def test_nan_score_is_stored_as_inf(tmp_path):
    cb = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=2)
    fit(cb, values=[0.5, float("nan")], max_epochs=2)
    assert {os.path.basename(k): float(v) for k, v in cb.best_k_models.items()} == {
        "epoch=0-step=4.ckpt": 0.5, "epoch=1-step=8.ckpt": float("inf")}
    assert cb.kth_best_model_path == str(tmp_path / "epoch=1-step=8.ckpt")


def test_missing_monitor_names_it_and_the_available_metrics(tmp_path):
    cb = ModelCheckpoint(dirpath=tmp_path, monitor="nope")
    with pytest.raises(ValueError, match=r"monitor='nope'.*\['train_loss', 'val_loss', 'val_acc', 'epoch', 'step'\]"):
        fit(cb, max_epochs=2)


def test_missing_monitor_without_validation_only_warns(tmp_path):
    cb = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss")
    trainer = make_trainer([cb], max_epochs=1)
    with pytest.warns(UserWarning, match="could not find the monitored key"):
        trainer.fit(ScriptedValLoss(VALUES), loaders()[0])
    assert listing(tmp_path) == []


def test_without_auto_inserted_metric_names(tmp_path):
    cb = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", filename="e{epoch}-l{val_loss:.3f}",
                         auto_insert_metric_name=False)
    fit(cb, max_epochs=2)
    assert listing(tmp_path) == ["e1-l0.300.ckpt"]


def test_save_top_k_zero_writes_only_last(tmp_path):
    cb = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=0, save_last=True)
    fit(cb, max_epochs=2)
    assert listing(tmp_path) == ["last.ckpt"]
    assert cb.best_model_path == "" and saved(cb.last_model_path) == (1, 8)


def test_weights_only_checkpoints(tmp_path):
    cb = ModelCheckpoint(dirpath=tmp_path, save_weights_only=True)
    fit(cb, max_epochs=1)
    ckpt = torch.load(cb.best_model_path, weights_only=True)
    assert "optimizer_states" not in ckpt and "state_dict" in ckpt


def test_no_checkpoint_without_steps(tmp_path):
    cb = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer([cb], max_epochs=1, limit_train_batches=0).fit(ScriptedValLoss(VALUES), *loaders())
    assert listing(tmp_path) == []


def test_no_checkpoint_outside_fit(tmp_path):
    # Saves after validation on even epoch counts: none in a 1-epoch fit, and validate() would be due.
    cb = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=2, save_on_train_epoch_end=False)
    trainer = make_trainer([cb], max_epochs=1)
    model = ScriptedValLoss(VALUES)
    trainer.fit(model, *loaders())
    assert (trainer.current_epoch, trainer.global_step) == (1, 4)
    trainer.validate(model, loaders()[1])
    assert listing(tmp_path) == []
    # Control: the validation after the second epoch of a fit does save.
    fit(ModelCheckpoint(dirpath=tmp_path, every_n_epochs=2, save_on_train_epoch_end=False), max_epochs=2)
    assert listing(tmp_path) == ["epoch=1-step=8.ckpt"]


def test_format_checkpoint_name():
    def name(metrics, **kwargs):
        filename = kwargs.pop("filename", None)
        ver = kwargs.pop("ver", None)
        return ModelCheckpoint(**kwargs).format_checkpoint_name(metrics, filename=filename, ver=ver)

    assert name({"epoch": 0}, filename="{epoch}") == "epoch=0.ckpt"
    assert name({"epoch": 5}, filename="{epoch:03d}") == "epoch=005.ckpt"
    assert name({"epoch": 2, "val_loss": 0.123456}, filename="{epoch}-{val_loss:.2f}") == "epoch=2-val_loss=0.12.ckpt"
    assert name({"epoch": torch.tensor(3), "val_loss": torch.tensor(0.1234)},
                filename="{epoch:02d}-{val_loss:.2f}") == "epoch=03-val_loss=0.12.ckpt"
    assert name({"epoch": 2, "val_loss": 0.123456}, filename="epoch={epoch}-validation_loss={val_loss:.2f}",
                auto_insert_metric_name=False) == "epoch=2-validation_loss=0.12.ckpt"
    assert name({}, filename="{missing:d}") == "missing=0.ckpt"
    assert name({"epoch": 1, "step": 7}) == "epoch=1-step=7.ckpt"
    assert name({"epoch": 1, "step": 7}, ver=2) == "epoch=1-step=7-v2.ckpt"
    assert name({}, filename="last") == "last.ckpt"
    assert ModelCheckpoint(dirpath="/some/dir").format_checkpoint_name({"step": 3}, "{step}") == "/some/dir/step=3.ckpt"


def test_dirpath_resolution(tmp_path):
    no_logger = ModelCheckpoint()
    fit(no_logger, max_epochs=1, default_root_dir=str(tmp_path / "root"))
    assert no_logger.dirpath == str(tmp_path / "root" / "checkpoints")
    assert listing(no_logger.dirpath) == ["epoch=0-step=4.ckpt"]

    numbered = ModelCheckpoint()
    logger = RecordingLogger(save_dir=str(tmp_path / "logs"), name="exp", version=3)
    fit(numbered, logger=logger, max_epochs=1)
    assert numbered.dirpath == str(tmp_path / "logs" / "exp" / "version_3" / "checkpoints")
    assert logger.saved_by == [numbered]  # told once per saved file

    named = ModelCheckpoint()
    fit(named, logger=RecordingLogger(save_dir=None, name="exp", version="v_a"), max_epochs=1,
        default_root_dir=str(tmp_path / "root2"))
    assert named.dirpath == str(tmp_path / "root2" / "exp" / "v_a" / "checkpoints")


def test_state_key_matches_lightning():
    assert ModelCheckpoint().state_key == (
        "ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 0, 'every_n_epochs': 1, "
        "'train_time_interval': None}")
    assert ModelCheckpoint(monitor="val_loss", mode="max", every_n_train_steps=5).state_key == (
        "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'max', 'every_n_train_steps': 5, 'every_n_epochs': 0, "
        "'train_time_interval': None}")


def test_state_dict_round_trip_and_in_checkpoint(tmp_path):
    cb = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=2, save_last=True)
    fit(cb, max_epochs=4)
    state = cb.state_dict()
    assert list(state) == ["monitor", "best_model_score", "best_model_path", "current_score", "dirpath",
                           "best_k_models", "kth_best_model_path", "kth_value", "last_model_path"]
    # The file written last holds the state as it was after that save.
    in_file = torch.load(cb.last_model_path, weights_only=True)["callbacks"][cb.state_key]
    assert in_file["best_model_path"] == cb.best_model_path
    assert in_file["best_k_models"].keys() == cb.best_k_models.keys()

    same_dir = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=2, save_last=True)
    same_dir.load_state_dict(state)
    for key in ("best_model_score", "best_model_path", "best_k_models", "kth_best_model_path", "kth_value",
                "last_model_path"):
        assert getattr(same_dir, key) == state[key], key

    other_dir = ModelCheckpoint(dirpath=tmp_path / "elsewhere", monitor="val_loss")
    with pytest.warns(UserWarning, match="dirpath has changed"):
        other_dir.load_state_dict(state)
    assert other_dir.best_model_path == cb.best_model_path
    assert other_dir.best_k_models == {} and other_dir.best_model_score is None and other_dir.last_model_path == ""


def test_resumed_run_keeps_the_same_top_k_as_an_uninterrupted_one(tmp_path):
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    full = ModelCheckpoint(dirpath=full_dir, monitor="val_loss", save_top_k=2, save_last=True)
    fit(full, max_epochs=5)

    first = ModelCheckpoint(dirpath=resumed_dir, monitor="val_loss", save_top_k=2, save_last=True)
    fit(first, max_epochs=2)
    second = ModelCheckpoint(dirpath=resumed_dir, monitor="val_loss", save_top_k=2, save_last=True)
    with pytest.warns(UserWarning, match="exists and is not empty"):
        fit(second, max_epochs=5, ckpt_path=str(resumed_dir / "last.ckpt"))
    assert listing(resumed_dir) == listing(full_dir) == ["epoch=1-step=8.ckpt", "epoch=3-step=16.ckpt", "last.ckpt"]
    assert os.path.basename(second.best_model_path) == os.path.basename(full.best_model_path)
    assert second.best_model_score == full.best_model_score


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(train_time_interval=5), NotImplementedError, "train_time_interval=5"),
    (dict(mode="avg"), ValueError, "mode='avg'"),
    (dict(save_top_k=-2), ValueError, "save_top_k=-2"),
    (dict(save_top_k=3), ValueError, r"save_top_k=3, monitor=None"),
    (dict(every_n_train_steps=-1), ValueError, "every_n_train_steps=-1"),
    (dict(every_n_epochs=-1), ValueError, "every_n_epochs=-1"),
    (dict(every_n_epochs=1, every_n_train_steps=2), ValueError, "mutually exclusive"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ModelCheckpoint(**kwargs)


def test_fast_dev_run_saves_nothing(tmp_path):
    cb = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = make_trainer([cb], fast_dev_run=True)
    trainer.fit(ScriptedValLoss(VALUES), *loaders())
    assert trainer.global_step == 1
    assert listing(tmp_path) == []


def test_default_trainer_checkpoints_under_the_logger_version(tmp_path):
    from fastloop import Trainer

    trainer = Trainer(max_epochs=2, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(ScriptedValLoss(VALUES), *loaders())
    cb = trainer.checkpoint_callback
    assert cb.dirpath == str(tmp_path / "lightning_logs" / "version_0" / "checkpoints")
    assert listing(cb.dirpath) == ["epoch=1-step=8.ckpt"]
