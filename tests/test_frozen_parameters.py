"""An optimizer holding frozen parameters: the compiled mode keeps the eager step (which leaves
them alone) and says why, instead of moving them with the fused update."""
import torch

from fastloop import Trainer
from fastloop.testing import BoringModel, random_loader


class FrozenFirstLayer(BoringModel):
    def __init__(self) -> None:
        super().__init__()
        self.net[0].requires_grad_(False)

    def configure_optimizers(self):
        # AdamW with weight decay would shrink the frozen weights if they were updated.
        return torch.optim.AdamW(self.parameters(), lr=0.1, weight_decay=0.5)


def fit(mode: str) -> tuple:
    torch.manual_seed(0)
    model = FrozenFirstLayer()
    frozen = model.net[0].weight.detach().clone()
    trainer = Trainer(mode=mode, max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    trainer.fit(model, random_loader(n=32, batch_size=8))
    return model, frozen, trainer


def test_frozen_parameters_in_an_optimizer_keep_the_eager_step(no_mode_override):
    eager_model, frozen, _ = fit("eager")
    model, _, trainer = fit("compiled")
    assert torch.equal(model.net[0].weight, frozen)  # not moved by weight decay
    for a, b in zip(model.parameters(), eager_model.parameters()):
        assert torch.equal(a, b)
    assert "optimizer 0 holds frozen parameters (requires_grad=False: net.0.weight, net.0.bias)" in trainer.explain()
