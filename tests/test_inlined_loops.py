"""The built-in ``TrainingBatchLoop`` and ``OptimizerLoop`` write ``Loop.run`` out inline (they run
once per batch). A trivial subclass of each runs the generic skeleton instead, so fitting with
and without such subclasses must give the same calls, counters, outputs, parameters and state."""
from typing import Any, List

import pytest
import torch
from torch import nn

from fastloop import Callback, Trainer
from fastloop.loops import OptimizerLoop, TrainingBatchLoop
from fastloop.testing import BoringModel, random_loader


class GenericBatchLoop(TrainingBatchLoop):
    """Not the exact built-in class: runs ``Loop.run``."""


class GenericOptimizerLoop(OptimizerLoop):
    """Not the exact built-in class: runs ``Loop.run``."""


def counters(trainer: Trainer) -> Any:
    epoch_loop = trainer.fit_loop.epoch_loop
    optimizer_loop = epoch_loop.batch_loop.optimizer_loop
    return (epoch_loop.batch_progress.state_dict(), optimizer_loop.optim_progress.state_dict(),
            trainer.global_step)


class Recorder(Callback):
    """Hook calls with the counters each hook saw, and every batch's outputs."""

    def __init__(self) -> None:
        self.events: List[Any] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.events.append(("batch_start", batch_idx, counters(trainer)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.events.append(("batch_end", batch_idx, counters(trainer), repr(outputs)))


class TwoOptimizers(BoringModel):
    """Each optimizer owns one layer; training_step records what it saw of the loop's state."""

    def __init__(self, frequencies: bool = False, skip_batch: int = -1, fail_batch: int = -1) -> None:
        super().__init__()
        self.frequencies = frequencies
        self.skip_batch = skip_batch
        self.fail_batch = fail_batch
        self.seen: List[Any] = []

    def training_step(self, batch, batch_idx, optimizer_idx):
        loop = self.trainer.fit_loop.epoch_loop.batch_loop.optimizer_loop
        self.seen.append((batch_idx, optimizer_idx, loop.optimizer_idx, counters(self.trainer)))
        if batch_idx == self.fail_batch and optimizer_idx == 1:
            raise RuntimeError("failing on purpose")
        if batch_idx == self.skip_batch and optimizer_idx == 0:
            return None
        return {"loss": self.loss(batch), "seen": len(self.seen)}

    def configure_optimizers(self):
        first = torch.optim.SGD(self.net[0].parameters(), lr=0.1)
        second = torch.optim.Adam(self.net[2].parameters(), lr=0.01)
        if self.frequencies:
            return [{"optimizer": first, "frequency": 2}, {"optimizer": second, "frequency": 1}]
        return [first, second]


class OneOptimizer(TwoOptimizers):
    def training_step(self, batch, batch_idx):
        loop = self.trainer.fit_loop.epoch_loop.batch_loop.optimizer_loop
        self.seen.append((batch_idx, loop.optimizer_idx, counters(self.trainer)))
        if batch_idx == self.fail_batch:
            raise RuntimeError("failing on purpose")
        return None if batch_idx == self.skip_batch else self.loss(batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def run(model: nn.Module, generic: bool, **trainer_kwargs) -> Any:
    recorder = Recorder()
    trainer = Trainer(max_epochs=2, enable_progress_bar=False, num_sanity_val_steps=0, callbacks=[recorder],
                      **trainer_kwargs)
    if generic:
        trainer.fit_loop.epoch_loop.connect(batch_loop=GenericBatchLoop())
        trainer.fit_loop.epoch_loop.batch_loop.connect(optimizer_loop=GenericOptimizerLoop())
    error = None
    try:
        trainer.fit(model, random_loader(n=40, batch_size=8))
    except RuntimeError as exc:
        error = str(exc)
    state = trainer.fit_loop.state_dict()
    params = [p.detach().clone() for p in model.parameters()]
    return recorder.events, model.seen, state, params, error


CASES = {
    "one optimizer": (lambda: OneOptimizer(), {}),
    "one optimizer, accumulation, a skipped batch": (lambda: OneOptimizer(skip_batch=2), {"accumulate_grad_batches": 2}),
    "two optimizers": (lambda: TwoOptimizers(), {}),
    "two optimizers with frequencies and a skipped batch": (lambda: TwoOptimizers(True, skip_batch=3), {}),
    "one optimizer failing mid-epoch": (lambda: OneOptimizer(fail_batch=3), {}),
    "two optimizers failing in the second one": (lambda: TwoOptimizers(fail_batch=1), {}),
}


def assert_same_state(a: Any, b: Any, key: str = "") -> None:
    assert type(a) is type(b), key
    if isinstance(a, dict):
        assert a.keys() == b.keys(), key
        for k in a:
            assert_same_state(a[k], b[k], f"{key}.{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), key
    else:
        assert a == b, key


def fresh(make_model):
    torch.manual_seed(0)  # the same initial weights for both runs
    return make_model()


@pytest.mark.parametrize("case", list(CASES))
def test_inlined_runs_match_the_generic_skeleton(case):
    make_model, kwargs = CASES[case]
    events, seen, state, params, error = run(fresh(make_model), generic=False, **kwargs)
    expected = run(fresh(make_model), generic=True, **kwargs)
    assert events and seen
    assert events == expected[0]
    assert seen == expected[1]
    assert_same_state(state, expected[2])
    for p, q in zip(params, expected[3]):
        assert torch.equal(p, q)
    assert error == expected[4]
    assert (error is not None) == ("failing" in case)


def test_a_subclass_runs_its_own_skeleton_hooks():
    calls: List[str] = []

    class CountingOptimizerLoop(OptimizerLoop):
        def on_advance_start(self, *args):
            calls.append("optimizer_loop.on_advance_start")

    class CountingBatchLoop(TrainingBatchLoop):
        def on_run_start(self, *args):
            calls.append("batch_loop.on_run_start")

    trainer = Trainer(max_epochs=1, limit_train_batches=3, enable_progress_bar=False, num_sanity_val_steps=0)
    trainer.fit_loop.epoch_loop.connect(batch_loop=CountingBatchLoop())
    trainer.fit_loop.epoch_loop.batch_loop.connect(optimizer_loop=CountingOptimizerLoop())
    trainer.fit(BoringModel(), random_loader(n=48, batch_size=16))
    assert calls == ["batch_loop.on_run_start", "optimizer_loop.on_advance_start"] * 3


def test_active_optimizers_follow_a_replaced_optimizer_list():
    trainer = Trainer(enable_progress_bar=False)
    first, second = (torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1) for _ in range(2))
    trainer.optimizers = [first]
    assert trainer.active_optimizers(0) == ((0, first),)
    trainer.optimizers.append(second)  # changed in place: seen at the next batch
    assert trainer.active_optimizers(1) == ((0, first), (1, second))
    trainer.optimizers = [first, second]
    assert trainer.active_optimizers(5) == ((0, first), (1, second))
    trainer.optimizer_frequencies = [1, 2]
    assert [trainer.active_optimizers(i) for i in range(3)] == [((0, first),), ((1, second),), ((1, second),)]
