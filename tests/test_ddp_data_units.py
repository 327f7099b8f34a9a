"""Distributed data pieces that need no second process: loader rebuilding and its errors, the
unrepeated predict sampler, the Trainer argument, and the sync functions in a world of one."""
from __future__ import annotations

from typing import Any, List

import pytest
import torch
from torch.utils.data import (
    BatchSampler, DataLoader, DistributedSampler, IterableDataset, RandomSampler, Sampler, SequentialSampler,
)

import fastloop
from fastloop.distributed import sampler as sampler_mod
from fastloop.distributed.sampler import UnrepeatedDistributedSampler, distribute_loader
from fastloop.distributed.sync import sync_value, sync_weighted_mean
from fastloop.testing import BoringModel, random_dataset


def ids(n: int) -> List[int]:
    """A map-style dataset whose sample ``i`` is ``i``."""
    return list(range(n))


def collate(items: List[Any]) -> Any:
    return torch.tensor(items)


def flat(loader: DataLoader) -> List[int]:
    return torch.cat(list(loader)).tolist()


def test_one_process_keeps_the_loader() -> None:
    loader = DataLoader(ids(8), batch_size=2, shuffle=True)
    assert distribute_loader(loader, "train", "train_dataloader") is loader  # no process group
    assert distribute_loader(loader, "train", "train_dataloader", rank=0, world_size=1) is loader


def test_train_loader_rebuilt_with_its_arguments() -> None:
    loader = DataLoader(ids(10), batch_size=3, shuffle=True, collate_fn=collate, drop_last=True)
    shards = [distribute_loader(loader, "train", "train_dataloader", rank=r, world_size=2, seed=4) for r in (0, 1)]
    for r, shard in enumerate(shards):
        s = shard.sampler
        assert type(shard) is DataLoader and shard is not loader and loader.sampler.__class__ is RandomSampler
        assert (type(s), s.rank, s.num_replicas, s.shuffle, s.seed, s.drop_last) == (DistributedSampler, r, 2, True, 4, False)
        assert (shard.batch_size, shard.collate_fn, shard.drop_last) == (3, collate, True)
    a, b = flat(shards[0]), flat(shards[1])
    assert len(a) == len(b) == 3 and not set(a) & set(b)  # 5 samples each, one full batch (drop_last)
    shards[0].sampler.set_epoch(1)
    assert list(shards[0].sampler) != list(DistributedSampler(ids(10), 2, 0, shuffle=True, seed=4))


def test_unshuffled_train_and_eval_loaders_stay_in_order() -> None:
    for stage in ("train", "val", "test"):
        shard = distribute_loader(DataLoader(ids(7), batch_size=2), stage, "x", rank=1, world_size=2)
        assert shard.sampler.shuffle is False
        assert flat(shard) == [1, 3, 5, 0]  # padded with a repeat: both ranks run 4 samples
    # a shuffled validation loader is read in order too
    shard = distribute_loader(DataLoader(ids(6), batch_size=2, shuffle=True), "val", "x", rank=0, world_size=2)
    assert flat(shard) == [0, 2, 4]


def test_predict_every_sample_once() -> None:
    shards = [distribute_loader(DataLoader(ids(7), batch_size=2), "predict", "x", rank=r, world_size=3)
              for r in range(3)]
    assert [flat(s) for s in shards] == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(s.sampler) for s in shards] == [3, 2, 2]
    with pytest.raises(ValueError, match="rank 3 is out of range for num_replicas 3"):
        UnrepeatedDistributedSampler(ids(7), 3, 3)


def test_loaders_left_alone() -> None:
    own = DataLoader(ids(8), sampler=DistributedSampler(ids(8), num_replicas=2, rank=0))
    assert distribute_loader(own, "train", "x", rank=0, world_size=2) is own

    class Stream(IterableDataset):
        def __iter__(self) -> Any:
            return iter(range(4))

    stream = DataLoader(Stream(), batch_size=2)
    assert distribute_loader(stream, "train", "x", rank=0, world_size=2) is stream
    batches = [torch.arange(4)]
    assert distribute_loader(batches, "train", "x", rank=0, world_size=2) is batches
    with pytest.raises(ValueError, match="stage must be one of"):
        distribute_loader(stream, "fit", "x", rank=0, world_size=2)


class Odd(Sampler[int]):
    def __iter__(self) -> Any:
        return iter([1, 3])

    def __len__(self) -> int:
        return 2


class MyLoader(DataLoader):
    pass


@pytest.mark.parametrize("loader, what", [
    (DataLoader(ids(4), sampler=Odd()), r"a custom sampler \(Odd\)"),
    (DataLoader(ids(4), batch_sampler=[[0, 1], [2, 3]]), r"a custom batch_sampler \(list\)"),
    (DataLoader(ids(4), batch_sampler=BatchSampler(SequentialSampler(ids(4)), 2, False)),
     r"a batch_sampler of its own \(BatchSampler\)"),
    (DataLoader(ids(4), sampler=RandomSampler(ids(4), replacement=True)),
     "a RandomSampler drawing with replacement or num_samples"),
    (MyLoader(ids(4)), r"its own class \(a DataLoader subclass\)"),
])
def test_loaders_that_cannot_be_rebuilt(loader: DataLoader, what: str) -> None:
    with pytest.raises(ValueError, match=rf"^`val_dataloader` returned a {type(loader).__name__} with {what}, which "
                       "fastloop cannot shard across the 2 processes: give it a torch.utils.data.DistributedSampler"):
        distribute_loader(loader, "val", "val_dataloader", rank=0, world_size=2)


def test_seed_follows_seed_everything(monkeypatch: Any) -> None:
    monkeypatch.delenv("FASTLOOP_GLOBAL_SEED", raising=False)
    assert sampler_mod.sampler_seed() == 0
    fastloop.seed_everything(123)
    shard = distribute_loader(DataLoader(ids(4), shuffle=True), "train", "x", rank=0, world_size=2)
    assert shard.sampler.seed == 123


def test_trainer_argument(monkeypatch: Any) -> None:
    assert fastloop.Trainer(logger=False).use_distributed_sampler is True
    assert fastloop.Trainer(logger=False, use_distributed_sampler=False).use_distributed_sampler is False
    assert fastloop.Trainer(logger=False, replace_sampler_ddp=False).use_distributed_sampler is False
    assert fastloop.Trainer(logger=False, replace_sampler_ddp=True).use_distributed_sampler is True
    with pytest.raises(ValueError, match="use_distributed_sampler must be a bool, got 'no'"):
        fastloop.Trainer(use_distributed_sampler="no")
    with pytest.raises(ValueError, match="replace_sampler_ddp must be a bool, got 0"):
        fastloop.Trainer(replace_sampler_ddp=0)


def test_connector_injects_when_distributed(monkeypatch: Any) -> None:
    """The data connector hands every stage's loaders to distribute_loader (world faked at 2)."""
    monkeypatch.setattr(sampler_mod, "rank_and_world_size", lambda: (1, 2))
    trainer = fastloop.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                               enable_model_summary=False, num_sanity_val_steps=0)
    loader = DataLoader(random_dataset(16), batch_size=4, shuffle=True)
    trainer.fit(BoringModel(), loader, DataLoader(random_dataset(8), batch_size=4))
    train = trainer.train_data.loaders[0]
    assert isinstance(train.sampler, DistributedSampler) and train.sampler.rank == 1 and len(train) == 2
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 2
    off = fastloop.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                           enable_model_summary=False, use_distributed_sampler=False)
    off.fit(BoringModel(), loader)
    assert off.train_data.loaders[0] is loader


def test_sync_in_a_world_of_one_is_the_value() -> None:
    value = torch.tensor(3.0)
    assert sync_value(value, "mean") is value
    assert sync_weighted_mean(torch.tensor(6.0), 4.0).item() == 1.5
    with pytest.raises(ValueError, match="sync_dist cannot reduce with 'median'"):
        sync_value(value, "median")


def test_all_reduce_in_a_one_process_group(monkeypatch: Any) -> None:
    """The collective itself, on a gloo group of one: a reduced copy, the input left alone."""
    import socket

    from fastloop.distributed.sync import _all_reduce

    dist = torch.distributed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        value = torch.tensor([5.0, 2.0])
        for op in ("sum", "max", "min"):
            out = _all_reduce(value, op, None)
            assert out is not value and torch.equal(out, value)
    finally:
        dist.destroy_process_group()


class LogsSynced(fastloop.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(32, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("synced", loss.detach() * 0 + 1.0, sync_dist=True, on_step=True, on_epoch=True)
        self.log("rank_zero", loss.detach() * 0 + 1.0, sync_dist=True, rank_zero_only=True)
        self.log("plain", loss.detach() * 0 + 1.0)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.compile
@pytest.mark.slow  # one fused graph: ~10 s on a quiet 2-core machine, 45 s on a loaded one
def test_values_from_the_compiled_step_reach_the_sync(no_mode_override: Any, monkeypatch: Any) -> None:
    """Logged inside the fused graph, a sync_dist value comes out as a tensor and is reduced after
    it, per step and at epoch end (the reductions are replaced by recorders here: one process)."""
    import fastloop.results as results

    calls: List[Any] = []

    def fake_sync(value: torch.Tensor, reduce_fx: str, group: Any = None) -> torch.Tensor:
        calls.append(("step", reduce_fx, group))
        return value + 100

    def fake_mean(total: torch.Tensor, weight: float, group: Any = None) -> torch.Tensor:
        calls.append(("epoch", weight, group))
        return total / weight + 200

    monkeypatch.setattr(results, "sync_value", fake_sync)
    monkeypatch.setattr(results, "sync_weighted_mean", fake_mean)
    trainer = fastloop.Trainer(max_epochs=1, mode="compiled", logger=False, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(LogsSynced(), DataLoader(random_dataset(8), batch_size=4))
    assert "compiled [1 graph(s)" in trainer.explain()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert metrics == {"synced_step": 101.0, "synced": 201.0, "synced_epoch": 201.0, "rank_zero": 1.0, "plain": 1.0}
    # one sync per step; the epoch value once, though computed before and after on_train_epoch_end
    assert calls == [("step", "mean", None), ("step", "mean", None), ("epoch", 8.0, None)]
