"""Finetuning strategies (Flash's no_freeze / freeze / freeze_unfreeze) on a module with a backbone."""
import pytest
import torch
from torch import nn

from fastloop import Callback, Module, Trainer
from fastloop.callbacks.finetuning import FreezeUnfreeze, finetune, finetuning_callback
from fastloop.testing import BoringModel, random_loader


class WithBackbone(Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.backbone(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def fit(strategy, mode=None, epochs=2):
    model = WithBackbone()
    before = {k: v.clone() for k, v in model.named_parameters()}
    kwargs = {"mode": mode} if mode else {}
    trainer = Trainer(max_epochs=epochs, enable_progress_bar=False, logger=False, enable_checkpointing=False,
                      enable_model_summary=False, **kwargs)
    finetune(trainer, model, random_loader(), strategy=strategy)
    changed = {k for k, v in model.named_parameters() if not torch.equal(before[k], v)}
    return trainer, model, changed


def test_no_freeze_trains_everything():
    _, _, changed = fit("no_freeze")
    assert changed == {"backbone.0.weight", "backbone.0.bias", "backbone.1.weight", "backbone.1.bias",
                       "head.weight", "head.bias"}


def test_freeze_keeps_the_backbone_but_not_its_batchnorm():
    trainer, model, changed = fit("freeze")
    assert changed == {"backbone.1.weight", "backbone.1.bias", "head.weight", "head.bias"}
    assert len(trainer.optimizers[0].param_groups[0]["params"]) == 4


def test_freeze_unfreeze_adds_the_backbone_at_its_epoch_with_a_tenth_of_the_lr():
    seen = []

    class Watch(Callback):
        def on_train_epoch_end(self, trainer, module):
            seen.append((trainer.current_epoch, module.backbone[0].weight.clone()))

    model = WithBackbone()
    initial = model.backbone[0].weight.clone()
    trainer = Trainer(max_epochs=3, enable_progress_bar=False, logger=False, enable_checkpointing=False,
                      enable_model_summary=False, callbacks=[Watch()])
    finetune(trainer, model, random_loader(), strategy=("freeze_unfreeze", 1))
    assert [epoch for epoch, _ in seen] == [0, 1, 2] and torch.equal(seen[0][1], initial)  # frozen in epoch 0
    assert not torch.equal(seen[0][1], seen[1][1]) and not torch.equal(seen[1][1], seen[2][1])
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(0.01)
    assert {id(p) for p in groups[1]["params"]} == {id(model.backbone[0].weight), id(model.backbone[0].bias)}


def test_freeze_unfreeze_does_not_move_the_backbone_before_its_epoch():
    _, model, changed = fit(FreezeUnfreeze(unfreeze_epoch=5))
    assert "backbone.0.weight" not in changed and "head.weight" in changed


def test_strategy_errors():
    with pytest.raises(ValueError, match="unknown finetuning strategy 'thaw'; choose one of no_freeze, freeze"):
        finetuning_callback("thaw")
    with pytest.raises(AttributeError, match="strategy 'freeze' needs a `backbone` submodule on BoringModel"):
        finetune(Trainer(max_epochs=1, enable_progress_bar=False, logger=False), BoringModel(), random_loader(),
                 strategy="freeze")
    with pytest.raises(ValueError, match=r"unfreeze_epoch=-1\): expected an int >= 0"):
        FreezeUnfreeze(-1)


@pytest.mark.usefixtures("no_mode_override")
def test_fused_modes_reject_what_they_cannot_follow_before_the_first_step():
    with pytest.raises(ValueError, match="'freeze_unfreeze' adds a param group at epoch 1, which the fused step "
                                         "\\(mode 'compiled'\\) cannot follow"):
        fit(("freeze_unfreeze", 1), mode="compiled")

    class AllParams(WithBackbone):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = Trainer(max_epochs=1, mode="compiled", enable_progress_bar=False, logger=False)
    with pytest.raises(ValueError, match="optimizer 0 holds 2 frozen parameters, which the fused step"):
        finetune(trainer, AllParams(), random_loader(), strategy="freeze")
    assert trainer.global_step == 0


def test_freeze_unfreeze_resumes_after_its_epoch_as_an_uninterrupted_fit(tmp_path):
    """The checkpoint's optimizer has the backbone's group; the resumed configure_optimizers has not:
    the callback puts the group back (unfrozen) before the optimizer state is restored."""
    from fastloop.callbacks import ModelCheckpoint

    def run(epochs, ckpt_path=None, save=False):
        torch.manual_seed(0)
        model = WithBackbone()
        callbacks = [ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)] if save else []
        trainer = Trainer(max_epochs=epochs, enable_progress_bar=False, logger=False, enable_model_summary=False,
                          enable_checkpointing=save, callbacks=callbacks)
        torch.manual_seed(1)
        finetune(trainer, model, random_loader(), strategy=("freeze_unfreeze", 1), ckpt_path=ckpt_path)
        return trainer, model

    _, reference = run(3)
    run(2, save=True)  # stops after the unfreeze epoch
    trainer, resumed = run(3, ckpt_path=str(tmp_path / "last.ckpt"))
    assert len(trainer.optimizers[0].param_groups) == 2
    for (name, a), b in zip(reference.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
