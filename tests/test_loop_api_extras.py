"""The rest of Lightning 1.9's Loop API: ``Loop.replace``, exact ``load_state_dict`` round trips
(with resume unchanged), deep copies of loops and trainers, and loops that take the Trainer's
limits when built without their own."""
import copy
import types
from typing import Any, List

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from fastloop import Callback, Trainer
from fastloop.config import Limits
from fastloop.loops import (
    FitLoop, Loop, ManualOptimization, OptimizerLoop, TrainingBatchLoop, TrainingEpochLoop, YieldLoop,
)
from fastloop.testing import BoringModel, random_dataset, random_loader


def make_trainer(**kwargs: Any) -> Trainer:
    quiet = dict(enable_progress_bar=False, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                 enable_model_summary=False)
    quiet.update(kwargs)
    return Trainer(**quiet)


def params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Recursive equality: dicts key by key, sequences item by item, tensors with torch.equal."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path}: tensors differ"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


# --------------------------------------------------------------------------- replace
class CountingEpochLoop(TrainingEpochLoop):
    """Same ``__init__`` signature as ``TrainingEpochLoop``: ``replace`` can build it."""

    def __init__(self, min_steps=None, max_steps=None):
        super().__init__(min_steps, max_steps)
        self.advances = 0

    def advance(self, fetcher):
        self.advances += 1
        super().advance(fetcher)


class OtherSignatureLoop(TrainingEpochLoop):
    def __init__(self, max_steps=None):
        super().__init__(max_steps=max_steps)


def test_replace_with_a_class_keeps_arguments_children_and_trainer():
    trainer = make_trainer(max_epochs=1)
    old = TrainingEpochLoop(min_steps=123, max_steps=321)
    trainer.fit_loop.connect(epoch_loop=old)
    new = trainer.fit_loop.replace(epoch_loop=CountingEpochLoop)
    assert type(new) is CountingEpochLoop and trainer.fit_loop.epoch_loop is new
    assert (new.min_steps, new.max_steps) == (123, 321)
    assert new.batch_loop is old.batch_loop and new.val_loop is old.val_loop
    assert new.trainer is trainer and new.batch_loop.optimizer_loop.trainer is trainer


def test_replace_keeps_unset_limits_unset_and_the_new_loop_trains():
    trainer = make_trainer(max_epochs=2, max_steps=6)
    trainer.fit_loop = FitLoop()
    new = trainer.fit_loop.replace(epoch_loop=CountingEpochLoop)
    assert (new._min_steps, new._max_steps) == (None, None)  # still "the trainer's"
    assert new.max_steps == 6
    trainer.fit(BoringModel(), random_loader(n=64, batch_size=16))
    # The epoch cut short by max_steps counts as completed, as in Lightning.
    assert new.advances == 6 and trainer.global_step == 6 and trainer.current_epoch == 2


def test_replace_several_names_mixing_classes_and_instances():
    trainer = make_trainer(max_epochs=1)
    batch_loop = trainer.fit_loop.epoch_loop.batch_loop
    old_manual = batch_loop.manual_loop
    yield_loop = YieldLoop()
    new = batch_loop.replace(optimizer_loop=yield_loop, manual_loop=ManualOptimization)
    assert new[0] is yield_loop and batch_loop.optimizer_loop is yield_loop
    assert type(new[1]) is ManualOptimization and new[1] is not old_manual and batch_loop.manual_loop is new[1]
    assert yield_loop.trainer is trainer and new[1].trainer is trainer


def test_replace_on_a_detached_loop_leaves_the_new_loop_detached():
    fit_loop = FitLoop()
    new = fit_loop.replace(epoch_loop=CountingEpochLoop)
    assert fit_loop.epoch_loop is new and not new.is_attached


def test_replace_errors_name_the_offending_thing():
    fit_loop = make_trainer().fit_loop
    with pytest.raises(ValueError, match="unknown child loop `epoch`; its child loops are: epoch_loop"):
        fit_loop.replace(epoch=CountingEpochLoop)
    with pytest.raises(TypeError, match="`epoch_loop` must be a Loop subclass or a Loop instance, got int"):
        fit_loop.replace(epoch_loop=3)
    with pytest.raises(TypeError, match="`epoch_loop` must be a Loop subclass or a Loop instance, got Linear"):
        fit_loop.replace(epoch_loop=nn.Linear)
    with pytest.raises(TypeError, match=r"`FitLoop.replace\(OtherSignatureLoop\)` can only be used if the "
                                        r"`__init__` signatures match but `TrainingEpochLoop` does not"):
        fit_loop.replace(epoch_loop=OtherSignatureLoop)
    assert type(fit_loop.epoch_loop) is TrainingEpochLoop  # nothing was replaced


def test_replace_names_a_constructor_argument_the_old_loop_does_not_store():
    class NeedsWidth(OptimizerLoop):
        def __init__(self, width=2):
            super().__init__()

    class AlsoNeedsWidth(NeedsWidth):
        pass

    batch_loop = TrainingBatchLoop()
    batch_loop.connect(optimizer_loop=NeedsWidth())
    with pytest.raises(TypeError, match="it has no attribute `width` for the `__init__` argument of that name"):
        batch_loop.replace(optimizer_loop=AlsoNeedsWidth)


# ------------------------------------------------------------- state round trips
class DropoutModel(BoringModel):
    """Dropout, Adam and a per-step schedule: a resume must restore all of their state."""

    def __init__(self):
        super().__init__(optimizer="adam", lr=0.01)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.net(self.drop(x))

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class SaveOnce(Callback):
    """Saves one checkpoint from hook ``hook`` when ``when(trainer)`` first holds."""

    def __init__(self, path, hook, when):
        self.path, self.hook, self.when, self.saved = path, hook, when, False

    def _maybe_save(self, hook, trainer):
        if hook == self.hook and not self.saved and not trainer.sanity_checking and self.when(trainer):
            trainer.save_checkpoint(self.path)
            self.saved = True

    def on_train_batch_end(self, trainer, pl_module, *args):
        self._maybe_save("on_train_batch_end", trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        self._maybe_save("on_train_epoch_end", trainer)

    def on_validation_batch_end(self, trainer, pl_module, *args):
        self._maybe_save("on_validation_batch_end", trainer)


# 3 epochs of 4 batches, validation every 2 batches (2 val batches each).
CHECKPOINTS = {
    "mid_epoch": ("on_train_batch_end", lambda t: t.global_step == 6,
                  {"ready": 2, "started": 2, "processed": 2, "completed": 1}),
    "last_batch": ("on_train_batch_end", lambda t: t.global_step == 8,
                   {"ready": 4, "started": 4, "processed": 4, "completed": 3}),
    "epoch_end": ("on_train_epoch_end", lambda t: t.current_epoch == 1,
                  {"ready": 4, "started": 4, "processed": 4, "completed": 4}),
    "in_validation": ("on_validation_batch_end", lambda t: t.global_step == 6,
                      {"ready": 2, "started": 2, "processed": 2, "completed": 2}),
}


def shuffled_loader():
    return DataLoader(random_dataset(n=64), batch_size=16, shuffle=True)


def fit_3_epochs(callbacks=(), ckpt_path=None):
    torch.manual_seed(1)
    model = DropoutModel()
    trainer = make_trainer(max_epochs=3, val_check_interval=2, callbacks=list(callbacks))
    trainer.fit(model, shuffled_loader(), random_loader(n=32, batch_size=16), ckpt_path=ckpt_path)
    return trainer, model


@pytest.mark.parametrize("point", sorted(CHECKPOINTS))
def test_load_state_dict_then_state_dict_gives_back_the_saved_state(tmp_path, point):
    hook, when, batch_current = CHECKPOINTS[point]
    path = tmp_path / "run.ckpt"
    fit_3_epochs([SaveOnce(path, hook, when)])
    saved = torch.load(path, weights_only=False)["loops"]
    # The checkpoints hold half-finished work, which loading must not normalise away.
    assert saved["fit_loop"]["epoch_loop.batch_progress"]["current"] == batch_current
    fresh = make_trainer(max_epochs=3)
    for key, state in saved.items():
        loop = getattr(fresh, key)
        loop.load_state_dict(state)
        assert_same(loop.state_dict(), state, key)
        loop.load_state_dict(loop.state_dict())  # twice: still the same
        assert_same(loop.state_dict(), state, key)


@pytest.mark.parametrize("point", sorted(CHECKPOINTS))
def test_resume_from_each_point_equals_the_uninterrupted_run(tmp_path, point):
    hook, when, _ = CHECKPOINTS[point]
    full_trainer, full_model = fit_3_epochs()
    path = tmp_path / "run.ckpt"
    fit_3_epochs([SaveOnce(path, hook, when)])
    resumed_trainer, resumed_model = fit_3_epochs(ckpt_path=str(path))
    assert torch.equal(params(resumed_model), params(full_model))
    assert (resumed_trainer.global_step, resumed_trainer.current_epoch) == (12, 3)
    full, resumed = full_trainer.fit_loop.state_dict(), resumed_trainer.fit_loop.state_dict()
    # Counters of the current epoch and of the whole run agree...
    for key in ("epoch_loop.batch_progress", "epoch_loop.batch_loop.optimizer_loop.optim_progress",
                "epoch_loop.state_dict"):
        assert_same(resumed[key], full[key], key)
    assert resumed["epoch_progress"]["current"] == full["epoch_progress"]["current"]
    # ...except that an epoch interrupted mid-way was started twice.
    restarted = 1 if point in ("mid_epoch", "last_batch", "in_validation") else 0
    expected_total = dict(full["epoch_progress"]["total"])
    expected_total["ready"] += restarted
    expected_total["started"] += restarted
    assert resumed["epoch_progress"]["total"] == expected_total


def test_epoch_end_checkpoint_of_a_finished_run_counts_the_last_epoch(tmp_path):
    path = tmp_path / "end.ckpt"
    _, model = fit_3_epochs([SaveOnce(path, "on_train_epoch_end", lambda t: t.current_epoch == 2)])
    saved = torch.load(path, weights_only=False)["loops"]["fit_loop"]["epoch_progress"]["current"]
    assert saved == {"ready": 3, "started": 3, "processed": 3, "completed": 2}
    trainer, resumed = fit_3_epochs(ckpt_path=str(path))  # nothing left to train
    assert trainer.current_epoch == 3 and trainer.global_step == 12
    assert torch.equal(params(resumed), params(model))


# ------------------------------------------------------------------ deep copies
def loop_ids(loop: Loop) -> List[int]:
    ids = [id(loop)]
    for _, child in loop.children():
        ids += loop_ids(child)
    return ids


def test_deepcopy_of_a_fit_loop_before_a_fit():
    trainer = make_trainer(max_epochs=1)
    copied = copy.deepcopy(trainer.fit_loop)
    assert type(copied) is FitLoop and copied.trainer is trainer  # attached to the same trainer
    assert not set(loop_ids(copied)) & set(loop_ids(trainer.fit_loop))
    assert copied.epoch_loop.batch_loop.optimizer_loop.trainer is trainer
    assert_same(copied.state_dict(), trainer.fit_loop.state_dict())


@pytest.mark.parametrize("progress_bar", [False, True])
def test_deepcopy_of_a_fit_loop_after_a_fit_drops_runtime_objects_and_runs_again(progress_bar):
    trainer = make_trainer(max_epochs=1, enable_progress_bar=progress_bar)
    trainer.fit(BoringModel(), random_loader(n=64, batch_size=16), random_loader(n=32, batch_size=16))
    original = trainer.fit_loop
    assert original.epoch_loop.batch_loop.optimizer_loop.train_step is not None
    copied = copy.deepcopy(original)
    assert copied.trainer is trainer and copied._fetcher is None
    optimizer_loop = copied.epoch_loop.batch_loop.optimizer_loop
    assert optimizer_loop.train_step is None and optimizer_loop._optimizers == ()
    assert copied.epoch_loop.val_loop.epoch_loop.eval_step is None
    assert original.epoch_loop.batch_loop.optimizer_loop.train_step is not None  # the original keeps its own
    assert_same(copied.state_dict(), original.state_dict())

    # The copy carries the progress: a second trainer continues from epoch 1.
    other = make_trainer(max_epochs=2)
    other.fit_loop = copied
    other.fit(BoringModel(), random_loader(n=64, batch_size=16))
    assert (other.current_epoch, other.global_step) == (2, 8)
    assert (trainer.current_epoch, trainer.global_step) == (1, 4)  # the original is untouched


def test_deepcopy_of_a_trainer_before_a_fit_attaches_the_copied_loops_to_the_copy():
    trainer = make_trainer(max_epochs=1)
    copied = copy.deepcopy(trainer)
    for key in ("fit_loop", "validate_loop", "test_loop", "predict_loop"):
        loop = getattr(copied, key)
        assert loop is not getattr(trainer, key) and loop.trainer is copied
    assert copied.fit_loop.epoch_loop.batch_loop.optimizer_loop.trainer is copied
    copied.fit(BoringModel(), random_loader(n=64, batch_size=16))
    assert (copied.global_step, trainer.global_step) == (4, 0)


def test_deepcopy_of_a_trainer_after_a_fit():
    trainer = make_trainer(max_epochs=1)
    trainer.fit(BoringModel(), random_loader(n=64, batch_size=16))
    copied = copy.deepcopy(trainer)
    assert copied.fit_loop.trainer is copied and copied.module is not trainer.module
    assert torch.equal(params(copied.module), params(trainer.module))
    assert_same(copied.fit_loop.state_dict(), trainer.fit_loop.state_dict())


def test_pickle_state_of_a_loop_leaves_out_runtime_objects():
    trainer = make_trainer(max_epochs=1)
    trainer.fit(BoringModel(), random_loader(n=64, batch_size=16))
    state = trainer.fit_loop.epoch_loop.batch_loop.optimizer_loop.__getstate__()
    assert state["train_step"] is None and state["step_report"] is None and state["_trainer"] is trainer


# ---------------------------------------------------------------------- limits
def test_a_loop_built_without_limits_takes_the_trainers():
    trainer = make_trainer(max_epochs=2)
    loop = FitLoop()
    trainer.fit_loop = loop
    assert (loop.max_epochs, loop.max_steps, loop.min_epochs, loop.min_steps) == (2, -1, 0, None)
    trainer.fit(BoringModel(), random_loader(n=64, batch_size=16))
    assert (trainer.current_epoch, trainer.global_step) == (2, 8)
    assert (trainer.max_epochs, trainer.max_steps) == (2, -1)


def test_trainer_max_steps_alone_means_no_epoch_limit():
    trainer = make_trainer(max_steps=10)
    trainer.fit_loop = FitLoop()
    assert (trainer.fit_loop.max_epochs, trainer.max_steps) == (-1, 10)
    trainer.fit(BoringModel(), random_loader(n=64, batch_size=16))
    assert (trainer.global_step, trainer.current_epoch) == (10, 3)


def test_limits_given_to_the_loops_win_over_the_trainers():
    trainer = make_trainer(max_epochs=5, max_steps=100)
    loop = FitLoop(max_epochs=3)
    loop.connect(epoch_loop=TrainingEpochLoop(max_steps=6))
    trainer.fit_loop = loop
    assert (trainer.max_epochs, trainer.max_steps) == (3, 6)
    trainer.fit(BoringModel(), random_loader(n=64, batch_size=16))
    assert (trainer.global_step, trainer.current_epoch) == (6, 2)


def test_assigned_limits_win_and_none_restores_the_trainers():
    trainer = make_trainer(max_epochs=1)
    loop = FitLoop()
    trainer.fit_loop = loop
    loop.max_epochs = 3
    assert trainer.max_epochs == 3
    trainer.fit(BoringModel(), random_loader(n=64, batch_size=16))
    assert (trainer.current_epoch, trainer.global_step) == (3, 12)
    loop.max_epochs = None
    loop.max_steps = 2
    assert (trainer.max_epochs, trainer.max_steps) == (1, 2)


def stub_trainer(**limits: Any) -> Any:
    """An object with what the limit properties read: ``config.limits``."""
    return types.SimpleNamespace(config=types.SimpleNamespace(limits=Limits(**limits)))


@pytest.mark.parametrize("limits,expected", [
    ({}, (1000, -1, 0, None)),  # Lightning's default: 1000 epochs when no step limit is given
    ({"max_steps": 7}, (-1, 7, 0, None)),
    ({"max_epochs": 4, "max_steps": 7}, (4, 7, 0, None)),
    ({"min_steps": 5}, (1000, -1, 1, 5)),  # min_steps alone implies min_epochs=1
    ({"min_epochs": 2, "min_steps": 5}, (1000, -1, 2, 5)),
])
def test_fallback_limits_follow_lightning(limits, expected):
    loop = FitLoop()
    loop.trainer = stub_trainer(**limits)
    assert (loop.max_epochs, loop.max_steps, loop.min_epochs, loop.min_steps) == expected


def test_unattached_loops_report_their_own_limits():
    assert (FitLoop().max_epochs, FitLoop().min_epochs) == (None, 0)
    assert (TrainingEpochLoop().max_steps, TrainingEpochLoop().min_steps) == (-1, None)
    assert (FitLoop(min_epochs=2, max_epochs=4).min_epochs, FitLoop(max_epochs=4).max_epochs) == (2, 4)


@pytest.mark.parametrize("build,message", [
    (lambda: FitLoop(max_epochs=-2), "max_epochs must be None .* got -2"),
    (lambda: FitLoop(min_epochs=-1), "min_epochs must be None .* got -1"),
    (lambda: TrainingEpochLoop(max_steps=-5), "max_steps must be None .* got -5"),
    (lambda: TrainingEpochLoop(min_steps=1.5), "min_steps must be None .* got 1.5"),
    (lambda: setattr(FitLoop(), "max_steps", "10"), "max_steps must be None .* got '10'"),
])
def test_bad_limits_are_rejected(build, message):
    with pytest.raises(ValueError, match=message):
        build()
