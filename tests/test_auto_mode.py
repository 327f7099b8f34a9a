"""``mode="auto"`` is never slower than eager: after the compile it times the compiled step
against the eager step (both real steps of the run, in order) and keeps the faster, saying why
with the two timings. Timings are injected here; an explicit ``mode="compiled"`` is never measured.
"""
import types
import warnings

import pytest
import torch

from fastloop import Trainer
from fastloop.step import auto_choice
from fastloop.step.auto_choice import AutoChoiceStep, choose
from fastloop.step.build import StepReport
from fastloop.step.compiled import CompiledTrainStep
from fastloop.step.output import StepOutput
from fastloop.testing import BoringModel, random_loader

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def test_choose_keeps_compiled_only_when_clearly_faster():
    assert choose([1e-3, 9e-3, 1e-3], [2e-3, 2e-3, 2e-3]) == (
        True, "compiled 1.00 ms per step, eager 2.00 ms (medians of 3 and 3 steps after the compile)")
    assert choose([1.0e-3], [1.04e-3])[0] is False  # within MIN_SPEEDUP: a tie goes to eager
    assert choose([2e-3], [1e-3])[0] is False


class FakeStep:
    """Records which step ran each call; the compiled one compiles on its first call."""

    def __init__(self, mode, log, compile_on=(0,)):
        self.mode, self.log, self.compile_on = mode, log, compile_on
        self.graph_count, self.compile_seconds, self.calls = 0, 0.0, 0
        self.nonfinite_guards = {}
        self.notes = []

    def __call__(self, batch, batch_idx, opt_idx, optimizer):
        if self.calls in self.compile_on:
            self.graph_count += 1
        self.calls += 1
        self.log.append((self.mode, batch_idx, opt_idx))
        return StepOutput(None)


def fake_loop(accumulate=1):
    trainer = types.SimpleNamespace(accumulate_grad_batches=accumulate, device=torch.device("cpu"))
    progress = types.SimpleNamespace(optimizer_position=0)
    return types.SimpleNamespace(trainer=trainer, optim_progress=progress, train_step=None,
                                 step_report=StepReport("auto", "compiled"))


def drive(loop, batches, optimizers=1):
    """What OptimizerLoop.run does: per batch, the loop's current step for each optimizer."""
    for batch_idx in range(batches):
        step = loop.train_step
        for position in range(optimizers):
            loop.optim_progress.optimizer_position = position
            step(None, batch_idx, position, None)


def injected(compiled_s, eager_s):
    def timed(self, step, *args):
        return step(*args), compiled_s if step.mode == "compiled" else eager_s
    return timed


@pytest.mark.parametrize("compiled_s, eager_s, kept", [(1e-3, 2e-3, "compiled"), (2e-3, 1e-3, "eager")])
def test_measures_real_steps_in_order_and_hands_the_loop_the_faster(monkeypatch, compiled_s, eager_s, kept):
    monkeypatch.setattr(AutoChoiceStep, "_timed", injected(compiled_s, eager_s))
    log, loop = [], fake_loop()
    compiled, eager = FakeStep("compiled", log), FakeStep("eager", log)
    loop.train_step = auto = AutoChoiceStep(loop, compiled, eager)
    drive(loop, 16)
    # 1 compiling + 2 warm-up + 5 timed compiled batches, 1 + 5 eager, then the choice.
    assert [m for m, _, _ in log] == ["compiled"] * 8 + ["eager"] * 6 + [kept] * 2
    assert [b for _, b, _ in log] == list(range(16))
    assert loop.train_step is (compiled if kept == "compiled" else eager)
    report = loop.step_report
    if kept == "compiled":
        assert (report.used, report.reasons) == ("compiled", [])
        assert auto.notes == ["auto: kept the compiled step, faster than eager: compiled 1.00 ms per step, "
                              "eager 2.00 ms (medians of 5 and 5 steps after the compile)"]
    else:
        assert report.used == "eager" and report.step is eager
        assert report.reasons == ["auto: the compiled step does not beat eager on this model (compiled 2.00 ms "
                                  "per step, eager 1.00 ms (medians of 5 and 5 steps after the compile); 1 graph(s), "
                                  "0.0 s to compile): running eagerly"]


def test_switches_only_at_window_starts_and_skips_recompiling_windows(monkeypatch):
    monkeypatch.setattr(AutoChoiceStep, "_timed", injected(2e-3, 1e-3))
    log, loop = [], fake_loop(accumulate=2)
    # Compiles on its first call and again on its 13th (a smaller last batch, say).
    compiled, eager = FakeStep("compiled", log, compile_on=(0, 12)), FakeStep("eager", log)
    loop.train_step = auto = AutoChoiceStep(loop, compiled, eager)
    drive(loop, 20, optimizers=2)  # 2 optimizers x accumulate 2: a window is 4 calls
    modes = [m for m, _, _ in log]
    windows = [modes[i:i + 4] for i in range(0, len(modes), 4)]
    assert all(len(set(w)) == 1 for w in windows)  # never switched inside a window
    # 1 compiling + 2 warm-up + 1 recompiling (not timed) + 5 timed windows compiled, then 1 + 5 eager.
    assert [w[0] for w in windows] == ["compiled"] * 9 + ["eager"]
    assert loop.train_step is auto  # not decided yet: 20 batches are 10 windows
    drive(loop, 12)  # 6 more windows: 5 timed eager, then the choice
    assert loop.train_step is eager


def test_a_compiled_step_that_falls_back_ends_the_measurement(monkeypatch):
    monkeypatch.setattr(AutoChoiceStep, "_timed", injected(1e-3, 1e-3))
    log, loop = [], fake_loop()
    fallback = FakeStep("eager-fallback", log)

    class FallsBack(FakeStep):
        def __call__(self, *args):
            loop.train_step = fallback  # what CompiledTrainStep._fall_back does
            return fallback(*args)

    auto = loop.train_step = AutoChoiceStep(loop, FallsBack("compiled", log), FakeStep("eager", log))
    drive(loop, 3)
    assert [m for m, _, _ in log] == ["eager-fallback"] * 3 and auto.phase == "decided"


def fit(mode, **kwargs):
    torch.manual_seed(0)
    model = BoringModel(optimizer="sgd")
    trainer = Trainer(mode=mode, max_epochs=1, num_sanity_val_steps=0, limit_val_batches=0, **QUIET, **kwargs)
    trainer.fit(model, random_loader(n=16 * 8, batch_size=8))
    return model, trainer


@pytest.mark.slow  # a real compile and timing; the decision logic is tested with injected timings above
@pytest.mark.compile
def test_auto_runs_eagerly_where_compiled_does_not_win_and_explains(no_mode_override, monkeypatch):
    monkeypatch.setattr(AutoChoiceStep, "_timed", injected(2e-3, 1e-3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # auto chooses quietly
        model, trainer = fit("auto")
    loop = trainer.fit_loop.epoch_loop.batch_loop.optimizer_loop
    report = loop.step_report
    assert report.used == "eager" and type(loop.train_step).__name__ == "DirectEagerStep"
    explained = trainer.explain()
    assert "eager (requested auto)" in explained
    assert ("fallback: auto: the compiled step does not beat eager on this model (compiled 2.00 ms per step, "
            "eager 1.00 ms (medians of 5 and 5 steps after the compile); 1 graph(s), ") in explained
    # 8 compiled steps (compile, warm-up, timed), then eager: the same result as an eager fit.
    reference, eager = fit("eager")
    assert trainer.global_step == eager.global_step == 16
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.compile
def test_explicit_compiled_mode_is_never_measured(no_mode_override, monkeypatch):
    monkeypatch.setattr(auto_choice, "MEASURED_WINDOWS", 1)
    monkeypatch.setattr(AutoChoiceStep, "_timed", injected(2e-3, 1e-3))  # would choose eager
    _, trainer = fit("compiled", max_steps=12)
    loop = trainer.fit_loop.epoch_loop.batch_loop.optimizer_loop
    assert isinstance(loop.train_step, CompiledTrainStep) and loop.step_report.used == "compiled"
    assert loop.train_step.fused[0].calls == 12
