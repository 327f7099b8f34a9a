"""Lightning's own examples hand ``batch_idx`` (and a stage string) to a shared helper that never
uses it: ``training_step(self, batch, batch_idx): return self._common_step(batch, batch_idx, "train")``.
Such a step fuses, with one graph for every batch; a ``batch_idx`` that steers the computation
still runs eagerly, with the reason (the function and line that read it).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastloop import Callback, Module, Trainer
from fastloop.data import TensorLoader
from fastloop.step.build import batch_idx_blocker

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


class LitAutoEncoder(Module):
    """The shape of Lightning's autoencoder example (``_common_step`` logging ``f"{stage}_loss"``)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
        self.decoder = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 16))

    def forward(self, x):
        return self.decoder(self.encoder(x))

    def training_step(self, batch, batch_idx):
        return self._common_step(batch, batch_idx, "train")

    def validation_step(self, batch, batch_idx):
        self._common_step(batch, batch_idx, "val")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def _prepare_batch(self, batch):
        x, _ = batch
        return x.view(x.size(0), -1)

    def _common_step(self, batch, batch_idx, stage: str):
        x = self._prepare_batch(batch)
        loss = F.mse_loss(x, self(x))
        self.log(f"{stage}_loss", loss, on_step=True)
        return loss


class SteersWithBatchIdx(LitAutoEncoder):
    def _common_step(self, batch, batch_idx, stage: str):
        loss = super()._common_step(batch, batch_idx, stage)
        if batch_idx % 2:
            loss = loss * 2
        return loss


class PassesItByKeyword(LitAutoEncoder):
    def training_step(self, batch, batch_idx):
        return self._shared(batch, index=batch_idx)

    def _shared(self, batch, index):
        return self._common_step(batch, index, "train")


class ReadsARenamedIndex(LitAutoEncoder):
    def training_step(self, batch, i):
        return self._common_step(batch, i, "train") * (1 + i)


class HandsItToAFunction(LitAutoEncoder):
    def training_step(self, batch, batch_idx):
        return self._common_step(batch, batch_idx, "train") * torch.tensor(float(batch_idx))


def line_of(cls, text):
    import inspect

    lines, first = inspect.getsourcelines(cls)
    return first + next(i for i, line in enumerate(lines) if text in line)


def test_a_batch_idx_handed_on_unused_does_not_block_fusion():
    model = LitAutoEncoder()
    assert batch_idx_blocker("training_step", model.training_step) == ""
    assert batch_idx_blocker("validation_step", model.validation_step) == ""
    assert batch_idx_blocker("training_step", PassesItByKeyword().training_step) == ""


@pytest.mark.parametrize("cls, reader, text", [
    (SteersWithBatchIdx, "SteersWithBatchIdx._common_step", "if batch_idx % 2:"),
    (ReadsARenamedIndex, "ReadsARenamedIndex.training_step", 'return self._common_step(batch, i, "train") * (1 + i)'),
    (HandsItToAFunction, "HandsItToAFunction.training_step",
     'return self._common_step(batch, batch_idx, "train") * torch.tensor(float(batch_idx))'),
])
def test_a_batch_idx_that_is_read_blocks_fusion_and_says_where(cls, reader, text):
    assert batch_idx_blocker("training_step", cls().training_step) == (
        f"training_step reads batch_idx ({reader}, line {line_of(cls, text)}: {text}), a Python int that would "
        "recompile the graph every batch")


def loader():
    g = torch.Generator().manual_seed(0)
    return TensorLoader(torch.randn(48, 16, generator=g), torch.zeros(48), batch_size=8)


class GraphCounts(Callback):
    def __init__(self):
        self.counts = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.counts.append(trainer.fit_loop.epoch_loop.batch_loop.optimizer_loop.train_step.graph_count)


def fit(model, mode, callbacks=()):
    torch.manual_seed(0)
    trainer = Trainer(mode=mode, max_epochs=2, num_sanity_val_steps=0, callbacks=list(callbacks), **QUIET)
    trainer.fit(model, loader(), loader())
    return trainer


@pytest.mark.compile
def test_lightning_style_step_fuses_with_one_graph_and_matches_eager(no_mode_override):
    torch.manual_seed(0)
    model = LitAutoEncoder()
    reference = LitAutoEncoder()
    reference.load_state_dict(model.state_dict())
    counts = GraphCounts()
    trainer = fit(model, "compiled", [counts])
    report = trainer.fit_loop.epoch_loop.batch_loop.optimizer_loop.step_report
    assert (report.used, report.reasons) == ("compiled", [])
    assert counts.counts == [1] * 12  # 2 epochs x 6 batches: compiled once, never again
    val_report = trainer.fit_loop.epoch_loop.val_loop.epoch_loop.step_report
    assert (val_report.used, val_report.reasons) == ("compiled", [])
    eager = fit(reference, "eager")
    assert sorted(trainer.callback_metrics) == sorted(eager.callback_metrics) == [
        "train_loss", "val_loss", "val_loss_epoch"]
    # The fused graph reorders fp32 arithmetic (see tests/test_compiled_parity.py for the tolerance).
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert trainer.global_step == eager.global_step == 12


def test_a_steering_batch_idx_runs_eagerly_with_the_reason(no_mode_override):
    model = SteersWithBatchIdx()
    reference = SteersWithBatchIdx()
    reference.load_state_dict(model.state_dict())
    with pytest.warns(RuntimeWarning, match="runs eagerly: training_step reads batch_idx"):
        trainer = fit(model, "compiled")
    line = line_of(SteersWithBatchIdx, "if batch_idx % 2:")
    assert (f"fallback: training_step reads batch_idx (SteersWithBatchIdx._common_step, line {line}: "
            "if batch_idx % 2:)") in trainer.explain()
    fit(reference, "eager")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
