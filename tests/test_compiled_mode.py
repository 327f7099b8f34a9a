"""Compiled mode: decisions made before the first step, fallbacks with readable reasons,
compile counters, logging, evaluation, and checkpoints that cross modes."""
import copy

import pytest
import torch

from fastloop import Callback, Trainer
from fastloop.loops import YieldLoop
from fastloop.testing import BoringModel, random_loader
from tests.test_custom_loops import GAN

pytestmark = pytest.mark.usefixtures("no_mode_override")


def optimizer_report(trainer):
    return trainer.fit_loop.epoch_loop.batch_loop.optimizer_loop.step_report


def fit(model, mode="compiled", **kwargs):
    kwargs.setdefault("max_epochs", 1)
    trainer = Trainer(mode=mode, enable_progress_bar=False, num_sanity_val_steps=0, **kwargs)
    trainer.fit(model, random_loader(n=32, batch_size=16))
    return trainer


class RMSpropModel(BoringModel):
    def configure_optimizers(self):
        return torch.optim.RMSprop(self.parameters(), lr=0.01)


class ClippingHook(BoringModel):
    def on_before_optimizer_step(self, optimizer, optimizer_idx):
        pass


class ReadsBatchIdx(BoringModel):
    def training_step(self, batch, batch_idx):
        return self.loss(batch) * (1.0 if batch_idx >= 0 else 2.0)


class Manual(BoringModel):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(self.loss(batch))
        opt.step()


class StepObserver(Callback):
    def on_after_backward(self, trainer, pl_module):
        pass


@pytest.mark.parametrize("model, callbacks, reason", [
    (RMSpropModel(), [], "optimizer RMSprop has no fused update"),
    (ClippingHook(), [], "on_before_optimizer_step is overridden by ClippingHook"),
    (BoringModel(), [StepObserver()], "on_after_backward is overridden by StepObserver"),
    (ReadsBatchIdx(), [], "training_step reads batch_idx"),
    (Manual(), [], "manual optimization"),
])
def test_fallbacks_are_decided_before_the_first_step_and_explained(model, callbacks, reason):
    reference = copy.deepcopy(model)
    with pytest.warns(RuntimeWarning, match="runs eagerly"):
        trainer = fit(model, callbacks=callbacks)
    report = optimizer_report(trainer)
    assert report.used == "eager" and any(reason in r for r in report.reasons), report.reasons
    assert reason in trainer.explain()
    eager = fit(reference, mode="eager", callbacks=callbacks)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    assert trainer.global_step == eager.global_step


def test_generator_training_step_falls_back_with_reason():
    trainer = Trainer(max_epochs=1, mode="compiled", enable_progress_bar=False)
    trainer.fit_loop.epoch_loop.batch_loop.connect(optimizer_loop=YieldLoop())
    with pytest.warns(RuntimeWarning):
        trainer.fit(GAN(), random_loader(in_dim=32))
    reasons = optimizer_report(trainer).reasons
    assert "training_step is a generator" in reasons
    assert "optimizer loop YieldLoop overrides make_step_fn" in reasons


def test_environment_variable_forces_eager(monkeypatch):
    monkeypatch.setenv("FASTLOOP_MODE", "eager")
    trainer = fit(BoringModel(), mode="compiled")
    assert optimizer_report(trainer).used == "eager" and trainer.mode == "eager"


def test_auto_mode_records_its_fallback_without_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # auto may choose eager: no warning
        trainer = fit(RMSpropModel(), mode="auto")
    report = optimizer_report(trainer)
    assert report.requested == "auto" and report.used == "eager"
    assert any("optimizer RMSprop has no fused update" in r for r in report.reasons)


class CountsCalls(BoringModel):
    def training_step(self, batch, batch_idx):
        self.calls = getattr(self, "calls", 0) + 1
        return self.loss(batch)


class KeepsHistory(BoringModel):
    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.history.append(loss.detach())
        return loss


class ReadsStep(BoringModel):
    def training_step(self, batch, batch_idx):
        return self.loss(batch) * (1.0 if self.global_step < 2 else 0.5)


def test_direct_graph_calls_are_refused_where_they_would_skip_python_work():
    from fastloop.step.build import direct_call_blocker

    assert direct_call_blocker(BoringModel().training_step) == ""  # self.log is fine
    assert "assigns .calls" in direct_call_blocker(CountsCalls().training_step)
    assert "calls .history.append()" in direct_call_blocker(KeepsHistory().training_step)
    assert "reads self.global_step" in direct_call_blocker(ReadsStep().training_step)
