"""A smaller last batch runs through the eager step instead of compiling a second graph
(``CompileConfig(eager_last_batch=True)``, fastloop/step/last_batch.py): the same run as eager
mode, one graph fewer, and ``trainer.explain()`` says so. All models share one MLP shape so the
on-disk inductor cache serves most compilations."""
import copy

import pytest
import torch

from fastloop import Trainer
from fastloop.config import CompileConfig
from fastloop.step.last_batch import batch_signature, is_smaller
from fastloop.testing import BoringModel, random_loader

pytestmark = [pytest.mark.compile, pytest.mark.usefixtures("no_mode_override")]
RTOL, ATOL = 1e-4, 1e-5


def train_step(trainer):
    return trainer.fit_loop.epoch_loop.batch_loop.optimizer_loop.train_step


def val_step(trainer):
    return trainer.fit_loop.epoch_loop.val_loop.epoch_loop.eval_step


def fit(model, mode, n, val_n=None, eager_last_batch=True, **kwargs):
    trainer = Trainer(mode=mode, enable_progress_bar=False, num_sanity_val_steps=0, logger=False,
                      enable_checkpointing=False, enable_model_summary=False,
                      compile_config=CompileConfig(eager_last_batch=eager_last_batch), **kwargs)
    torch.manual_seed(3)
    val = random_loader(n=val_n, batch_size=16, seed=1) if val_n else None
    trainer.fit(model, random_loader(n=n, batch_size=16), val)
    return trainer


def progress(trainer):
    return {k: v for k, v in trainer.fit_loop.state_dict().items() if not k.endswith("state_dict")}


def assert_close_models(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x, y, rtol=RTOL, atol=ATOL), name


def test_signature_comparison():
    full = batch_signature((torch.zeros(16, 32), torch.zeros(16, dtype=torch.long)))
    last = batch_signature((torch.zeros(8, 32), torch.zeros(8, dtype=torch.long)))
    assert is_smaller(last, full) and not is_smaller(full, full) and not is_smaller(full, last)
    assert not is_smaller(batch_signature((torch.zeros(8, 31), torch.zeros(8))), full)  # another trailing dim
    assert not is_smaller(batch_signature([torch.zeros(8, 32), torch.zeros(8)]), full)  # another structure


@pytest.mark.parametrize("n, accumulate, graphs", [
    (40, 1, 1),  # batches 16, 16, 8: the last one steps alone
    (56, 2, 2),  # 16, 16 | 16, 8: the last one ends a window a compiled batch opened (p.grad shared)
])
def test_partial_last_batch_of_each_epoch_runs_eagerly(n, accumulate, graphs):
    model = BoringModel(optimizer="adam")
    reference = copy.deepcopy(model)
    trainer = fit(model, "compiled", n, max_epochs=3, accumulate_grad_batches=accumulate)
    eager = fit(reference, "eager", n, max_epochs=3, accumulate_grad_batches=accumulate)
    step = train_step(trainer)
    assert step.graph_count == graphs  # step=False and step=True graphs under accumulation, no third
    assert step.eager_last.calls == 3
    assert "the smaller last batch of each epoch ran eagerly: 3 call(s)" in trainer.explain()
    assert progress(trainer) == progress(eager)
    assert trainer.global_step == eager.global_step
    assert_close_models(model, reference)
    for key, value in model.trainer.optimizers[0].state_dict()["state"][0].items():
        assert torch.allclose(value, reference.trainer.optimizers[0].state_dict()["state"][0][key],
                              rtol=RTOL, atol=ATOL), key


@pytest.mark.slow  # one more compile (the old behaviour, which test_compiled_behaviour.py covers too)
def test_turned_off_compiles_the_last_batch():
    model = BoringModel(optimizer="adam")
    reference = copy.deepcopy(model)
    trainer = fit(model, "compiled", 40, max_epochs=2, eager_last_batch=False)
    fit(reference, "eager", 40, max_epochs=2)
    assert train_step(trainer).graph_count == 2 and train_step(trainer).eager_last.calls == 0
    assert "ran eagerly" not in trainer.explain()
    assert_close_models(model, reference)


def test_smaller_last_validation_batch_runs_eagerly():
    model = BoringModel(optimizer="adam")
    reference = copy.deepcopy(model)
    trainer = fit(model, "compiled", 32, val_n=40, max_epochs=2)  # validation batches 16, 16, 8
    eager = fit(reference, "eager", 32, val_n=40, max_epochs=2)
    step = val_step(trainer)
    assert step.graph_count == 1 and step.eager_last.calls == 2
    assert "the smaller last batch of each dataloader ran eagerly: 2 call(s)" in trainer.explain()
    val_loop = lambda t: t.fit_loop.epoch_loop.val_loop
    assert val_loop(trainer).state_dict() == val_loop(eager).state_dict()
    assert progress(trainer) == progress(eager)
    assert torch.allclose(trainer.callback_metrics["val_loss"], eager.callback_metrics["val_loss"],
                          rtol=RTOL, atol=ATOL)
    assert_close_models(model, reference)


def test_smaller_last_test_and_predict_batches_run_eagerly():
    model = BoringModel(optimizer="adam")
    reference = copy.deepcopy(model)
    kwargs = dict(enable_progress_bar=False, logger=False, enable_checkpointing=False, enable_model_summary=False)
    trainer, eager = Trainer(mode="compiled", **kwargs), Trainer(mode="eager", **kwargs)
    loader = random_loader(n=40, batch_size=16, seed=2)  # 16, 16, 8
    assert trainer.test(model, loader)[0]["test_loss"] == pytest.approx(
        eager.test(reference, loader)[0]["test_loss"], rel=RTOL)
    predictions, expected = trainer.predict(model, loader), eager.predict(reference, loader)
    assert [p.shape[0] for p in predictions] == [16, 16, 8]
    assert all(torch.allclose(a, b, rtol=RTOL, atol=ATOL) for a, b in zip(predictions, expected))
    for loop in (trainer.test_loop.epoch_loop, trainer.predict_loop.epoch_loop):
        assert loop.eval_step.graph_count == 1 and loop.eval_step.eager_last.calls == 1
