"""Progress counters after complete and interrupted runs (Lightning 1.6+ semantics)."""
import pytest
import torch

from fastloop import Callback, Trainer
from fastloop.testing import BoringModel, random_loader
from tests.test_optimization import TwoOptimizerModel


class Snapshot(Callback):
    """Keeps the fit loop's state dict as it is in the last epoch's ``on_train_epoch_end``."""

    def on_train_epoch_end(self, trainer, pl_module):
        self.state = trainer.fit_loop.state_dict()


@pytest.mark.parametrize("n_opt", [1, 2])
def test_counters_of_a_complete_run(n_opt):
    model = BoringModel() if n_opt == 1 else TwoOptimizerModel()
    snap = Snapshot()
    t = Trainer(max_epochs=3, callbacks=[snap], enable_progress_bar=False, num_sanity_val_steps=0)
    t.fit(model, random_loader(n=48, batch_size=16))
    s = snap.state
    assert s["epoch_progress"]["total"] == {"ready": 3, "started": 3, "processed": 3, "completed": 2}
    assert s["epoch_loop.batch_progress"]["total"] == {"ready": 9, "started": 9, "processed": 9, "completed": 9}
    assert s["epoch_loop.batch_progress"]["current"] == {"ready": 3, "started": 3, "processed": 3, "completed": 3}
    assert s["epoch_loop.batch_progress"]["is_last_batch"] is True
    optim = s["epoch_loop.batch_loop.optimizer_loop.optim_progress"]
    assert optim["optimizer"]["step"]["total"] == {"ready": 9 * n_opt, "completed": 9 * n_opt}
    assert optim["optimizer"]["step"]["current"] == {"ready": 3 * n_opt, "completed": 3 * n_opt}
    assert optim["optimizer"]["zero_grad"]["total"] == {"ready": 9 * n_opt, "started": 9 * n_opt,
                                                       "completed": 9 * n_opt}
    assert optim["optimizer_position"] == n_opt
    assert s["epoch_loop.batch_loop.manual_loop.optim_step_progress"]["total"] == {"ready": 0, "completed": 0}
    assert t.current_epoch == 3 and t.global_step == 9 * n_opt


def test_counters_of_an_interrupted_run():
    class Crash(BoringModel):
        def training_step(self, batch, batch_idx):
            if self.current_epoch == 1 and batch_idx == 1:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    t = Trainer(max_epochs=3, enable_progress_bar=False, num_sanity_val_steps=0)
    with pytest.raises(RuntimeError, match="boom"):
        t.fit(Crash(), random_loader(n=48, batch_size=16))
    fit = t.fit_loop
    assert fit.epoch_progress.total.state_dict() == {"ready": 2, "started": 2, "processed": 1, "completed": 1}
    batch = fit.epoch_loop.batch_progress
    assert batch.total.state_dict() == {"ready": 5, "started": 5, "processed": 4, "completed": 4}
    assert batch.current.state_dict() == {"ready": 2, "started": 2, "processed": 1, "completed": 1}
    step = fit.epoch_loop.batch_loop.optimizer_loop.optim_progress.optimizer.step
    assert step.total.state_dict() == {"ready": 5, "completed": 4}  # the crash was inside optimizer_step
    assert t.global_step == 4 and t.current_epoch == 1


def test_repeated_fit_does_nothing_once_max_epochs_is_reached():
    model = BoringModel()
    t = Trainer(max_epochs=1, enable_progress_bar=False)
    t.fit(model, random_loader())
    before = [p.clone() for p in model.parameters()]
    t.fit(model, random_loader())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert t.global_step == 4
