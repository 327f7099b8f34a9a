"""A layer frozen mid-run without a callback (``requires_grad_(False)`` in a module hook): the
fused step, built for the old flags, would keep moving it (weight decay). The optimizer loop
compares the flags at each epoch start and rebuilds the step, which then runs eagerly with the
reason, and ``explain()`` says when and what changed."""
import pytest
import torch

from fastloop import Trainer
from fastloop.testing import BoringModel, random_loader

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


class FreezesAtEpochOne(BoringModel):
    def __init__(self):
        super().__init__()
        self.frozen_at = None

    def configure_optimizers(self):
        # AdamW with weight decay would shrink the frozen weights if they were updated.
        return torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=0.5)

    def on_train_epoch_start(self):
        if self.current_epoch == 1:
            self.net[0].requires_grad_(False)
            self.frozen_at = self.net[0].weight.detach().clone()


def fit(mode):
    torch.manual_seed(0)
    model = FreezesAtEpochOne()
    trainer = Trainer(mode=mode, max_epochs=2, num_sanity_val_steps=0, limit_val_batches=0, **QUIET)
    trainer.fit(model, random_loader(n=32, batch_size=8))
    return model, trainer


def test_eager_mode_leaves_frozen_layers_alone():
    model, trainer = fit("eager")
    assert torch.equal(model.net[0].weight, model.frozen_at)
    assert "rebuilt" not in trainer.explain()


@pytest.mark.compile
def test_freezing_mid_run_rebuilds_the_fused_step_and_says_why(no_mode_override):
    with pytest.warns(RuntimeWarning, match="runs eagerly: optimizer 0 holds frozen parameters"):
        model, trainer = fit("compiled")
    assert torch.equal(model.net[0].weight, model.frozen_at)  # not moved by weight decay after the freeze
    explained = trainer.explain()
    assert "rebuilt: at epoch 1: requires_grad changed (net.0.weight frozen, net.0.bias frozen) since the step was built" in explained
    assert ("fallback: optimizer 0 holds frozen parameters (requires_grad=False: net.0.weight, net.0.bias)"
            in explained)
    reference, eager = fit("eager")
    assert trainer.global_step == eager.global_step == 8
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)  # epoch 0 ran fused
