"""Automatic optimization against hand-written PyTorch loops: parameters must be equal."""
import copy
from typing import List

import pytest
import torch
from torch import nn

from fastloop import Callback, Trainer
from fastloop.testing import BoringModel, random_loader


def batches(loader):
    return [tuple(t.clone() for t in b) for b in loader]


def trainer(**kwargs):
    kwargs.setdefault("enable_progress_bar", False)
    kwargs.setdefault("num_sanity_val_steps", 0)
    return Trainer(**kwargs)


class ObserveZeroGrad(Callback):
    """Overriding any step hook selects the generic eager step (closure + hook dispatch)."""

    def on_before_zero_grad(self, trainer, pl_module, optimizer):
        pass


@pytest.fixture(params=["direct", "generic"])
def step_path(request):
    """Callbacks selecting the direct eager step or the generic one; both must give the same."""
    return [] if request.param == "direct" else [ObserveZeroGrad()]


def assert_step_path(t, callbacks):
    from fastloop.step.eager import DirectEagerStep

    step = t.fit_loop.epoch_loop.batch_loop.optimizer_loop.train_step
    assert isinstance(step, DirectEagerStep) == (not callbacks)


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fit_equals_a_raw_pytorch_loop(optimizer, step_path):
    model = BoringModel(optimizer=optimizer)
    reference = copy.deepcopy(model)
    loader = random_loader(n=64, batch_size=16)
    t = trainer(max_epochs=2, callbacks=step_path)
    t.fit(model, loader)
    assert_step_path(t, step_path)
    opt = reference.configure_optimizers()
    for _ in range(2):
        for batch in loader:
            loss = reference.loss(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert_same_params(model, reference)


def test_gradient_accumulation_steps_on_window_ends_and_last_batch(step_path):
    model = BoringModel()
    reference = copy.deepcopy(model)
    loader = random_loader(n=8, batch_size=2)  # 4 batches, windows of 3: steps at batch 2 and 3
    steps: List[int] = []

    class Steps(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer, opt_idx):
            steps.append(trainer.fit_loop.batch_idx)

    t = trainer(max_epochs=1, accumulate_grad_batches=3, callbacks=[Steps()] + step_path)
    t.fit(model, loader)
    assert steps == [2, 3] and t.global_step == 2
    opt = reference.configure_optimizers()
    for i, batch in enumerate(batches(loader)):
        if i % 3 == 0:
            opt.zero_grad()
        (reference.loss(batch) / 3).backward()
        if i in (2, 3):
            opt.step()
    assert_same_params(model, reference)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_matches_torch_utils(algorithm, step_path):
    model = BoringModel(lr=1.0)
    reference = copy.deepcopy(model)
    loader = random_loader(n=32, batch_size=8)
    t = trainer(max_epochs=1, gradient_clip_val=0.05, gradient_clip_algorithm=algorithm, callbacks=step_path)
    t.fit(model, loader)
    assert_step_path(t, step_path)
    opt = reference.configure_optimizers()
    for batch in loader:
        opt.zero_grad()
        reference.loss(batch).backward()
        if algorithm == "norm":
            torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        else:
            torch.nn.utils.clip_grad_value_(reference.parameters(), 0.05)
        opt.step()
    assert_same_params(model, reference)


class TwoOptimizerModel(BoringModel):
    def __init__(self, frequencies=None):
        super().__init__()
        self.frequencies = frequencies
        self.calls: List[tuple] = []

    def training_step(self, batch, batch_idx, optimizer_idx):
        frozen = [not p.requires_grad for p in self.net[2 - 2 * optimizer_idx].parameters()]
        self.calls.append((batch_idx, optimizer_idx, all(frozen)))
        return self.loss(batch)

    def configure_optimizers(self):
        opts = [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[2].parameters(), lr=0.1)]
        if self.frequencies:
            return [{"optimizer": o, "frequency": f} for o, f in zip(opts, self.frequencies)]
        return opts


def test_multiple_optimizers_run_in_order_with_other_parameters_frozen(step_path):
    model = TwoOptimizerModel()
    reference = copy.deepcopy(model)
    loader = random_loader(n=32, batch_size=8)
    t = trainer(max_epochs=1, callbacks=step_path)
    t.fit(model, loader)
    assert model.calls == [(b, o, True) for b in range(4) for o in (0, 1)]
    assert t.global_step == 8
    opts = reference.configure_optimizers()
    for batch in loader:
        for idx, opt in enumerate(opts):
            opt.zero_grad()
            reference.loss(batch).backward()
            opt.step()
    assert_same_params(model, reference)
    assert all(p.requires_grad for p in model.parameters())


def test_optimizer_frequencies_pick_one_optimizer_per_batch():
    model = TwoOptimizerModel(frequencies=[2, 1])
    t = trainer(max_epochs=1)
    t.fit(model, random_loader(n=48, batch_size=8))
    assert [o for _, o, _ in model.calls] == [0, 0, 1, 0, 0, 1]
    assert t.global_step == 6


def test_several_optimizers_without_optimizer_idx_fail_before_the_first_step():
    class Missing(TwoOptimizerModel):
        def training_step(self, batch, batch_idx):
            raise AssertionError("must not run")

    with pytest.raises(ValueError, match="defines 2 optimizers but `training_step` is missing the `optimizer_idx`"):
        trainer(max_epochs=1).fit(Missing(), random_loader())


def test_training_step_returning_none_skips_the_update():
    class Skipping(BoringModel):
        def training_step(self, batch, batch_idx):
            return None

    model = Skipping()
    before = copy.deepcopy(model)
    t = trainer(max_epochs=1)
    with pytest.warns(UserWarning, match="returned `None`"):
        t.fit(model, random_loader())
    assert_same_params(model, before)


def test_dict_without_loss_is_a_clear_error():
    class NoLoss(BoringModel):
        def training_step(self, batch, batch_idx):
            return {"acc": torch.tensor(1.0)}

    with pytest.raises(ValueError, match="without a 'loss' key"):
        trainer(max_epochs=1).fit(NoLoss(), random_loader())


def test_dict_with_loss_reaches_batch_end_detached():
    seen = []

    class DictStep(BoringModel):
        def training_step(self, batch, batch_idx):
            return {"loss": self.loss(batch), "extra": torch.ones(1, requires_grad=True) * 2}

        def on_train_batch_end(self, outputs, batch, batch_idx):
            seen.append(outputs)

    trainer(max_epochs=1, limit_train_batches=1).fit(DictStep(), random_loader())
    assert set(seen[0]) == {"loss", "extra"} and not seen[0]["loss"].requires_grad
    assert not seen[0]["extra"].requires_grad


def test_on_train_batch_start_returning_minus_one_ends_the_epoch():
    class Stopper(BoringModel):
        epoch_ends = 0

        def on_train_batch_start(self, batch, batch_idx):
            return -1 if batch_idx == 2 else None

        def on_train_epoch_end(self):
            self.epoch_ends += 1

    model = Stopper()
    t = trainer(max_epochs=2)
    t.fit(model, random_loader(n=80, batch_size=16))
    assert t.global_step == 4 and model.epoch_ends == 2 and t.current_epoch == 2


def _lrs(t):
    return [g["lr"] for g in t.optimizers[0].param_groups]


@pytest.mark.parametrize("interval, frequency, expected_steps", [("step", 1, 8), ("step", 3, 2), ("epoch", 1, 2)])
def test_lr_scheduler_intervals(interval, frequency, expected_steps):
    class Scheduled(BoringModel):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=1.0)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": interval, "frequency": frequency}}

    t = trainer(max_epochs=2)
    t.fit(Scheduled(), random_loader(n=64, batch_size=16))
    assert _lrs(t) == [0.5 ** expected_steps]
    assert t.fit_loop.epoch_loop.scheduler_progress.total.completed == expected_steps


def test_reduce_lr_on_plateau_uses_the_monitored_metric():
    class Plateau(BoringModel):
        def validation_step(self, batch, batch_idx):
            self.log("val_metric", 1.0)  # never improves

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=1.0)
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
            return {"optimizer": opt, "lr_scheduler": sched, "monitor": "val_metric"}

    t = trainer(max_epochs=3)
    t.fit(Plateau(), random_loader(n=16, batch_size=8), random_loader(n=8, batch_size=8))
    assert _lrs(t) == [0.25]  # epoch 1: best; epochs 2, 3: no improvement with patience 0


def test_reduce_lr_on_plateau_missing_metric_names_the_available_ones():
    class Plateau(BoringModel):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=1.0)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(opt),
                    "monitor": "nope"}

    with pytest.raises(KeyError, match="'nope'.*train_loss"):
        trainer(max_epochs=1).fit(Plateau(), random_loader())


def test_reduce_lr_on_plateau_without_monitor_is_rejected_before_training():
    class Plateau(BoringModel):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=1.0)
            return [opt], [torch.optim.lr_scheduler.ReduceLROnPlateau(opt)]

    with pytest.raises(ValueError, match="without `monitor`"):
        trainer(max_epochs=1).fit(Plateau(), random_loader())


@pytest.mark.parametrize("bad", [42, [], ["not an optimizer"]])
def test_bad_configure_optimizers_is_rejected(bad):
    class Bad(BoringModel):
        def configure_optimizers(self):
            return bad

    with pytest.raises((TypeError, ValueError), match="configure_optimizers"):
        trainer(max_epochs=1).fit(Bad(), random_loader())


class ManualModel(BoringModel):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = self.loss(batch)
        self.manual_backward(loss)
        opt.step()
        return loss


def test_manual_optimization_equals_raw_loop():
    model = ManualModel()
    reference = copy.deepcopy(model)
    loader = random_loader()
    t = trainer(max_epochs=1)
    t.fit(model, loader)
    assert t.global_step == 4
    opt = reference.configure_optimizers()
    for batch in loader:
        opt.zero_grad()
        reference.loss(batch).backward()
        opt.step()
    assert_same_params(model, reference)


@pytest.mark.parametrize("kwargs, match", [({"gradient_clip_val": 1.0}, "manual optimization"),
                                           ({"accumulate_grad_batches": 2}, "manual optimization")])
def test_manual_optimization_rejects_automatic_features(kwargs, match):
    with pytest.raises(ValueError, match=match):
        trainer(max_epochs=1, **kwargs).fit(ManualModel(), random_loader())


def test_max_steps_stops_mid_epoch():
    t = trainer(max_steps=3)
    t.fit(BoringModel(), random_loader(n=64, batch_size=16))
    # As in Lightning, the interrupted epoch still runs its end hooks and counts as completed.
    assert t.global_step == 3 and t.current_epoch == 1
    assert t.fit_loop.epoch_loop.batch_progress.current.completed == 3


def test_should_stop_honours_min_epochs():
    class StopEarly(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    t = trainer(max_epochs=5, min_epochs=3, callbacks=[StopEarly()])
    t.fit(BoringModel(), random_loader())
    assert t.current_epoch == 3


@pytest.mark.parametrize("bad_batch, named", [(None, "None"), ("text", "a str")])
def test_bad_batch_types_are_named(bad_batch, named):
    with pytest.raises(TypeError, match=f"dataloader 0 yielded {named}"):
        trainer(max_epochs=1).fit(BoringModel(), [bad_batch, bad_batch])


def test_missing_training_data_is_a_clear_error():
    with pytest.raises(ValueError, match="no training data"):
        trainer(max_epochs=1).fit(BoringModel())


def test_fastloop_mode_environment_variable_overrides_the_argument(monkeypatch):
    monkeypatch.setenv("FASTLOOP_MODE", "eager")
    assert Trainer(mode="compiled").mode == "eager"
    monkeypatch.setenv("FASTLOOP_MODE", "fast")
    with pytest.raises(ValueError, match="FASTLOOP_MODE must be one of"):
        Trainer()


def test_lbfgs_gets_the_closure_and_matches_a_raw_loop():
    class LBFGSModel(BoringModel):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=3)

    model = LBFGSModel()
    reference = copy.deepcopy(model)
    loader = random_loader(n=32, batch_size=16)
    trainer(max_epochs=1).fit(model, loader)
    opt = reference.configure_optimizers()
    for batch in loader:
        def closure():
            loss = reference.loss(batch)
            opt.zero_grad()
            loss.backward()
            return loss
        opt.step(closure)
    assert_same_params(model, reference)


def test_direct_step_clears_grads_like_zero_grad_and_keeps_a_subclass_zero_grad():
    """The direct eager step sets every ``.grad`` to None itself (``clear_grads``), as torch's
    ``zero_grad()`` does; an optimizer subclass may override ``zero_grad``, so it keeps its own."""
    from fastloop.step.eager import DirectEagerStep, clear_grads

    model = BoringModel()
    opt = model.configure_optimizers()
    model.loss(next(iter(random_loader()))).backward()
    assert all(p.grad is not None for p in model.parameters())
    clear_grads(opt)
    assert all(p.grad is None for p in model.parameters())

    calls: List[int] = []

    class CountingSGD(torch.optim.SGD):
        def zero_grad(self, set_to_none: bool = True) -> None:
            calls.append(1)
            super().zero_grad(set_to_none)

    class Model(BoringModel):
        def configure_optimizers(self):
            return CountingSGD(self.parameters(), lr=0.1)

    t = trainer(max_epochs=1, limit_train_batches=3)
    t.fit(Model(), random_loader())
    assert not isinstance(t.fit_loop.epoch_loop.batch_loop.optimizer_loop.train_step, DirectEagerStep)
    assert calls == [1, 1, 1]
    assert "CountingSGD is not one of torch.optim's own classes" in t.explain()

    patched = []

    class PatchedModel(BoringModel):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            original = opt.zero_grad
            opt.zero_grad = lambda set_to_none=True: (patched.append(1), original(set_to_none))
            return opt

    t = trainer(max_epochs=1, limit_train_batches=2)
    t.fit(PatchedModel(), random_loader())
    assert not isinstance(t.fit_loop.epoch_loop.batch_loop.optimizer_loop.train_step, DirectEagerStep)
    assert patched == [1, 1]
    assert "optimizer SGD has its own zero_grad (set on the instance)" in t.explain()
