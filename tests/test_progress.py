"""Progress counters: increments, resets and state dicts."""
import pytest

from fastloop.loops.progress import (
    BatchProgress, OptimizationProgress, ProcessedTracker, Progress, ReadyCompletedTracker, StartedTracker,
)


def test_increments_bump_total_and_current():
    p = Progress()
    for step in ("ready", "started", "processed", "completed"):
        getattr(p, f"increment_{step}")()
    assert p.total == ProcessedTracker(1, 1, 1, 1) == p.current
    p.reset_on_run()
    assert p.current == ProcessedTracker() and p.total.completed == 1


def test_increment_ready_started_equals_the_two_increments():
    both, one_by_one = Progress.from_defaults(StartedTracker), Progress.from_defaults(StartedTracker)
    both.increment_ready_started()
    one_by_one.increment_ready()
    one_by_one.increment_started()
    assert both == one_by_one and both.total == StartedTracker(ready=1, completed=0, started=1)


def test_missing_counter_is_a_type_error():
    with pytest.raises(TypeError, match="no `started` counter"):
        Progress.from_defaults(ReadyCompletedTracker).increment_started()
    with pytest.raises(TypeError, match="no `started` counter"):
        Progress.from_defaults(ReadyCompletedTracker).increment_ready_started()
    with pytest.raises(ValueError):
        Progress(total=ReadyCompletedTracker(), current=StartedTracker())


def test_reset_on_restart_rolls_back_to_completed():
    t = ProcessedTracker(ready=5, started=5, processed=4, completed=3)
    t.reset_on_restart()
    assert t == ProcessedTracker(ready=3, started=3, processed=3, completed=3)


def test_finish_processed_counts_processed_work_as_done():
    p = Progress(total=ProcessedTracker(5, 5, 5, 4), current=ProcessedTracker(2, 2, 2, 1))
    p.finish_processed()
    assert p.total.completed == 5 and p.current.completed == 2


def test_state_dict_round_trip_with_nested_progress():
    p = OptimizationProgress()
    p.optimizer.step.increment_ready()
    p.optimizer.zero_grad.increment_started()
    p.optimizer_position = 2
    state = p.state_dict()
    assert state["optimizer"]["zero_grad"]["total"] == {"ready": 0, "completed": 0, "started": 1}
    q = OptimizationProgress()
    q.load_state_dict(state)
    assert q == p and q.optimizer_steps == 0


def test_batch_progress_last_batch_flag():
    b = BatchProgress()
    b.is_last_batch = True
    assert BatchProgress.from_state_dict(b.state_dict()).is_last_batch
    b.reset_on_run()
    assert not b.is_last_batch
