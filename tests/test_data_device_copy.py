"""The fetcher's side-stream copy protocol on CPU (a recording fake stands in for the CUDA copier)."""
import pytest
import torch

from fastloop import Trainer
from fastloop.data.fetcher import DataFetcher
from fastloop.testing import BoringModel

# The suite pins FASTLOOP_MODE=eager; these tests choose their modes themselves.
pytestmark = pytest.mark.usefixtures("no_mode_override")


class RecordingCopier:
    def __init__(self):
        self.log = []

    def before_next_fetch(self):
        self.log.append("wait")

    def start(self, batch):
        self.log.append(("start", batch))
        return ("inflight", batch)

    def finish(self, inflight):
        assert inflight[0] == "inflight"
        self.log.append(("finish", inflight[1]))
        return inflight[1]


def test_next_batch_copy_starts_before_the_current_batch_is_handed_out():
    copier = RecordingCopier()
    fetcher = DataFetcher([1, 2, 3], copier=copier).start()
    assert copier.log == ["wait", ("start", 1)]
    assert next(fetcher) == 1
    assert copier.log[-3:] == ["wait", ("start", 2), ("finish", 1)]
    assert list(fetcher) == [2, 3]
    assert fetcher.done
    assert [e for e in copier.log if e != "wait"] == [
        ("start", 1), ("start", 2), ("finish", 1), ("start", 3), ("finish", 2), ("finish", 3)]


def test_skipped_batches_are_not_copied():
    copier = RecordingCopier()
    fetcher = DataFetcher([1, 2, 3, 4], copier=copier).start(skip=2)
    assert ("start", 1) not in copier.log and ("start", 2) not in copier.log
    assert list(fetcher) == [3, 4]


def test_without_a_copier_batches_pass_through():
    batch = (torch.zeros(2),)
    fetcher = DataFetcher([batch]).start()
    assert next(fetcher) is batch


def test_no_device_copier_on_cpu():
    trainer = Trainer(accelerator="cpu", enable_progress_bar=False)
    trainer.module = BoringModel()
    assert trainer.data.device_copier() is None
