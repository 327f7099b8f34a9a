"""The Loop base class: run skeleton, skip/done/StopIteration, wiring, restarting and state."""
from typing import List

import pytest

from fastloop import Trainer
from fastloop.loops import Loop, Progress


class CountingLoop(Loop):
    """Counts to ``limit``, logging every skeleton call with its arguments."""

    def __init__(self, limit: int = 3, stop_at: int = -1) -> None:
        super().__init__()
        self.limit = limit
        self.stop_at = stop_at
        self.calls: List[str] = []
        self.iteration = 0
        self.progress = Progress()

    @property
    def done(self) -> bool:
        return self.iteration >= self.limit

    def reset(self) -> None:
        self.calls.append("reset")
        if not self.restarting:
            self.iteration = 0

    def on_run_start(self, *args, **kwargs):
        self.calls.append(f"on_run_start{args}{kwargs}")

    def on_advance_start(self, *args, **kwargs):
        self.calls.append(f"on_advance_start{args}")

    def advance(self, *args, **kwargs):
        if self.iteration == self.stop_at:
            raise StopIteration
        self.calls.append(f"advance{args}")
        self.iteration += 1
        self.progress.increment_completed()

    def on_advance_end(self, *args):
        assert args == ()
        self.calls.append("on_advance_end")

    def on_run_end(self):
        self.calls.append("on_run_end")
        return self.iteration


def test_run_skeleton_order_and_arguments():
    loop = CountingLoop()
    assert loop.run(1, k=2) == 3
    iteration = ["on_advance_start(1,)", "advance(1,)", "on_advance_end"]
    assert loop.calls == ["reset", "on_run_start(1,){'k': 2}"] + iteration * 3 + ["on_run_end"]


def test_done_is_checked_before_the_first_iteration():
    loop = CountingLoop(limit=0)
    loop.run()
    assert loop.calls == ["reset", "on_run_start(){}", "on_run_end"]


def test_skip_returns_on_skip_without_reset():
    class Skipped(CountingLoop):
        skip = True

        def on_skip(self):
            return "skipped"

    loop = Skipped()
    assert loop.run() == "skipped"
    assert loop.calls == []


def test_stop_iteration_ends_the_loop_and_on_run_end_still_runs():
    loop = CountingLoop(limit=5, stop_at=1)
    assert loop.run() == 1
    assert loop.calls[-1] == "on_run_end"
    assert loop.calls.count("on_advance_end") == 1


def test_trainer_unset_raises_and_setting_attaches_children():
    parent, child, grandchild = CountingLoop(), CountingLoop(), CountingLoop()
    child.inner = grandchild
    parent.inner = child
    with pytest.raises(RuntimeError, match="The loop is not attached to a Trainer."):
        parent.trainer
    trainer = Trainer(enable_progress_bar=False)
    parent.trainer = trainer
    assert parent.trainer is child.trainer is grandchild.trainer is trainer
    # children kept in containers are not loops of the tree
    parent.others = [CountingLoop()]
    parent.trainer = trainer
    with pytest.raises(RuntimeError):
        parent.others[0].trainer


def test_connect_swaps_children_and_rejects_unknown_names():
    parent, old, new = CountingLoop(), CountingLoop(), CountingLoop()
    parent.child = old
    parent.connect(child=new)
    assert parent.child is new
    with pytest.raises(ValueError, match="unknown child loop `missing`"):
        parent.connect(missing=CountingLoop())


def test_restarting_propagates_and_clears_after_an_iteration():
    parent, child = CountingLoop(), CountingLoop()
    parent.child = child
    parent.restarting = True
    assert child.restarting
    parent.run()
    assert not parent.restarting
    assert child.restarting  # only the loop that iterated clears its own flag


def test_state_dict_is_flat_and_round_trips():
    parent, child = CountingLoop(), CountingLoop()
    parent.loop_child = child
    parent.run()
    state = parent.state_dict()
    assert list(state) == ["state_dict", "progress", "loop_child.state_dict", "loop_child.progress"]
    assert state["progress"]["total"]["completed"] == 3
    fresh, fresh_child = CountingLoop(), CountingLoop()
    fresh.loop_child = fresh_child
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    assert fresh.restarting and fresh_child.restarting
    del parent.loop_child
    assert list(parent.state_dict()) == ["state_dict", "progress"]


def test_load_state_dict_skips_missing_keys_and_calls_on_load_checkpoint():
    class WithState(CountingLoop):
        def on_save_checkpoint(self):
            return {"iteration": self.iteration}

        def on_load_checkpoint(self, state_dict):
            self.iteration = state_dict["iteration"]

    loop = WithState(limit=2)
    loop.run()
    restored = WithState(limit=4)
    restored.load_state_dict({"state_dict": loop.state_dict()["state_dict"]})
    assert restored.iteration == 2 and restored.progress.total.completed == 0
    assert restored.run() == 4  # resumed at iteration 2 because reset() saw `restarting`
    assert not restored.restarting
