"""Extension points: the seed's generator GAN with YieldLoop, a user's own yield loop from
examples/, a FitLoop subclass, and a loop written from scratch (k-fold) wrapping FitLoop."""
import copy
import importlib.util
import pathlib

import pytest
import torch
from torch import nn

from fastloop import Module, Trainer
from fastloop.loops import FitLoop, YieldLoop
from fastloop.testing import BoringModel, random_loader

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class GAN(Module):
    """The seed page's GAN: ``fake`` is computed once per batch and used by both losses."""

    def __init__(self):
        super().__init__()
        self.generator = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 32))
        self.discriminator = nn.Sequential(nn.Linear(32, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
        self.criterion = nn.BCEWithLogitsLoss()
        self.generator_calls = 0

    def generate(self, n):
        self.generator_calls += 1
        return self.generator(torch.randn(n, 8))

    def training_step(self, batch, batch_idx):
        real, _ = batch
        # this gets computed only once!
        fake = self.generate(real.shape[0])
        ones, zeros = torch.ones(real.shape[0], 1), torch.zeros(real.shape[0], 1)

        # train discriminator, then yield
        real_loss = self.criterion(self.discriminator(real), ones)
        fake_loss = self.criterion(self.discriminator(fake), zeros)
        yield real_loss + fake_loss

        # train generator, then yield
        gen_loss = self.criterion(self.discriminator(fake), ones)
        yield gen_loss

    def configure_optimizers(self):
        return [torch.optim.Adam(self.discriminator.parameters(), lr=1e-3),
                torch.optim.Adam(self.generator.parameters(), lr=1e-3)]


def reference_gan(model, loader):
    """The same training written by hand."""
    opt_d, opt_g = model.configure_optimizers()
    for real, _ in loader:
        fake = model.generate(real.shape[0])
        ones, zeros = torch.ones(real.shape[0], 1), torch.zeros(real.shape[0], 1)
        d_loss = model.criterion(model.discriminator(real), ones) + model.criterion(model.discriminator(fake), zeros)
        opt_d.zero_grad()
        d_loss.backward(retain_graph=True)
        opt_d.step()
        g_loss = model.criterion(model.discriminator(fake), ones)
        opt_g.zero_grad()
        g_loss.backward()
        opt_g.step()


@pytest.mark.parametrize("loop_factory", [YieldLoop, lambda: load_example("user_yield_loop").MyYieldLoop()],
                         ids=["YieldLoop", "examples/user_yield_loop"])
def test_seed_gan_with_a_yield_loop(loop_factory):
    torch.manual_seed(0)
    model = GAN()
    reference = copy.deepcopy(model)
    loader = random_loader(n=64, batch_size=16, in_dim=32)

    trainer = Trainer(max_epochs=1, enable_progress_bar=False)
    yield_loop = loop_factory()
    trainer.fit_loop.epoch_loop.batch_loop.connect(optimizer_loop=yield_loop)
    torch.manual_seed(1)
    trainer.fit(model, loader)

    torch.manual_seed(1)
    reference_gan(reference, loader)
    assert model.generator_calls == 4  # once per batch, shared by both optimizers
    assert trainer.global_step == 8
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_user_yield_loop_example_is_short():
    lines = (EXAMPLES / "user_yield_loop.py").read_text().splitlines()
    assert len(lines) < 40


def test_yield_loop_rejects_a_plain_training_step_before_training():
    trainer = Trainer(max_epochs=1, enable_progress_bar=False)
    trainer.fit_loop.epoch_loop.batch_loop.connect(optimizer_loop=YieldLoop())
    with pytest.raises(TypeError, match="yields one loss per optimizer"):
        trainer.fit(BoringModel(), random_loader())


def test_too_few_yields_is_an_error_not_a_silent_stop():
    class OneYield(GAN):
        def training_step(self, batch, batch_idx):
            yield self.criterion(self.discriminator(batch[0]), torch.ones(batch[0].shape[0], 1))

    trainer = Trainer(max_epochs=1, enable_progress_bar=False)
    trainer.fit_loop.epoch_loop.batch_loop.connect(optimizer_loop=YieldLoop())
    with pytest.raises(RuntimeError, match="yielded no loss for optimizer 1"):
        trainer.fit(OneYield(), random_loader(in_dim=32))


def test_a_fit_loop_subclass_assigned_to_the_trainer_runs():
    class CountingFitLoop(FitLoop):
        epochs_seen = 0

        def on_advance_end(self):
            super().on_advance_end()
            self.epochs_seen += 1

    trainer = Trainer(max_epochs=3, enable_progress_bar=False)
    loop = CountingFitLoop(max_epochs=3)
    trainer.fit_loop = loop
    assert loop.epoch_loop.trainer is trainer
    trainer.fit(BoringModel(), random_loader())
    assert loop.epochs_seen == 3 and trainer.current_epoch == 3 and trainer.global_step == 12


def test_kfold_loop_from_scratch_wraps_fit_loop():
    kfold = load_example("kfold")
    torch.manual_seed(0)
    model = BoringModel()
    initial = copy.deepcopy(model.state_dict())
    trainer = Trainer(max_epochs=2, enable_progress_bar=False, num_sanity_val_steps=0)
    loop = kfold.KFoldLoop(3, trainer.fit_loop)
    trainer.fit_loop = loop
    datamodule = kfold.KFoldDataModule(kfold.random_dataset(n=96), num_folds=3)
    trainer.fit(model, datamodule=datamodule)
    assert loop.fold_progress.total.completed == 3 and len(loop.fold_metrics) == 3
    # after the last fold the weights are reset, and each fold trained 2 epochs of 4 batches
    assert all(torch.equal(initial[k], v) for k, v in model.state_dict().items())
    assert loop.fit_loop.epoch_progress.total.completed == 0  # reset for the next fold
    assert len(set(loop.fold_metrics)) == 3
