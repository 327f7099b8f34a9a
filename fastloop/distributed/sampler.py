"""Each process reads its own shard of a torch ``DataLoader`` when several processes train.

With a world size above 1 (``torch.distributed`` initialized, e.g. under ``torchrun``), the data
connector hands each stage's ``DataLoader`` to :func:`distribute_loader`, which rebuilds it with
the same arguments and a sampler over this rank's share of the dataset:

- training: ``DistributedSampler`` shuffling when the loader shuffled (its ``RandomSampler``),
  seeded with the ``seed_everything`` seed, padded so every rank runs the same number of batches
  (no rank waits alone in the gradient all-reduce); the fit loop calls ``set_epoch`` each epoch;
- validation/test: ``DistributedSampler(shuffle=False)``, padded as in training;
- predict: :class:`UnrepeatedDistributedSampler`, every sample exactly once over all ranks.

A loader that already uses a ``DistributedSampler`` is kept as it is. A ``DataLoader`` whose
sampler or batch sampler is the user's own, or a ``DataLoader`` subclass, cannot be rebuilt
faithfully: that is an error naming the loader, before the first step. ``TensorLoader`` shards
itself; other iterables and iterable-style datasets are the user's to shard.
``Trainer(use_distributed_sampler=False)`` (Lightning 1.x: ``replace_sampler_ddp=False``) turns
all of this off.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from torch.utils.data import (
    BatchSampler, DataLoader, DistributedSampler, IterableDataset, RandomSampler, Sampler, SequentialSampler,
)

_STAGES = ("train", "val", "test", "predict")


def rank_and_world_size() -> Tuple[int, int]:
    """This process's rank and the world size from ``torch.distributed``; ``(0, 1)`` when no
    process group is initialized."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sampler_seed() -> int:
    """The seed of the injected samplers: the one ``seed_everything`` recorded, else 0 (the same on
    every rank, so all ranks agree on each epoch's permutation)."""
    return int(os.environ.get("FASTLOOP_GLOBAL_SEED", 0))


def resolve_use_distributed_sampler(use_distributed_sampler: bool, lightning_only: Dict[str, Any]) -> bool:
    """``Trainer(use_distributed_sampler=...)``, or Lightning 1.x's ``replace_sampler_ddp`` (taken
    out of ``lightning_only``, the Trainer's other keyword arguments)."""
    if not isinstance(use_distributed_sampler, bool):
        raise ValueError(f"use_distributed_sampler must be a bool, got {use_distributed_sampler!r}")
    if "replace_sampler_ddp" in lightning_only:
        legacy = lightning_only.pop("replace_sampler_ddp")
        if not isinstance(legacy, bool):
            raise ValueError(f"replace_sampler_ddp must be a bool, got {legacy!r}")
        if not legacy:
            return False
    return use_distributed_sampler


class UnrepeatedDistributedSampler(Sampler[int]):
    """Rank ``r`` of ``W`` takes positions ``r, r + W, r + 2W...`` of the (optionally shuffled)
    indices: every sample exactly once over all ranks, no padding, so ranks may get one sample
    more or less than the others. Meant for prediction, where ranks never wait on each other."""

    def __init__(self, dataset: Any, num_replicas: int, rank: int, shuffle: bool = False, seed: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is out of range for num_replicas {num_replicas}")
        self.dataset = dataset
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            indices = torch.randperm(n, generator=gen).tolist()
        else:
            indices = list(range(n))
        return iter(indices[self.rank::self.num_replicas])


def has_distributed_sampler(loader: DataLoader) -> bool:
    """The loader's sampler (or its batch sampler's) is already a ``DistributedSampler``."""
    samplers = (loader.sampler, getattr(loader.batch_sampler, "sampler", None))
    return any(isinstance(s, (DistributedSampler, UnrepeatedDistributedSampler)) for s in samplers)


def _cannot_rebuild(loader: DataLoader, hook: str, what: str, world_size: int) -> ValueError:
    return ValueError(
        f"`{hook}` returned a {type(loader).__name__} with {what}, which fastloop cannot shard across the "
        f"{world_size} processes: give it a torch.utils.data.DistributedSampler yourself (the loader is then "
        "kept as it is), or pass Trainer(use_distributed_sampler=False) to feed it to every process unchanged"
    )


def check_rebuildable(loader: DataLoader, hook: str, world_size: int) -> None:
    """Raise unless ``loader`` is a plain ``DataLoader`` over a map-style dataset with torch's own
    sequential or random sampler (what the rebuild reproduces exactly)."""
    if type(loader) is not DataLoader:
        raise _cannot_rebuild(loader, hook, "its own class (a DataLoader subclass)", world_size)
    if loader.batch_sampler is not None and type(loader.batch_sampler) is not BatchSampler:
        raise _cannot_rebuild(loader, hook, f"a custom batch_sampler ({type(loader.batch_sampler).__name__})",
                              world_size)
    if loader.batch_sampler is not None and loader.batch_size is None:
        raise _cannot_rebuild(loader, hook, "a batch_sampler of its own (BatchSampler)", world_size)
    sampler = loader.sampler
    if type(sampler) not in (SequentialSampler, RandomSampler):
        raise _cannot_rebuild(loader, hook, f"a custom sampler ({type(sampler).__name__})", world_size)
    if isinstance(sampler, RandomSampler) and (sampler.replacement or sampler._num_samples is not None):
        raise _cannot_rebuild(loader, hook, "a RandomSampler drawing with replacement or num_samples", world_size)


def distribute_loader(loader: Any, stage: str, hook: str, rank: Optional[int] = None,
                      world_size: Optional[int] = None, seed: Optional[int] = None) -> Any:
    """``loader`` rebuilt with this rank's sampler when the world size is above 1, else itself.

    ``stage``: ``"train"``, ``"val"``, ``"test"`` or ``"predict"``; ``hook``: the loader's source,
    named in errors. ``rank``/``world_size`` default to ``torch.distributed``'s, ``seed`` to
    :func:`sampler_seed`.
    """
    if stage not in _STAGES:
        raise ValueError(f"stage must be one of {_STAGES}, got {stage!r}")
    if rank is None or world_size is None:
        rank, world_size = rank_and_world_size()
    if world_size <= 1 or not isinstance(loader, DataLoader):
        return loader  # one process; or not a torch DataLoader (TensorLoader shards itself)
    if isinstance(loader.dataset, IterableDataset) or has_distributed_sampler(loader):
        return loader  # an iterable dataset shards itself; a user's DistributedSampler is kept
    check_rebuildable(loader, hook, world_size)
    seed = sampler_seed() if seed is None else seed
    dataset = loader.dataset
    if stage == "predict":
        sampler: Sampler[int] = UnrepeatedDistributedSampler(dataset, world_size, rank, shuffle=False, seed=seed)
    else:
        shuffle = stage == "train" and isinstance(loader.sampler, RandomSampler)
        # drop_last=False: pads with repeated samples so every rank has the same count (as Lightning)
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                     drop_last=False)
    return rebuild_with_sampler(loader, sampler)


def rebuild_with_sampler(loader: DataLoader, sampler: Sampler[int]) -> DataLoader:
    """A new ``DataLoader`` with ``loader``'s arguments and ``sampler`` (the user's loader is
    left as it is)."""
    extra: Dict[str, Any] = {}
    if loader.num_workers > 0:
        extra["prefetch_factor"] = loader.prefetch_factor
    for name in ("pin_memory_device", "in_order"):  # arguments of newer torch versions
        if hasattr(loader, name):
            extra[name] = getattr(loader, name)
    return DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
        persistent_workers=loader.persistent_workers, **extra,
    )
