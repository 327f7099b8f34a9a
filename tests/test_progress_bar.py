"""TQDMProgressBar: lines on a plain stream, redraws on a terminal, the loss it shows, host
syncs only at refresh points, copying, and closing on errors."""
import copy
import io
import math
import pickle
import re
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastloop import Module, Trainer
from fastloop.callback import Callback
from fastloop.callbacks.progress import ProgressBar, TQDMProgressBar
from fastloop.callbacks.progress_lines import plain_line, postfix_text


class TTYStream(io.StringIO):
    """A StringIO that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class CountingLoss(Module):
    """``training_step`` returns 1, 2, 3, ... in call order (the parameter makes it differentiable);
    validation logs the mean of its batch values to the progress bar."""

    def __init__(self, fail_at_call: int = 0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.calls = 0
        self.fail_at_call = fail_at_call

    def training_step(self, batch, batch_idx):
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise RuntimeError("boom")
        return self.w * 0 + float(self.calls)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.log("val_metric", batch[0].mean(), prog_bar=True)

    def test_step(self, batch, batch_idx):
        self.log("test_metric", batch[0].mean())

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return batch[0]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(values):
    return DataLoader(TensorDataset(torch.tensor(values, dtype=torch.float32).unsqueeze(1)), batch_size=1)


def batches(n):
    return loader([float(i) for i in range(n)])


def trainer(bar, **kwargs):
    kwargs.setdefault("max_epochs", 2)
    kwargs.setdefault("logger", False)
    kwargs.setdefault("num_sanity_val_steps", 0)
    return Trainer(callbacks=[*kwargs.pop("callbacks", []), bar], enable_model_summary=False,
                   enable_checkpointing=False, **kwargs)


def lines(stream):
    """The written lines with the timing part (``[00:00, 12.34it/s, ``) cut to ``[``."""
    text = stream.getvalue()
    assert text.endswith("\n")
    return [re.sub(r"\[\d\d:\d\d, (?:\d+\.\d\d(?:it/s|s/it)|\?it/s)(?:, )?", "[", line) for line in text.splitlines()]


def draws(stream, prefix):
    """The bar texts a terminal stream received that start with ``prefix`` (one per redraw)."""
    return [part for part in re.split(r"[\r\n]", stream.getvalue()) if part.startswith(prefix)]


# ----------------------------------------------------------------------- plain streams
def test_plain_stream_prints_one_line_per_epoch_with_the_running_mean_loss():
    stream = io.StringIO()
    trainer(ProgressBar(refresh_rate=4, stream=stream)).fit(CountingLoss(), batches(6))
    # losses 1..6 then 7..12: the mean of all so far (fewer than the 20-loss window)
    assert lines(stream) == ["Epoch 0: 100%| 6/6 [loss=3.5]", "Epoch 1: 100%| 6/6 [loss=6.5]"]


def test_loss_is_the_mean_of_the_last_20_losses_times_accumulation():
    stream = io.StringIO()
    trainer(ProgressBar(stream=stream), max_epochs=3).fit(CountingLoss(), batches(8))
    # after 24 losses the window holds 5..24
    assert lines(stream)[-1] == f"Epoch 2: 100%| 8/8 [loss={sum(range(5, 25)) / 20:.3g}]"

    stream = io.StringIO()
    trainer(ProgressBar(stream=stream), max_epochs=1, accumulate_grad_batches=2).fit(CountingLoss(), batches(4))
    assert lines(stream) == ["Epoch 0: 100%| 4/4 [loss=2.5]"]  # returned losses 1..4, not halved


def test_plain_stream_lines_for_validation_sanity_test_and_predict():
    stream = io.StringIO()
    t = trainer(ProgressBar(stream=stream), num_sanity_val_steps=1)
    model = CountingLoss()
    t.fit(model, batches(6), loader([2.0, 4.0]))
    assert lines(stream) == [
        "Sanity Checking DataLoader 0: 100%| 1/1 []",
        "Validation DataLoader 0: 100%| 2/2 []",
        "Epoch 0: 100%| 8/8 [loss=3.5, val_metric=3.000]",
        "Validation DataLoader 0: 100%| 2/2 []",
        "Epoch 1: 100%| 8/8 [loss=6.5, val_metric=3.000]",
    ]
    stream.seek(0)
    stream.truncate()
    t.validate(model, [loader([1.0, 2.0]), loader([1.0, 2.0, 3.0])])
    t.test(model, batches(3))
    t.predict(model, batches(2))
    assert lines(stream) == [
        "Validation DataLoader 0: 100%| 2/2 []",
        "Validation DataLoader 1: 100%| 3/3 []",
        "Testing DataLoader 0: 100%| 3/3 []",
        "Predicting DataLoader 0: 100%| 2/2 []",
    ]


def test_main_bar_total_counts_the_validation_runs_due_in_the_epoch():
    stream = io.StringIO()
    seen = []

    class Totals(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append((bar.total_train_batches, bar.total_val_batches, bar.total_batches_current_epoch))

    bar = ProgressBar(stream=stream)
    trainer(bar, callbacks=[Totals()], check_val_every_n_epoch=2).fit(CountingLoss(), batches(6), loader([1.0, 2.0]))
    assert seen == [(6, 0, 6), (6, 2, 8)]
    assert [line for line in lines(stream) if line.startswith("Epoch")] == [
        "Epoch 0: 100%| 6/6 [loss=3.5]", "Epoch 1: 100%| 8/8 [loss=6.5, val_metric=1.500]"]

    stream = io.StringIO()
    trainer(ProgressBar(stream=stream), max_epochs=1, val_check_interval=3).fit(
        CountingLoss(), batches(6), loader([1.0, 2.0]))
    assert lines(stream)[-1] == "Epoch 0: 100%| 10/10 [loss=3.5, val_metric=1.500]"


def test_line_format_and_postfix_values():
    assert plain_line("Epoch 3", 32, 32, 2.0, "loss=0.231") == "Epoch 3: 100%| 32/32 [00:02, 16.00it/s, loss=0.231]"
    assert plain_line("Predicting", 3, None, 6.0, "") == "Predicting: 3 [00:06, 2.00s/it]"
    assert postfix_text({"loss": "0.5", "v_num": 3, "acc": 0.25, "big": 1234.5, "tiny": 1e-5, "x": float("nan")}) == (
        "loss=0.5, v_num=3, acc=0.250, big=1.23e+03, tiny=1e-05, x=nan")


# --------------------------------------------------------------------------- terminals
def test_terminal_redraws_at_most_once_per_refresh_window_and_shows_the_loss_then():
    stream = TTYStream()
    trainer(ProgressBar(refresh_rate=3, stream=stream), max_epochs=3).fit(CountingLoss(), batches(7))
    epoch0 = draws(stream, "Epoch 0:")
    assert len(epoch0) == math.ceil(7 / 3) + 1 == len(draws(stream, "Epoch 1:"))
    shown = [(re.search(r"\| (\d+)/7 ", d).group(1), re.search(r"loss=([\d.]+)", d)) for d in epoch0]
    assert [(n, m.group(1) if m else None) for n, m in shown] == [("0", None), ("3", "2"), ("6", "3.5"), ("7", "4")]
    # The rate reads "s/it" when a step takes over a second (a compile on a busy machine).
    assert re.search(r"\| 7/7 \[.*(it/s|s/it), loss=11.5\]$", draws(stream, "Epoch 2:")[-1])  # mean of 2..21
    assert stream.getvalue().endswith("\n")  # closed: the cursor is on a fresh line


def test_terminal_redraws_with_validation_fit_the_same_bound():
    stream = TTYStream()
    trainer(ProgressBar(refresh_rate=3, stream=stream)).fit(CountingLoss(), batches(7), loader([1.0, 2.0]))
    epoch0 = draws(stream, "Epoch 0:")
    assert len(epoch0) <= math.ceil(9 / 3) + 1
    assert epoch0[-1].startswith("Epoch 0: 100%|") and "9/9" in epoch0[-1] and "val_metric=1.500" in epoch0[-1]
    assert draws(stream, "Validation DataLoader 0: 100%")


def test_refresh_rate_zero_or_disable_draws_nothing():
    for bar in (ProgressBar(refresh_rate=0, stream=TTYStream()), ProgressBar(stream=TTYStream())):
        if bar.refresh_rate:
            bar.disable()
        assert not bar.is_enabled and bar.is_disabled
        trainer(bar).fit(CountingLoss(), batches(3), loader([1.0]))
        assert bar.stream.getvalue() == ""
    bar.enable()
    assert bar.is_enabled


# ------------------------------------------------------------------------- host syncs
SYNC_METHODS = ("item", "__float__", "__int__", "__bool__", "__format__", "tolist")


@pytest.mark.parametrize("stream_type", [TTYStream, io.StringIO])
def test_values_are_read_only_at_refresh_points(monkeypatch, stream_type):
    where = {"at": None}
    syncs = []

    class Position(Callback):  # runs before the bar: says which batch the bar is handling
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            where["at"] = batch_idx

        def on_train_epoch_end(self, trainer, pl_module):
            where["at"] = "epoch_end"

    for name in SYNC_METHODS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            if sys._getframe(1).f_code.co_filename.endswith("progress.py"):
                syncs.append(where["at"])
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)

    class LogsToBar(CountingLoss):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("shown", loss.detach(), prog_bar=True)
            return loss

    trainer(ProgressBar(refresh_rate=4, stream=stream_type()), max_epochs=1,
            callbacks=[Position()]).fit(LogsToBar(), batches(10))
    refresh_points = [3, 7, 9] if stream_type is TTYStream else []  # batches 4, 8 and the last
    # one read of the loss and one of the logged value per refresh point, and at the epoch end
    assert syncs == [at for at in refresh_points + ["epoch_end"] for _ in range(2)]


# ----------------------------------------------------------------------------- metrics
def test_get_metrics_override_and_logger_version():
    class OnlyCalls(ProgressBar):
        def get_metrics(self, trainer, pl_module):
            return {"calls": pl_module.calls}

    stream = io.StringIO()
    trainer(OnlyCalls(stream=stream), max_epochs=1).fit(CountingLoss(), batches(3))
    assert lines(stream) == ["Epoch 0: 100%| 3/3 [calls=3]"]

    stream = io.StringIO()
    bar = ProgressBar(stream=stream)
    t = trainer(bar, max_epochs=1, logger=True)
    t.fit(CountingLoss(), batches(3))
    assert t.logger is not None and lines(stream) == [f"Epoch 0: 100%| 3/3 [loss=2, v_num={t.logger.version}]"]
    assert bar.get_metrics(t, t.lightning_module) == {"loss": "2", "v_num": t.logger.version}


def test_manual_optimization_shows_no_loss():
    class Manual(CountingLoss):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(super().training_step(batch, batch_idx))
            opt.step()

    stream = io.StringIO()
    trainer(ProgressBar(stream=stream), max_epochs=1).fit(Manual(), batches(2))
    assert lines(stream) == ["Epoch 0: 100%| 2/2 []"]


# ------------------------------------------------------------------ copying and errors
def test_deepcopy_and_pickle_before_during_and_after_a_run():
    bar = ProgressBar(refresh_rate=2, stream=TTYStream())
    copies = []

    class CopyMidRun(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 1:
                copies.append(copy.deepcopy(bar))
                copies.append(pickle.loads(pickle.dumps(bar)))

    copies += [copy.deepcopy(bar), pickle.loads(pickle.dumps(bar))]
    trainer(bar, callbacks=[CopyMidRun()], max_epochs=1).fit(CountingLoss(), batches(4))
    assert bar._main_progress_bar is not None and bar._trainer is not None  # live state to drop
    copies += [copy.deepcopy(bar), pickle.loads(pickle.dumps(bar))]
    assert len(copies) == 6
    for twin in copies:
        assert twin.refresh_rate == 2 and twin._main_progress_bar is None and twin._trainer is None
        assert not twin._losses and twin.stream is not bar.stream and isinstance(twin.stream, TTYStream)
    twin = copies[-2]
    twin._stream = io.StringIO()
    trainer(twin, max_epochs=1).fit(CountingLoss(), batches(2))  # a copy runs on its own
    assert lines(twin.stream) == ["Epoch 0: 100%| 2/2 [loss=1.5]"]

    terminal = pickle.loads(pickle.dumps(ProgressBar(stream=sys.stderr)))
    assert terminal._stream is None and terminal.stream is sys.stderr


@pytest.mark.parametrize("stream_type", [TTYStream, io.StringIO])
def test_bars_are_closed_on_an_exception(stream_type):
    stream = stream_type()
    bar = ProgressBar(refresh_rate=2, stream=stream)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(bar).fit(CountingLoss(fail_at_call=4), batches(6))
    assert bar.main_progress_bar.disable and stream.getvalue().endswith("\n")
    if stream_type is io.StringIO:
        assert lines(stream) == ["Epoch 0:  50%| 3/6 []"]  # where it stopped
    else:
        *_, refreshed, closed = draws(stream, "Epoch 0:")
        assert re.match(r"Epoch 0:  33%\|.*\| 2/6 .*loss=1.5\]$", refreshed)  # last refresh: batch 2
        assert re.match(r"Epoch 0:  50%\|.*\| 3/6 ", closed)  # closed where it stopped


def test_arguments_and_defaults():
    assert ProgressBar is TQDMProgressBar
    bar = ProgressBar()
    assert (bar.refresh_rate, bar.process_position, bar.stream) == (20, 0, sys.stderr)
    with pytest.raises(ValueError, match="refresh_rate must be an int >= 0, got -1"):
        ProgressBar(refresh_rate=-1)
    with pytest.raises(ValueError, match="process_position must be an int >= 0, got 1.5"):
        ProgressBar(process_position=1.5)
    with pytest.raises(TypeError, match="trainer is not set"):
        bar.trainer
    with pytest.raises(TypeError, match="_main_progress_bar is not set"):
        bar.main_progress_bar
    assert sum(isinstance(cb, ProgressBar) for cb in Trainer(logger=False).callbacks) == 1


@pytest.mark.parametrize("stream_type", [TTYStream, io.StringIO])
def test_module_print_goes_to_stdout_around_the_bars(capsys, stream_type):
    class Printing(CountingLoss):
        def training_step(self, batch, batch_idx):
            self.print("step", batch_idx, end="!\n")
            return super().training_step(batch, batch_idx)

    stream = stream_type()
    trainer(ProgressBar(stream=stream), max_epochs=1).fit(Printing(), batches(2))
    assert capsys.readouterr().out == "step 0!\nstep 1!\n"
    assert "step" not in stream.getvalue()


def test_every_optimizers_loss_enters_the_running_mean():
    class TwoOptimizers(CountingLoss):
        def training_step(self, batch, batch_idx, optimizer_idx):
            return super().training_step(batch, batch_idx)

        def configure_optimizers(self):
            return [torch.optim.SGD(self.parameters(), lr=0.1), torch.optim.SGD(self.parameters(), lr=0.1)]

    stream = io.StringIO()
    trainer(ProgressBar(stream=stream), max_epochs=1).fit(TwoOptimizers(), batches(2))
    assert lines(stream) == ["Epoch 0: 100%| 2/2 [loss=2.5]"]  # losses 1, 2 (batch 0) and 3, 4 (batch 1)
