"""Distributed core without subprocesses: Trainer arguments against torchrun's variables, the
single-process strategy, and the eager DDP path in a one-process gloo group (DDP's reducer,
``no_sync``, manual optimization, rank-0 checkpoints, the None-step error) compared exactly with
a run without DDP. Multi-process runs: tests/test_ddp_core_torchrun.py, tests/test_ddp_faults_torchrun.py."""
import os

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import fastloop
from fastloop import Trainer
from fastloop.data import TensorLoader
from fastloop.distributed import DDPStrategy, SingleDeviceStrategy
from fastloop.loggers import _rank
from tests.ddp_worker import BATCH, ManualMLP, TinyMLP, dataset

TORCHRUN_ENV = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


@pytest.fixture
def torchrun_env(monkeypatch):
    for key, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of one process (what a user who initializes the group gets)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def fit(strategy=None, manual=False, accumulate=1, **kwargs):
    torch.manual_seed(0)
    model = ManualMLP() if manual else TinyMLP()
    trainer = Trainer(strategy=strategy, max_epochs=1, accumulate_grad_batches=accumulate, logger=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing="callbacks" in kwargs, **kwargs)
    x, y = dataset()
    trainer.fit(model, TensorLoader(x, y, batch_size=BATCH, rank=0, world_size=1))
    return trainer, {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------ arguments
def test_one_process_strategy_and_attributes():
    trainer = Trainer(logger=False, devices=1, num_nodes=1, strategy="auto")
    assert isinstance(trainer.strategy, SingleDeviceStrategy) and not trainer.strategy.is_distributed
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank, trainer.world_size, trainer.num_nodes,
            trainer.num_devices, trainer.is_global_zero) == (0, 0, 0, 1, 1, 1, True)
    t = torch.tensor([1.0, 2.0])
    assert trainer.strategy.broadcast({"a": 1}) == {"a": 1}
    assert trainer.strategy.reduce(t, "sum") is t
    trainer.strategy.barrier()
    with pytest.raises(ValueError, match="reduce op 'median' is not one of"):
        trainer.strategy.reduce(t, "median")


def test_unknown_strategy_is_named():
    with pytest.raises(ValueError, match=r"Trainer\(strategy='fsdp'\) is not supported by fastloop: use 'auto', 'ddp'"):
        Trainer(strategy="fsdp")


def test_several_nodes_need_torchrun():
    with pytest.raises(ValueError, match=r"Trainer\(num_nodes=2\) needs torchrun on every node"):
        Trainer(num_nodes=2)


def test_several_devices_under_pytest_is_a_clear_error():
    # Outside torchrun, devices=2 re-runs the program in two workers: never the test runner.
    with pytest.raises(ValueError, match=r"Trainer\(devices=2\) runs 2 processes: .* re-run the test runner"):
        Trainer(devices=2, accelerator="cpu")


@pytest.mark.parametrize("devices, message", [
    (-1, r"Trainer\(devices=-1\) means every GPU, and there is none"),
    (0, r"Trainer\(devices=0\): the number of devices must be >= 1"),
    ([0, 0], r"distinct device indices"),
    ("two", r"Trainer\(devices='two'\): expected 'auto'"),
])
def test_bad_devices_are_named(devices, message):
    with pytest.raises(ValueError, match=message):
        Trainer(devices=devices, accelerator="cpu")


def test_devices_times_nodes_must_match_torchrun_world_size(torchrun_env):
    with pytest.raises(ValueError, match=r"Trainer\(devices=2, num_nodes=1\) asks for 2 x 1 = 2 processes, but "
                                         r"torchrun started WORLD_SIZE=4 \(2 per node\)"):
        Trainer(devices=2, num_nodes=1, accelerator="cpu")
    with pytest.raises(ValueError, match=r"Trainer\(devices='auto', num_nodes=1\) asks for 2 x 1 = 2 processes"):
        Trainer(devices="auto", num_nodes=1, accelerator="cpu")


def test_logger_rank_follows_the_process_group(monkeypatch, one_process_group):
    monkeypatch.setenv("RANK", "3")  # the group's rank wins over a stale variable
    assert _rank.global_rank() == 0 and _rank.rank_zero()


# ------------------------------------------------- eager DDP in one process
def test_ddp_step_equals_plain_step_and_is_explained(one_process_group):
    _, plain = fit()
    trainer, ddp = fit("ddp", devices=1)
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.strategy.is_distributed
    assert trainer.world_size == 1 and trainer.global_step == 16  # 16 batches of 4 rows
    assert_same(plain, ddp)
    assert "distributed: training_step runs through DistributedDataParallel" in trainer.explain()
    assert trainer.strategy.model is None  # unwrapped after the fit
    assert trainer.strategy.reduce(torch.tensor([3.0]), "mean").item() == 3.0
    assert trainer.strategy.broadcast("x") == "x"


def test_accumulation_skips_the_all_reduce_on_accumulating_batches(one_process_group, monkeypatch):
    entered = []
    original = DistributedDataParallel.no_sync

    def counting(self):
        entered.append(self.require_backward_grad_sync)
        return original(self)

    monkeypatch.setattr(DistributedDataParallel, "no_sync", counting)
    _, plain = fit(accumulate=2)
    assert entered == []
    _, ddp = fit("ddp", accumulate=2)
    assert entered == [True] * 8  # every other one of the 16 batches accumulates
    assert_same(plain, ddp)


def test_manual_optimization_through_ddp(one_process_group, monkeypatch):
    prepared = []
    from fastloop.distributed import wrapper

    original = wrapper.prepare_manual_backward
    monkeypatch.setattr(wrapper, "prepare_manual_backward",
                        lambda model, loss, find: prepared.append(find) or original(model, loss, find))
    _, plain = fit(manual=True)
    _, ddp = fit(DDPStrategy(find_unused_parameters=True), manual=True)
    assert prepared == [True] * 16  # armed before each manual_backward
    assert_same(plain, ddp)


def test_training_step_returning_none_under_ddp_names_the_rank(one_process_group):
    class Skipping(TinyMLP):
        def training_step(self, batch, batch_idx):
            return None if self.global_step == 2 else super().training_step(batch, batch_idx)

    trainer = Trainer(strategy="ddp", max_epochs=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False)
    x, y = dataset()
    with pytest.raises(RuntimeError, match=r"rank 0: training_step returned None under DDP") as info:
        trainer.fit(Skipping(), TensorLoader(x, y, batch_size=BATCH, rank=0, world_size=1))
    assert "fastloop: raised on global rank 0 (of 1 processes)" in info.value.__notes__


def test_checkpoint_written_by_rank_zero_and_last_resolved_through_broadcast(one_process_group, monkeypatch):
    from fastloop.callbacks import ModelCheckpoint
    from fastloop.distributed.strategy import DDPStrategy as Strategy

    calls = []
    for name in ("barrier", "broadcast"):
        original = getattr(Strategy, name)
        monkeypatch.setattr(Strategy, name, lambda self, *a, _o=original, _n=name: calls.append(_n) or _o(self, *a))
    from fastloop import checkpoint_connector

    written = []
    save = checkpoint_connector.atomic_save
    monkeypatch.setattr(checkpoint_connector, "atomic_save", lambda obj, path: written.append(path) or save(obj, path))
    ckpt = ModelCheckpoint(dirpath="ckpts", every_n_train_steps=6, save_last=True)
    trainer, first = fit("ddp", callbacks=[ckpt])
    assert len(written) >= 4 and calls.count("barrier") == 1 + len(written)  # prepare_data, then one per file
    assert sorted(os.listdir("ckpts")) == ["epoch=0-step=12.ckpt", "last.ckpt"]
    calls.clear()
    resumed = Trainer(strategy="ddp", max_epochs=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[ModelCheckpoint(dirpath="ckpts", save_last=True)])
    model = TinyMLP()
    x, y = dataset()
    resumed.fit(model, TensorLoader(x, y, batch_size=BATCH, rank=0, world_size=1), ckpt_path="last")
    assert "broadcast" in calls and resumed.ckpt_path == os.path.abspath("ckpts/last.ckpt")
    assert resumed.global_step == 16  # 4 steps after the checkpoint of step 12
    assert_same(first, model.state_dict())
