"""Golden hook order for fit/validate/test/predict and for manual optimization.

The expected lists are written out by hand from the pseudocode in the loops' docstrings
(fastloop/loops/*.py), so this test keeps those docstrings honest. Hooks are recorded on entry;
``[x]`` hooks record the callback (``Callback.x``) before the module (``x``).
"""
from typing import Any, List

import pytest
import torch

from fastloop import Callback, Trainer
from fastloop.hooks import CALLBACK_HOOKS
from fastloop.testing import BoringModel, random_loader


class RecordingCallback(Callback):
    def __init__(self, calls: List[str]) -> None:
        self.calls = calls


def _make_callback_recorder(name: str):
    def hook(self, trainer, pl_module, *args, **kwargs):
        self.calls.append(f"Callback.{name}")
    return hook


for _name in CALLBACK_HOOKS:
    setattr(RecordingCallback, _name, _make_callback_recorder(_name))

MODULE_HOOKS = [
    "configure_callbacks", "prepare_data", "setup", "teardown", "configure_optimizers", "train_dataloader",
    "val_dataloader", "test_dataloader", "predict_dataloader", "on_fit_start", "on_fit_end", "on_train_start",
    "on_train_end", "on_train_epoch_start", "on_train_epoch_end", "on_train_batch_start", "on_train_batch_end",
    "on_validation_start", "on_validation_end", "on_validation_epoch_start", "on_validation_epoch_end",
    "on_validation_batch_start", "on_validation_batch_end", "on_test_start", "on_test_end", "on_test_epoch_start",
    "on_test_epoch_end", "on_test_batch_start", "on_test_batch_end", "on_predict_start", "on_predict_end",
    "on_predict_epoch_start", "on_predict_epoch_end", "on_predict_batch_start", "on_predict_batch_end",
    "on_before_zero_grad", "optimizer_zero_grad", "on_before_backward", "backward", "on_after_backward",
    "on_before_optimizer_step", "optimizer_step", "configure_gradient_clipping", "lr_scheduler_step",
    "training_step", "validation_step", "test_step", "predict_step", "on_validation_model_eval",
    "on_validation_model_train", "on_test_model_eval", "on_test_model_train", "on_predict_model_eval",
    "on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer", "training_epoch_end",
    "validation_epoch_end", "test_epoch_end", "on_save_checkpoint", "on_load_checkpoint",
]


class RecordingModel(BoringModel):
    def __init__(self, calls: List[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls = calls

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return [opt], [{"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1), "interval": "step"}]

    def train_dataloader(self):
        return random_loader(n=4, batch_size=2)

    def val_dataloader(self):
        return random_loader(n=2, batch_size=1, seed=1)

    def test_dataloader(self):
        return random_loader(n=2, batch_size=1, seed=2)

    def predict_dataloader(self):
        return random_loader(n=2, batch_size=1, seed=3)


def _make_module_recorder(name: str):
    parent = vars(RecordingModel).get(name) or getattr(BoringModel, name)

    def hook(self, *args, **kwargs):
        self.calls.append(name)
        return parent(self, *args, **kwargs)
    return hook


for _name in MODULE_HOOKS:
    setattr(RecordingModel, _name, _make_module_recorder(_name))


def both(name: str) -> List[str]:
    return [f"Callback.{name}", name]


def transfer() -> List[str]:
    return ["on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer"]


def eval_batches(stage: str, n: int) -> List[str]:
    out: List[str] = []
    for _ in range(n):
        out += transfer() + both(f"on_{stage}_batch_start") + [f"{stage}_step"] + both(f"on_{stage}_batch_end")
    return out


def eval_run(stage: str, n: int) -> List[str]:
    return (
        [f"on_{stage}_model_eval"] + both(f"on_{stage}_start") + both(f"on_{stage}_epoch_start")
        + eval_batches(stage, n) + [f"{stage}_epoch_end"] + both(f"on_{stage}_epoch_end") + both(f"on_{stage}_end")
        + [f"on_{stage}_model_train"]
    )


def train_batch() -> List[str]:
    return (
        transfer() + both("on_train_batch_start")
        + ["optimizer_step", "training_step"] + both("on_before_zero_grad") + ["optimizer_zero_grad"]
        + both("on_before_backward") + ["backward"] + both("on_after_backward")
        + both("on_before_optimizer_step") + ["configure_gradient_clipping"]
        + ["lr_scheduler_step"] + both("on_train_batch_end")
    )


def setup_hooks(stage: str) -> List[str]:
    return ["configure_callbacks", "prepare_data", "Callback.setup", "setup"]


def teardown_hooks() -> List[str]:
    return ["Callback.teardown", "teardown"]


def test_callback_hooks_match_module_signatures():
    # Every callback hook that the module also has takes the same extra arguments.
    import inspect

    from fastloop import Module
    for name in CALLBACK_HOOKS:
        if hasattr(Module, name) and name not in ("setup", "teardown"):
            cb_params = list(inspect.signature(getattr(Callback, name)).parameters)[3:]
            mod_params = list(inspect.signature(getattr(Module, name)).parameters)[1:]
            # Lightning names one argument differently (outputs/results): compare arity.
            assert len(cb_params) == len(mod_params), name


def test_fit_hook_order():
    calls: List[str] = []
    model = RecordingModel(calls)
    trainer = Trainer(max_epochs=1, num_sanity_val_steps=1, callbacks=[RecordingCallback(calls)],
                      enable_progress_bar=False)
    trainer.fit(model)
    expected = (
        setup_hooks("fit") + ["configure_optimizers"] + both("on_fit_start")
        + ["Callback.on_sanity_check_start", "val_dataloader"] + eval_run("validation", 1)
        + ["Callback.on_sanity_check_end"]
        + ["train_dataloader"] + both("on_train_start")
        + both("on_train_epoch_start") + train_batch() + train_batch()
        + eval_run("validation", 2)
        + ["training_epoch_end"]
        # The default ModelCheckpoint runs after the other callbacks' on_train_epoch_end and
        # saves there (validation runs once per epoch), before the module's hook, as in Lightning.
        + ["Callback.on_train_epoch_end"] + both("on_save_checkpoint") + ["on_train_epoch_end"]
        + both("on_train_end") + both("on_fit_end") + teardown_hooks()
    )
    assert calls == expected


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_eval_hook_order(stage):
    calls: List[str] = []
    model = RecordingModel(calls)
    trainer = Trainer(callbacks=[RecordingCallback(calls)], enable_progress_bar=False)
    getattr(trainer, stage)(model)
    hook_stage = "validation" if stage == "validate" else "test"
    loader = "val_dataloader" if stage == "validate" else "test_dataloader"
    expected = setup_hooks(stage) + [loader] + eval_run(hook_stage, 2) + teardown_hooks()
    assert calls == expected


def test_predict_hook_order():
    calls: List[str] = []
    model = RecordingModel(calls)
    trainer = Trainer(callbacks=[RecordingCallback(calls)], enable_progress_bar=False)
    predictions = trainer.predict(model)
    batch = transfer() + both("on_predict_batch_start") + ["predict_step"] + both("on_predict_batch_end")
    expected = (
        setup_hooks("predict") + ["predict_dataloader", "on_predict_model_eval"] + both("on_predict_start")
        + both("on_predict_epoch_start") + batch + batch + both("on_predict_epoch_end") + both("on_predict_end")
        + teardown_hooks()
    )
    assert calls == expected
    assert len(predictions) == 2 and predictions[0].shape == (1, 10)


class ManualRecordingModel(RecordingModel):
    def __init__(self, calls):
        super().__init__(calls)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        self.calls.append("training_step")
        opt = self.optimizers()
        opt.zero_grad()
        loss = self.loss(batch)
        self.manual_backward(loss)
        opt.step(closure=lambda: self.calls.append("user_closure"))
        return loss


def test_manual_optimization_hook_order():
    calls: List[str] = []
    model = ManualRecordingModel(calls)
    trainer = Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, callbacks=[RecordingCallback(calls)],
                      enable_progress_bar=False)
    trainer.fit(model)
    start = calls.index("Callback.on_train_batch_start")
    end = calls.index("on_train_batch_end")
    assert calls[start:end + 1] == (
        both("on_train_batch_start") + ["training_step"] + both("on_before_backward") + ["backward"]
        + both("on_after_backward") + ["user_closure"] + both("on_before_optimizer_step")
        + both("on_train_batch_end")
    )
    # manual optimization: one step counted, no LR scheduler stepping, no automatic zero_grad
    assert trainer.global_step == 1
    assert "lr_scheduler_step" not in calls and "optimizer_zero_grad" not in calls
