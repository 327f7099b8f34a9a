"""From ``self.log`` to the loggers: the rows ``metrics.csv`` gets (log_every_n_steps, gradient
accumulation, mid-epoch validation), ``logger=False``, several loggers, the keys of
``logged_metrics``/``callback_metrics``/``progress_bar_metrics``, ``self.log`` options
(``logger=False``, ``reduce_fx``, ``batch_size``) and torchmetrics objects.

The expected headers, step/epoch columns, filled cells and metric keys were produced by the same
scripts under Lightning 1.9.5 (with its CSVLogger). Values are checked against losses computed here.
"""
import csv
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastloop import Module, Trainer
from fastloop.loggers import CSVLogger

QUIET = dict(enable_progress_bar=False, enable_model_summary=False)


def loader(n_batches, batch_size=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * batch_size, 4, generator=g)
    y = torch.randn(n_batches * batch_size, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def row_shapes(rows):
    """Each data row as (step, epoch, '+'-joined names of its filled metric cells)."""
    header = rows[0]
    metrics = [h for h in header if h not in ("step", "epoch")]
    return [(int(r[header.index("step")]), int(r[header.index("epoch")]),
             "+".join(m for m in metrics if r[header.index(m)] != "")) for r in rows[1:]]


def files_under(root="."):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names)


class StepAndEpoch(Module):
    """Logs ``loss`` on step and on epoch (progress bar), ``val_loss`` and ``test_loss``;
    remembers every training loss and each validation run's losses."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.train_losses = []
        self.val_runs = []

    def loss(self, batch):
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.train_losses.append(loss.detach())
        self.log("loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def on_validation_epoch_start(self):
        if not self.trainer.sanity_checking:
            self.val_runs.append([])

    def validation_step(self, batch, batch_idx):
        loss = self.loss(batch)
        if not self.trainer.sanity_checking:
            self.val_runs[-1].append(loss)
        self.log("val_loss", loss, prog_bar=True)

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self.loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_step_and_epoch(**kwargs):
    model = StepAndEpoch()
    trainer = Trainer(max_epochs=2, enable_checkpointing=False, **QUIET, **kwargs)
    trainer.fit(model, loader(5), loader(2, seed=1))
    return model, trainer


HEADER = ["loss_step", "epoch", "step", "val_loss", "loss_epoch"]
# Lightning 1.9.5's rows for 2 epochs of 5 training batches and 2 validation batches.
LIGHTNING_ROWS = {
    "every_2": (dict(log_every_n_steps=2), HEADER, [
        (1, 0, "loss_step"), (3, 0, "loss_step"), (4, 0, "val_loss"), (4, 0, "loss_epoch"), (5, 1, "loss_step"),
        (7, 1, "loss_step"), (9, 1, "loss_step"), (9, 1, "val_loss"), (9, 1, "loss_epoch")]),
    "every_3": (dict(log_every_n_steps=3), HEADER, [
        (2, 0, "loss_step"), (4, 0, "val_loss"), (4, 0, "loss_epoch"), (5, 1, "loss_step"), (8, 1, "loss_step"),
        (9, 1, "val_loss"), (9, 1, "loss_epoch")]),
    "every_1": (dict(log_every_n_steps=1), HEADER, [
        (0, 0, "loss_step"), (1, 0, "loss_step"), (2, 0, "loss_step"), (3, 0, "loss_step"), (4, 0, "loss_step"),
        (4, 0, "val_loss"), (4, 0, "loss_epoch"), (5, 1, "loss_step"), (6, 1, "loss_step"), (7, 1, "loss_step"),
        (8, 1, "loss_step"), (9, 1, "loss_step"), (9, 1, "val_loss"), (9, 1, "loss_epoch")]),
    "accumulate_2": (dict(log_every_n_steps=2, accumulate_grad_batches=2), HEADER, [
        (1, 0, "loss_step"), (2, 0, "val_loss"), (2, 0, "loss_epoch"), (3, 1, "loss_step"), (5, 1, "loss_step"),
        (5, 1, "val_loss"), (5, 1, "loss_epoch")]),
    "val_check_half": (dict(log_every_n_steps=2, val_check_interval=0.5), HEADER, [
        (1, 0, "loss_step"), (1, 0, "val_loss"), (3, 0, "loss_step"), (3, 0, "val_loss"), (4, 0, "loss_epoch"),
        (5, 1, "loss_step"), (6, 1, "val_loss"), (7, 1, "loss_step"), (8, 1, "val_loss"), (9, 1, "loss_step"),
        (9, 1, "loss_epoch")]),
    "max_steps_mid_epoch": (dict(log_every_n_steps=3, max_steps=4), ["loss_step", "epoch", "step", "loss_epoch"], [
        (2, 0, "loss_step"), (3, 0, "loss_epoch")]),
}


@pytest.mark.parametrize("case", sorted(LIGHTNING_ROWS))
def test_metrics_csv_rows_as_lightning(case):
    kwargs, header, shapes = LIGHTNING_ROWS[case]
    _, trainer = fit_step_and_epoch(**kwargs)
    rows = read_csv(os.path.join(trainer.logger.log_dir, "metrics.csv"))
    assert rows[0] == header
    assert row_shapes(rows) == shapes
    assert files_under() == ["lightning_logs/version_0/hparams.yaml", "lightning_logs/version_0/metrics.csv"]


@pytest.mark.parametrize("case", ["every_2", "val_check_half"])
def test_metrics_csv_values_are_the_logged_losses(case):
    model, trainer = fit_step_and_epoch(**LIGHTNING_ROWS[case][0])
    rows = read_csv(os.path.join(trainer.logger.log_dir, "metrics.csv"))
    header = rows[0]
    losses = [float(v) for v in model.train_losses]  # one batch per step: step s ran batch s
    val_means = iter([float(torch.stack(run).mean()) for run in model.val_runs])
    for row in rows[1:]:
        cell = dict(zip(header, row))
        step, epoch = int(cell["step"]), int(cell["epoch"])
        if cell["loss_step"]:
            assert float(cell["loss_step"]) == losses[step]
        if cell["loss_epoch"]:
            assert float(cell["loss_epoch"]) == pytest.approx(sum(losses[5 * epoch:5 * epoch + 5]) / 5, rel=1e-6)
        if cell["val_loss"]:
            assert float(cell["val_loss"]) == pytest.approx(next(val_means), rel=1e-6)
    assert next(val_means, None) is None  # every validation run has its row


def test_metric_keys_after_fit_validate_and_test_as_lightning():
    model, trainer = fit_step_and_epoch(log_every_n_steps=2)
    assert sorted(trainer.callback_metrics) == ["loss", "loss_epoch", "loss_step", "val_loss"]
    assert sorted(trainer.logged_metrics) == ["loss_epoch", "loss_step", "val_loss"]
    assert sorted(trainer.progress_bar_metrics) == ["loss_epoch", "loss_step", "val_loss"]
    trainer.validate(model, loader(2, seed=1), verbose=False)
    assert sorted(trainer.callback_metrics) == sorted(trainer.logged_metrics) == ["val_loss"]
    assert sorted(trainer.progress_bar_metrics) == ["val_loss"]
    trainer.test(model, loader(2, seed=2), verbose=False)
    assert sorted(trainer.callback_metrics) == sorted(trainer.logged_metrics) == ["test_loss"]
    assert trainer.progress_bar_metrics == {}


def test_sanity_check_values_leave_the_progress_bar():
    _, trainer = fit_step_and_epoch(**LIGHTNING_ROWS["max_steps_mid_epoch"][0])  # stops before any validation
    assert sorted(trainer.callback_metrics) == ["loss", "loss_epoch", "loss_step"]
    assert sorted(trainer.progress_bar_metrics) == ["loss_epoch", "loss_step"]


def test_logger_false_writes_nothing_but_keeps_logged_metrics():
    trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, **QUIET)
    trainer.fit(StepAndEpoch(), loader(2), loader(2, seed=1))
    assert files_under() == []
    assert (trainer.logger, trainer.loggers, trainer.log_dir) == (None, [], os.getcwd())
    assert sorted(trainer.logged_metrics) == ["loss_epoch", "loss_step", "val_loss"]


# ------------------------------------------------------------------------ self.log options
class LogOptions(StepAndEpoch):
    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        i = float(batch_idx)
        self.log("hidden", i, logger=False, on_step=True, on_epoch=True, prog_bar=True)
        self.log("mx", float((batch_idx * 7) % 5), reduce_fx="max", on_step=False, on_epoch=True)
        self.log("mn", float((batch_idx * 7) % 5 + 1), reduce_fx=torch.min, on_step=False, on_epoch=True)
        self.log("sm", i, reduce_fx="sum", on_step=False, on_epoch=True)
        self.log("w", i, batch_size=batch_idx + 1, on_step=False, on_epoch=True)
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("vw", float(batch_idx), batch_size=10 * batch_idx + 1)
        self.log("vhidden", 1.0, logger=False)

    def on_train_epoch_end(self):
        self.log("ep_end", float(self.current_epoch))


OPTIONS_HEADER = ["loss", "epoch", "step", "vw", "mx", "mn", "sm", "w", "ep_end"]
OPTIONS_ROWS = [(1, 0, "loss"), (3, 0, "loss"), (4, 0, "vw"), (4, 0, "mx+mn+sm+w+ep_end"), (5, 1, "loss"),
                (7, 1, "loss"), (9, 1, "loss"), (9, 1, "vw"), (9, 1, "mx+mn+sm+w+ep_end")]


def test_log_options_logger_false_reduce_fx_and_batch_size_as_lightning():
    loggers = [CSVLogger("a"), CSVLogger("b", name="x")]
    trainer = Trainer(max_epochs=2, log_every_n_steps=2, logger=loggers, enable_checkpointing=False, **QUIET)
    trainer.fit(LogOptions(), loader(5), loader(3, seed=1))
    callback = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k != "loss"}
    # batch_idx 0..4: max of i*7%5 = 4, min of that + 1 = 1, sum = 10, sum(i*(i+1))/sum(i+1) = 40/15;
    # validation batch_idx 0..2 weighted 1, 11, 21: (11 + 42) / 33.
    assert callback == {"ep_end": 1.0, "hidden": 2.0, "hidden_epoch": 2.0, "hidden_step": 4.0, "mn": 1.0,
                        "mx": 4.0, "sm": 10.0, "vhidden": 1.0, "vw": round(53 / 33, 4), "w": round(40 / 15, 4)}
    assert sorted(trainer.logged_metrics) == ["ep_end", "loss", "mn", "mx", "sm", "vw", "w"]
    assert sorted(trainer.progress_bar_metrics) == ["hidden_epoch", "hidden_step"]
    # Both loggers get the same rows; trainer.log_dir is the first one's save_dir (Lightning's rule).
    first, second = (read_csv(os.path.join(lg.log_dir, "metrics.csv")) for lg in loggers)
    assert first == second
    assert first[0] == OPTIONS_HEADER and row_shapes(first) == OPTIONS_ROWS
    epoch_row = dict(zip(first[0], first[4]))
    assert {k: round(float(epoch_row[k]), 4) for k in ("mx", "mn", "sm", "w", "ep_end")} == {
        "mx": 4.0, "mn": 1.0, "sm": 10.0, "w": round(40 / 15, 4), "ep_end": 0.0}
    assert files_under() == ["a/lightning_logs/version_0/hparams.yaml", "a/lightning_logs/version_0/metrics.csv",
                             "b/x/version_0/hparams.yaml", "b/x/version_0/metrics.csv"]
    assert trainer.log_dir == "a"


# --------------------------------------------------------------------------- torchmetrics
torchmetrics = pytest.importorskip("torchmetrics")


class WithAccuracy(Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 4)
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=4)
        self.seen = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.layer(x)
        preds = logits.argmax(-1)
        self.seen.append((preds.detach().clone(), y.clone()))
        self.train_acc(preds, y)
        self.log("train_acc", self.train_acc, on_step=True, on_epoch=True)
        return nn.functional.cross_entropy(logits, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def classes_loader():
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(24, 4, generator=g), torch.randint(0, 4, (24,), generator=g)),
                      batch_size=5)


def accuracy(pairs):
    preds, target = (torch.cat(t) for t in zip(*pairs))
    return float((preds == target).float().mean())


def test_torchmetrics_step_and_epoch_values_and_reset():
    model = WithAccuracy()
    trainer = Trainer(max_epochs=2, log_every_n_steps=1, enable_checkpointing=False, **QUIET)
    trainer.fit(model, classes_loader())
    rows = read_csv(os.path.join(trainer.logger.log_dir, "metrics.csv"))
    assert rows[0] == ["train_acc_step", "epoch", "step", "train_acc_epoch"]
    # Lightning 1.9.5's shape: five step rows then the epoch row, per epoch.
    assert row_shapes(rows) == [(s, s // 5, "train_acc_step") for s in range(5)] + [(4, 0, "train_acc_epoch")] + [
        (s, 1, "train_acc_step") for s in range(5, 10)] + [(9, 1, "train_acc_epoch")]
    step_values = [float(r[0]) for r in rows[1:] if r[0]]
    assert step_values == pytest.approx([accuracy([pair]) for pair in model.seen], abs=1e-7)
    epoch_values = [float(r[3]) for r in rows[1:] if r[3]]
    assert epoch_values == pytest.approx([accuracy(model.seen[:5]), accuracy(model.seen[5:])], abs=1e-7)
    assert float(trainer.callback_metrics["train_acc"]) == pytest.approx(epoch_values[1], abs=1e-7)
    assert int(model.train_acc.tp.sum()) == 0  # reset at the epoch end


def test_torchmetrics_metric_makes_the_compiled_mode_fall_back_to_eager(no_mode_override):
    trainer = Trainer(mode="compiled", max_steps=1, logger=False, enable_checkpointing=False, **QUIET)
    trainer.fit(WithAccuracy(), classes_loader())
    report = trainer.explain()
    assert "torchmetrics Metric(s) train_acc" in report
