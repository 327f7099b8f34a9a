"""LearningRateMonitor: metric names, values and steps sent to the loggers, each equal to what
Lightning 1.9.5 sends for the same run (4 training batches per epoch, StepLR halving the rate
at each scheduler step)."""
from typing import Any, Callable

import pytest
import torch
from torch import nn

from fastloop import Module
from fastloop.callbacks.lr_monitor import LearningRateMonitor
from tests.callback_helpers import RecordingLogger, loaders, make_trainer


class TwoLayers(Module):
    """Two linear layers trained with the optimizers ``configure(self)`` returns."""

    def __init__(self, configure: Callable[["TwoLayers"], Any]) -> None:
        super().__init__()
        self.a = nn.Linear(32, 10)
        self.b = nn.Linear(32, 10)
        self.configure = configure

    def training_step(self, batch: Any, batch_idx: int, optimizer_idx: int = 0) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.a(x) + self.b(x), y)

    def configure_optimizers(self) -> Any:
        return self.configure(self)


def halving(optimizer, **config):
    return {"scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5), **config}


def sgd_epoch_scheduler(m):
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    return [opt], [halving(opt)]


def sgd_step_scheduler(m):
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    return [opt], [halving(opt, interval="step")]


def monitor_lrs(configure, monitor=None, prefix="lr-", **trainer_kwargs):
    """Fit with a LearningRateMonitor; the ``lr-`` calls the logger received, and the monitor."""
    logger = RecordingLogger()
    monitor = monitor or LearningRateMonitor()
    make_trainer([monitor], logger=logger, **trainer_kwargs).fit(TwoLayers(configure), loaders()[0])
    return logger.logged(prefix), monitor


def test_epoch_scheduler_logs_at_each_epoch_start():
    calls, monitor = monitor_lrs(sgd_epoch_scheduler, max_epochs=3)
    assert calls == [({"lr-SGD": 0.1}, 0), ({"lr-SGD": 0.05}, 4), ({"lr-SGD": 0.025}, 8)]
    assert monitor.lrs == {"lr-SGD": [0.1, 0.05, 0.025]}


def test_step_scheduler_logs_the_rate_of_each_coming_step():
    calls, _ = monitor_lrs(sgd_step_scheduler, max_epochs=2, log_every_n_steps=1)
    # Before step s the scheduler has stepped s times: 0.1 * 0.5**s.
    assert calls == [({"lr-SGD": 0.1 * 0.5 ** s}, s) for s in range(8)]


def test_step_logging_follows_log_every_n_steps():
    calls, _ = monitor_lrs(sgd_step_scheduler, max_epochs=2, log_every_n_steps=3)
    assert calls == [({"lr-SGD": 0.025}, 2), ({"lr-SGD": 0.003125}, 5)]


def test_step_interval_logs_an_epoch_scheduler_at_logged_steps():
    calls, _ = monitor_lrs(sgd_epoch_scheduler, LearningRateMonitor(logging_interval="step"), max_epochs=2,
                           log_every_n_steps=2)
    assert calls == [({"lr-SGD": 0.1}, 1), ({"lr-SGD": 0.1}, 3), ({"lr-SGD": 0.05}, 5), ({"lr-SGD": 0.05}, 7)]


def test_epoch_interval_logs_a_step_scheduler_at_epoch_starts():
    calls, _ = monitor_lrs(sgd_step_scheduler, LearningRateMonitor(logging_interval="epoch"), max_epochs=2,
                           log_every_n_steps=1)
    assert calls == [({"lr-SGD": 0.1}, 0), ({"lr-SGD": 0.00625}, 4)]


def test_two_optimizers_of_one_class_are_numbered():
    def two_adams(m):
        first, second = torch.optim.Adam(m.a.parameters(), lr=0.1), torch.optim.Adam(m.b.parameters(), lr=0.2)
        return [first, second], [halving(first), {"scheduler": torch.optim.lr_scheduler.StepLR(second, 1, gamma=0.1)}]

    calls, monitor = monitor_lrs(two_adams, max_epochs=2)
    assert calls == [({"lr-Adam": 0.1, "lr-Adam-1": 0.2}, 0), ({"lr-Adam": 0.05, "lr-Adam-1": 0.2 * 0.1}, 4)]
    assert monitor.lrs == {"lr-Adam": [0.1, 0.05], "lr-Adam-1": [0.2, 0.2 * 0.1]}


def test_param_groups_and_momentum():
    def groups(m):
        opt = torch.optim.SGD([{"params": m.a.parameters()}, {"params": m.b.parameters(), "lr": 0.01}], lr=0.1,
                              momentum=0.9)
        return [opt], [halving(opt)]

    calls, monitor = monitor_lrs(groups, LearningRateMonitor(log_momentum=True), max_epochs=2)
    assert calls == [
        ({"lr-SGD/pg1": 0.1, "lr-SGD/pg1-momentum": 0.9, "lr-SGD/pg2": 0.01, "lr-SGD/pg2-momentum": 0.9}, 0),
        ({"lr-SGD/pg1": 0.05, "lr-SGD/pg1-momentum": 0.9, "lr-SGD/pg2": 0.005, "lr-SGD/pg2-momentum": 0.9}, 4),
    ]
    assert monitor.lrs == {"lr-SGD/pg1": [0.1, 0.05], "lr-SGD/pg2": [0.01, 0.005]}
    assert monitor.last_momentum_values == {"lr-SGD/pg1-momentum": 0.9, "lr-SGD/pg2-momentum": 0.9}


def test_named_param_groups_without_scheduler():
    def named(m):
        return torch.optim.SGD([{"params": m.a.parameters(), "name": "enc"},
                                {"params": m.b.parameters(), "lr": 0.01, "name": "dec"}], lr=0.1)

    calls, _ = monitor_lrs(named, max_epochs=1, log_every_n_steps=2)
    # An optimizer without scheduler is logged at epoch start and at every logged step.
    assert calls == [({"lr-SGD/enc": 0.1, "lr-SGD/dec": 0.01}, s) for s in (0, 1, 3)]

    def one_named(m):
        return torch.optim.SGD([{"params": m.parameters(), "name": "all"}], lr=0.1)

    calls, _ = monitor_lrs(one_named, max_epochs=1, log_every_n_steps=4)
    assert calls == [({"lr-SGD/all": 0.1}, 0), ({"lr-SGD/all": 0.1}, 3)]


def test_scheduler_name_and_adam_momentum():
    def named_scheduler(m):
        opt = torch.optim.Adam(m.parameters(), lr=0.1)
        return {"optimizer": opt, "lr_scheduler": halving(opt, name="my_lr")}

    calls, _ = monitor_lrs(named_scheduler, LearningRateMonitor(log_momentum=True), prefix="my_lr", max_epochs=2)
    assert calls == [({"my_lr": 0.1, "my_lr-momentum": 0.9}, 0), ({"my_lr": 0.05, "my_lr-momentum": 0.9}, 4)]


def test_optimizers_with_and_without_a_scheduler():
    def mixed(m):
        first, second = torch.optim.SGD(m.a.parameters(), lr=0.1), torch.optim.SGD(m.b.parameters(), lr=0.2)
        return [first, second], [halving(first, interval="step")]

    calls, _ = monitor_lrs(mixed, max_epochs=1, log_every_n_steps=2)
    assert calls == [({"lr-SGD-1": 0.2}, 0), ({"lr-SGD": 0.05, "lr-SGD-1": 0.2}, 1),
                     ({"lr-SGD": 0.0125, "lr-SGD-1": 0.2}, 3)]


def test_no_momentum_warns():
    def adagrad(m):
        return torch.optim.Adagrad(m.parameters(), lr=0.1)

    with pytest.warns(RuntimeWarning, match="some optimizers do not have momentum"):
        calls, _ = monitor_lrs(adagrad, LearningRateMonitor(log_momentum=True), max_epochs=1)
    assert calls[0] == ({"lr-Adagrad": 0.1, "lr-Adagrad-momentum": 0}, 0)


def test_duplicate_param_group_names_are_an_error():
    def duplicated(m):
        return torch.optim.SGD([{"params": m.a.parameters(), "name": "x"}, {"params": m.b.parameters(), "name": "x"}],
                               lr=0.1)

    with pytest.raises(ValueError, match=r"lr-SGD has duplicated parameter group names \{'x'\}"):
        monitor_lrs(duplicated, max_epochs=1)


def test_needs_a_logger():
    trainer = make_trainer([LearningRateMonitor()], max_epochs=1)
    with pytest.raises(ValueError, match="`Trainer` that has no logger"):
        trainer.fit(TwoLayers(sgd_epoch_scheduler), loaders()[0])


def test_bad_logging_interval():
    with pytest.raises(ValueError, match="logging_interval='batch'"):
        LearningRateMonitor(logging_interval="batch")
