"""When validation runs during fit, sanity checks, and repeated evaluation."""
from typing import List

import pytest
import torch

from fastloop import Callback, Trainer
from fastloop.testing import BoringModel, random_loader


class ValRecorder(Callback):
    def __init__(self):
        self.at: List[tuple] = []
        self.sanity = 0

    def on_validation_start(self, trainer, pl_module):
        if trainer.sanity_checking:
            self.sanity += 1
        else:
            self.at.append((trainer.current_epoch, trainer.fit_loop.batch_idx))


def fit(**kwargs):
    rec = ValRecorder()
    n = kwargs.pop("n", 64)
    t = Trainer(enable_progress_bar=False, callbacks=[rec], **kwargs)
    t.fit(BoringModel(), random_loader(n=n, batch_size=16), random_loader(n=32, batch_size=16, seed=1))
    return t, rec


def test_fractional_val_check_interval():
    _, rec = fit(max_epochs=1, val_check_interval=0.5, num_sanity_val_steps=0)
    assert rec.at == [(0, 1), (0, 3)]


def test_integer_interval_across_epochs():
    _, rec = fit(max_epochs=2, val_check_interval=3, check_val_every_n_epoch=None, num_sanity_val_steps=0)
    assert rec.at == [(0, 2), (1, 1)]  # total batches 3 and 6


def test_check_val_every_n_epoch():
    _, rec = fit(max_epochs=4, check_val_every_n_epoch=2, num_sanity_val_steps=0)
    assert rec.at == [(1, 3), (3, 3)]


def test_interval_beyond_the_epoch_is_rejected():
    with pytest.raises(ValueError, match="more than the 4 training batches"):
        fit(max_epochs=1, val_check_interval=10)


def test_sanity_check_runs_before_training_and_leaves_no_trace():
    t, rec = fit(max_epochs=1, num_sanity_val_steps=1)
    assert rec.sanity == 1 and rec.at == [(0, 3)]
    val_loop = t.fit_loop.epoch_loop.val_loop
    # progress counts only the real validation run (2 batches), not the sanity batch
    assert val_loop.epoch_loop.batch_progress.total.completed == 2
    assert val_loop.dataloader_progress.total.completed == 1


def test_sanity_check_does_not_change_the_random_stream():
    class Dropout(BoringModel):
        def __init__(self):
            super().__init__()
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, x):
            return self.net(self.drop(x))

        def validation_step(self, batch, batch_idx):
            torch.rand(3)  # consumes the global RNG
            return super().validation_step(batch, batch_idx)

    results = []
    for steps in (0, 2):
        torch.manual_seed(0)
        model = Dropout()
        Trainer(max_epochs=1, num_sanity_val_steps=steps, enable_progress_bar=False).fit(
            model, random_loader(), random_loader(seed=1))
        results.append(torch.cat([p.flatten() for p in model.parameters()]))
    assert torch.equal(results[0], results[1])


def test_validation_logs_are_epoch_means_and_validate_runs_twice():
    model = BoringModel()
    t = Trainer(enable_progress_bar=False)
    loader = random_loader(n=32, batch_size=8, seed=1)
    first = t.validate(model, loader)
    second = t.validate(model, loader)
    with torch.no_grad():
        expected = torch.stack([model.loss(b) for b in loader]).mean()
    assert first == second and first[0]["val_loss"] == pytest.approx(float(expected), rel=1e-6)
    assert t.validate_loop.epoch_loop.batch_progress.total.completed == 8


def test_several_eval_dataloaders_pass_dataloader_idx():
    seen = []

    class Multi(BoringModel):
        def validation_step(self, batch, batch_idx, dataloader_idx):
            seen.append(dataloader_idx)
            self.log("val_loss", self.loss(batch))

    results = Trainer(enable_progress_bar=False).validate(
        Multi(), [random_loader(n=16, batch_size=8), random_loader(n=8, batch_size=8)])
    assert seen == [0, 0, 1]
    assert list(results[0]) == ["val_loss/dataloader_idx_0"] and list(results[1]) == ["val_loss/dataloader_idx_1"]


def test_limit_val_batches_zero_disables_validation():
    _, rec = fit(max_epochs=1, limit_val_batches=0)
    assert rec.at == [] and rec.sanity == 0
