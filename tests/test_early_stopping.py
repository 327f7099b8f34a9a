"""EarlyStopping: the epoch a scripted metric stops a run at, and the callback's counters, each
equal to what Lightning 1.9.5 gives for the same run (4 training batches per epoch)."""
import math

import pytest
import torch

from fastloop.callbacks.early_stopping import EarlyStopping
from tests.callback_helpers import ScriptedValLoss, loaders, make_trainer


def fit(callback, values=None, train_values=None, validate=True, **trainer_kwargs):
    trainer = make_trainer([callback], **trainer_kwargs)
    train, val = loaders()
    trainer.fit(ScriptedValLoss(values, train_values), train, val if validate else None)
    return trainer


def outcome(trainer, cb):
    """(completed epochs, global step, stopped_epoch, wait_count, best_score)"""
    return trainer.current_epoch, trainer.global_step, cb.stopped_epoch, cb.wait_count, float(cb.best_score)


def test_stops_after_patience_checks_without_improvement():
    cb = EarlyStopping(monitor="val_loss", patience=2)
    trainer = fit(cb, [1.0, 0.9, 0.95, 0.92, 0.5, 0.4, 0.3, 0.2], max_epochs=8)
    # Best 0.9 at epoch 1; epochs 2 and 3 do not beat it: the second miss (epoch 3) stops the run.
    assert outcome(trainer, cb) == (4, 16, 3, 2, float(torch.tensor(0.9)))
    assert trainer.should_stop
    assert cb.state_dict() == {"wait_count": 2, "stopped_epoch": 3, "best_score": torch.tensor(0.9), "patience": 2}


def test_min_delta_is_the_least_improvement_that_counts():
    cb = EarlyStopping(monitor="val_loss", patience=2, min_delta=0.06)
    trainer = fit(cb, [1.0, 0.9, 0.85, 0.84, 0.5, 0.4, 0.3, 0.2], max_epochs=8)
    # 0.85 and 0.84 improve on 0.9 by less than 0.06.
    assert outcome(trainer, cb) == (4, 16, 3, 2, float(torch.tensor(0.9)))


def test_max_mode():
    cb = EarlyStopping(monitor="val_acc", mode="max", patience=1)
    trainer = fit(cb, [1.0, 0.9, 0.95, 0.92, 0.5], max_epochs=5)
    assert outcome(trainer, cb) == (3, 12, 2, 1, float(torch.tensor(-0.9)))


def test_stopping_threshold():
    cb = EarlyStopping(monitor="val_loss", stopping_threshold=0.6)
    trainer = fit(cb, [1.0, 0.9, 0.5, 0.3, 0.2], max_epochs=5)
    assert outcome(trainer, cb) == (3, 12, 2, 0, float(torch.tensor(0.9)))


def test_divergence_threshold():
    cb = EarlyStopping(monitor="val_loss", divergence_threshold=3.0)
    trainer = fit(cb, [1.0, 0.9, 5.0, 0.3, 0.2], max_epochs=5)
    assert outcome(trainer, cb) == (3, 12, 2, 0, float(torch.tensor(0.9)))


def test_non_finite_metric_stops_at_once():
    cb = EarlyStopping(monitor="val_loss")
    trainer = fit(cb, [1.0, math.nan, 0.5, 0.3], max_epochs=4)
    assert outcome(trainer, cb) == (2, 8, 1, 0, 1.0)


def test_non_finite_metric_counts_as_no_improvement_without_check_finite():
    cb = EarlyStopping(monitor="val_loss", check_finite=False, patience=2)
    trainer = fit(cb, [1.0, math.nan, 0.5, 0.3], max_epochs=4)
    assert outcome(trainer, cb) == (4, 16, 0, 0, float(torch.tensor(0.3)))
    assert not trainer.should_stop


def test_patience_counts_checks_with_several_validations_per_epoch():
    cb = EarlyStopping(monitor="val_loss", patience=3)
    trainer = fit(cb, [1.0, 1.1, 1.2, 0.5, 0.4], max_epochs=5, val_check_interval=0.5)
    # Checks: 1.0 (best), 1.0, 1.1, 1.1 -> the third miss is in epoch 1.
    assert outcome(trainer, cb) == (2, 8, 1, 3, 1.0)


def test_validation_every_second_epoch_checks_after_it():
    cb = EarlyStopping(monitor="val_loss", patience=2)
    trainer = fit(cb, [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7], max_epochs=8, check_val_every_n_epoch=2)
    # Checks after epochs 1, 3, 5: 1.1 (best), 1.3, 1.5.
    assert outcome(trainer, cb) == (6, 24, 5, 2, float(torch.tensor(1.1)))


@pytest.mark.parametrize("validate", [False, True])
def test_epoch_level_training_metric(validate):
    cb = EarlyStopping(monitor="train_metric", patience=1)
    trainer = fit(cb, [1.0] * 6, train_values=[1.0, 0.5, 0.7, 0.2, 0.1, 0.05], validate=validate, max_epochs=6)
    assert outcome(trainer, cb) == (3, 12, 2, 1, 0.5)


def test_min_epochs_keep_the_run_going():
    cb = EarlyStopping(monitor="val_loss", patience=1)
    trainer = fit(cb, [1.0, 1.1, 1.2, 1.3, 1.4, 1.5], max_epochs=6, min_epochs=4)
    assert outcome(trainer, cb) == (4, 16, 3, 3, 1.0)


def test_missing_metric_is_an_error_when_strict():
    cb = EarlyStopping(monitor="nope")
    with pytest.raises(RuntimeError, match="metric `nope` which is not available.*`train_loss`, `val_loss`, `val_acc`"):
        fit(cb, [1.0] * 3, max_epochs=3)


def test_missing_metric_is_skipped_when_not_strict():
    cb = EarlyStopping(monitor="nope", strict=False)
    trainer = fit(cb, [1.0] * 3, max_epochs=3)
    assert outcome(trainer, cb) == (3, 12, 0, 0, math.inf)


def test_fast_dev_run_never_stops():
    cb = EarlyStopping(monitor="val_loss", stopping_threshold=10.0)
    trainer = fit(cb, [1.0], fast_dev_run=True)
    assert not trainer.should_stop and cb.stopped_epoch == 0


def test_validate_does_not_check():
    cb = EarlyStopping(monitor="val_loss", stopping_threshold=10.0)
    trainer = make_trainer([cb])
    trainer.validate(ScriptedValLoss([1.0]), loaders()[1])
    assert cb.wait_count == 0 and cb.stopped_epoch == 0 and float(cb.best_score) == math.inf


def test_state_round_trip_and_resume_stops_where_an_uninterrupted_run_does(tmp_path):
    values = [1.0, 0.9, 0.95, 0.96, 0.97, 0.5]
    full = EarlyStopping(monitor="val_loss", patience=3)
    full_trainer = fit(full, values, max_epochs=6)

    first = EarlyStopping(monitor="val_loss", patience=3)
    first_trainer = fit(first, values, max_epochs=3)
    first_trainer.save_checkpoint(tmp_path / "mid.ckpt")
    assert first.state_dict() == {"wait_count": 1, "stopped_epoch": 0, "best_score": torch.tensor(0.9), "patience": 3}
    assert torch.load(tmp_path / "mid.ckpt", weights_only=True)["callbacks"][first.state_key] == first.state_dict()

    second = EarlyStopping(monitor="val_loss", patience=3)
    trainer = make_trainer([second], max_epochs=6)
    trainer.fit(ScriptedValLoss(values), *loaders(), ckpt_path=str(tmp_path / "mid.ckpt"))
    assert outcome(trainer, second) == outcome(full_trainer, full) == (5, 20, 4, 3, float(torch.tensor(0.9)))


def test_state_key_matches_lightning():
    assert EarlyStopping(monitor="val_loss").state_key == "EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}"
    assert EarlyStopping(monitor="acc", mode="max").state_key == "EarlyStopping{'monitor': 'acc', 'mode': 'max'}"


def test_reasons_are_logged_when_verbose(caplog):
    cb = EarlyStopping(monitor="val_loss", patience=1, verbose=True)
    with caplog.at_level("INFO", logger="fastloop.callbacks.early_stopping"):
        fit(cb, [1.0, 0.75, 2.0], max_epochs=3)
    assert [r.getMessage() for r in caplog.records if r.name == "fastloop.callbacks.early_stopping"] == [
        "Metric val_loss improved. New best score: 1.000",
        "Metric val_loss improved by 0.250 >= min_delta = 0.0. New best score: 0.750",
        "Monitored metric val_loss did not improve in the last 1 records. Best score: 0.750. "
        "Signaling Trainer to stop.",
    ]


def test_bad_mode():
    with pytest.raises(ValueError, match="mode='avg'"):
        EarlyStopping(monitor="val_loss", mode="avg")
