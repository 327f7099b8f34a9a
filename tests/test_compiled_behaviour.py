"""Loop behaviours in compiled mode, each against the same run in eager mode: LR schedulers
without recompiling, a smaller last batch, several optimizers, accumulation, counters,
logging, evaluation, and checkpoints that cross modes. All models here share one MLP shape so
the on-disk inductor cache serves most compilations."""
import copy

import pytest
import torch
from torch.optim import lr_scheduler

from fastloop import Callback, Trainer
from fastloop.config import CompileConfig
from fastloop.testing import BoringModel, random_loader
from tests.test_compiled_mode import CountsCalls

pytestmark = [pytest.mark.compile, pytest.mark.usefixtures("no_mode_override")]
RTOL, ATOL = 1e-4, 1e-5  # see test_compiled_parity.py for why


def train_step(trainer):
    return trainer.fit_loop.epoch_loop.batch_loop.optimizer_loop.train_step


def run(model, mode, loader=None, **kwargs):
    kwargs.setdefault("max_epochs", 1)
    trainer = Trainer(mode=mode, enable_progress_bar=False, num_sanity_val_steps=0, **kwargs)
    torch.manual_seed(3)
    trainer.fit(model, loader or random_loader(n=64, batch_size=16))
    return trainer


def assert_close_models(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x, y, rtol=RTOL, atol=ATOL), name


SCHEDULERS = {
    "StepLR": lambda opt: lr_scheduler.StepLR(opt, step_size=1, gamma=0.7),
    "MultiStepLR": lambda opt: lr_scheduler.MultiStepLR(opt, milestones=[1, 3], gamma=0.5),
    "CosineAnnealingLR": lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=4),
    "OneCycleLR": lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=5),
    "LambdaLR": lambda opt: lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step)),
    "ReduceLROnPlateau": lambda opt: lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5),
}


class Scheduled(BoringModel):
    def __init__(self, name):
        super().__init__(optimizer="adam", lr=0.01)
        self.scheduler_name = name
        self.lrs = []

    def on_train_batch_start(self, batch, batch_idx):
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=0.01)
        sched = SCHEDULERS[self.scheduler_name](opt)
        if self.scheduler_name == "ReduceLROnPlateau":
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"},
                    "monitor": "train_loss"}
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@pytest.mark.slow  # compiles; kept out of the default suite's time budget (tests/test_step_fused.py checks the same with OneCycleLR)
def test_lr_schedulers_never_recompile():
    for name in SCHEDULERS:
        torch.manual_seed(0)
        eager_model = Scheduled(name)
        compiled_model = copy.deepcopy(eager_model)
        run(eager_model, "eager")
        trainer = run(compiled_model, "compiled")
        assert train_step(trainer).graph_count == 1, name
        assert compiled_model.lrs == eager_model.lrs and len(set(eager_model.lrs)) > 1, name
        assert_close_models(eager_model, compiled_model)


@pytest.mark.slow  # compiles; kept out of the default suite's time budget (the default runs that batch eagerly; test_step_fused.py compiles one)
def test_smaller_last_batch_costs_one_more_graph_and_no_recompile_storm():
    model = BoringModel(optimizer="adam")
    reference = copy.deepcopy(model)
    loader = random_loader(n=40, batch_size=16)  # batches of 16, 16 and 8
    # The default runs the 8-row batch eagerly (tests/test_eager_last_batch.py); this test is
    # about compiling it.
    trainer = run(model, "compiled", loader, max_epochs=3, compile_config=CompileConfig(eager_last_batch=False))
    run(reference, "eager", loader, max_epochs=3)
    assert train_step(trainer).graph_count == 2
    # 9 calls: the 2 that compiled went through torch.compile, the other 7 ran their graph directly.
    assert [f.direct_calls for f in train_step(trainer).fused.values()] == [7]
    assert "optimizer 0: 7 of 9 calls ran the compiled graph directly" in trainer.explain()
    assert_close_models(model, reference)


def test_python_side_effects_in_training_step_happen_every_step():
    """A direct graph call would skip ``self.calls += 1``; such steps stay behind the guards,
    where torch.compile replays the side effect on every call."""
    model = CountsCalls(optimizer="adam")
    trainer = run(model, "compiled")
    assert model.calls == trainer.global_step == 4
    assert "assigns .calls" in train_step(trainer).fused[0].direct_reason


class ScaledByAttribute(BoringModel):
    """A plain tensor attribute (not a buffer) used by training_step and replaced mid-run."""

    def __init__(self):
        super().__init__(optimizer="adam")
        self.scale = torch.tensor(2.0)

    def training_step(self, batch, batch_idx):
        return self.loss(batch) * self.scale

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.trainer.global_step == 2:
            self.scale = torch.tensor(0.5)


def test_direct_calls_see_a_replaced_module_tensor():
    model = ScaledByAttribute()
    reference = copy.deepcopy(model)
    trainer = run(model, "compiled", random_loader(n=96, batch_size=16))
    run(reference, "eager", random_loader(n=96, batch_size=16))
    fused = train_step(trainer).fused[0]
    # The call after the replacement went through torch.compile (no new graph), the rest direct.
    assert (fused.calls, fused.direct_calls, fused.graph_count) == (6, 4, 1)
    assert_close_models(model, reference)


class ScalesByEpoch(BoringModel):
    def training_step(self, batch, batch_idx):
        return self.loss(batch) * (1.0 + self.current_epoch)


def test_training_step_reading_run_state_stays_behind_guards():
    """A direct call would keep epoch 0's factor; torch.compile's guards recompile for epoch 1."""
    model = ScalesByEpoch(optimizer="adam")
    reference = copy.deepcopy(model)
    trainer = run(model, "compiled", max_epochs=2)
    run(reference, "eager", max_epochs=2)
    fused = train_step(trainer).fused[0]
    assert fused.direct_calls == 0 and "reads self.current_epoch" in fused.direct_reason
    assert "no direct graph calls: training_step reads self.current_epoch" in trainer.explain()
    assert train_step(trainer).graph_count == 2
    assert_close_models(model, reference)


class TwoOptimizers(BoringModel):
    def training_step(self, batch, batch_idx, optimizer_idx):
        loss = self.loss(batch)
        self.log(f"loss_{optimizer_idx}", loss)
        return loss

    def configure_optimizers(self):
        return [torch.optim.Adam(self.net[0].parameters(), lr=0.01), torch.optim.SGD(self.net[2].parameters(), lr=0.1)]


@pytest.mark.slow  # compiles; kept out of the default suite's time budget (the parity fuzz regression #10 runs two optimizers)
def test_several_optimizers_get_one_graph_each():
    model = TwoOptimizers()
    reference = copy.deepcopy(model)
    trainer = run(model, "compiled")
    eager = run(reference, "eager")
    assert train_step(trainer).graph_count == 2 and trainer.global_step == eager.global_step == 8
    assert_close_models(model, reference)
    for key in ("loss_0", "loss_1"):
        assert torch.allclose(trainer.callback_metrics[key], eager.callback_metrics[key], rtol=RTOL)


@pytest.mark.slow  # compiles; kept out of the default suite's time budget (the parity fuzz sample compares counters with accumulation and clipping)
def test_accumulation_and_clipping_counters_match_eager():
    model = BoringModel(optimizer="adam")
    reference = copy.deepcopy(model)
    kwargs = dict(max_epochs=2, accumulate_grad_batches=3, gradient_clip_val=0.1)
    trainer = run(model, "compiled", **kwargs)
    eager = run(reference, "eager", **kwargs)
    progress = lambda t: {k: v for k, v in t.fit_loop.state_dict().items() if not k.endswith("state_dict")}
    assert progress(trainer) == progress(eager)
    assert trainer.global_step == 4 and train_step(trainer).graph_count == 2
    assert_close_models(model, reference)


class Observed(Callback):
    """Observing hooks still run in compiled mode, after the fused graph."""

    def __init__(self):
        self.calls = []

    def on_before_zero_grad(self, trainer, pl_module, optimizer):
        self.calls.append("zero_grad")

    def on_before_backward(self, trainer, pl_module, loss):
        self.calls.append("backward")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.calls.append(round(float(outputs["loss"]), 4))


def test_compiled_evaluation_logging_and_observer_hooks_match_eager():
    compiled_cb, eager_cb = Observed(), Observed()
    model = BoringModel(optimizer="adam")
    reference = copy.deepcopy(model)
    val = random_loader(n=32, batch_size=16, seed=1)
    trainer = Trainer(max_epochs=1, mode="compiled", enable_progress_bar=False, callbacks=[compiled_cb])
    trainer.fit(model, random_loader(n=64, batch_size=16), val)
    eager = Trainer(max_epochs=1, mode="eager", enable_progress_bar=False, callbacks=[eager_cb])
    eager.fit(reference, random_loader(n=64, batch_size=16), val)
    assert compiled_cb.calls == eager_cb.calls
    for key in ("train_loss", "val_loss"):
        assert torch.allclose(trainer.callback_metrics[key], eager.callback_metrics[key], rtol=RTOL, atol=ATOL)
    assert trainer.fit_loop.epoch_loop.val_loop.epoch_loop.step_report.used == "compiled"
    test = random_loader(n=32, batch_size=16, seed=2)
    assert trainer.test(model, test)[0]["test_loss"] == pytest.approx(eager.test(reference, test)[0]["test_loss"],
                                                                      rel=RTOL)
    predictions = trainer.predict(model, test)
    expected = eager.predict(reference, test)
    assert all(torch.allclose(a, b, rtol=RTOL, atol=ATOL) for a, b in zip(predictions, expected))


@pytest.mark.parametrize("first, second", [("compiled", "eager"), ("eager", "compiled")])
def test_checkpoints_cross_modes(tmp_path, first, second):
    torch.manual_seed(0)
    model = BoringModel(optimizer="adam")
    initial = copy.deepcopy(model.state_dict())
    run(model, "eager", max_epochs=2)  # the reference: two eager epochs

    part = BoringModel(optimizer="adam")
    part.load_state_dict(initial)
    t1 = run(part, first)
    t1.save_checkpoint(tmp_path / "one.ckpt")
    resumed = BoringModel(optimizer="adam")
    t2 = Trainer(max_epochs=2, mode=second, enable_progress_bar=False)
    t2.fit(resumed, random_loader(n=64, batch_size=16), ckpt_path=tmp_path / "one.ckpt")
    assert t2.global_step == 8
    assert_close_models(model, resumed)
