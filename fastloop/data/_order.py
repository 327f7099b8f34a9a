"""Which rows each batch holds: the per-epoch order and the per-rank shard.

Both depend on (seed, epoch, rank, world_size) only, never on the global RNG, so a resumed run
sees exactly the order an uninterrupted run would.
"""
from __future__ import annotations

import torch


def shard_size(n_rows: int, world_size: int) -> int:
    """Rows per rank: the remainder ``n_rows % world_size`` is dropped so shards stay equal."""
    return n_rows // world_size


def num_batches(n_rows: int, batch_size: int, drop_last: bool) -> int:
    """Batches in one pass over ``n_rows`` rows."""
    return n_rows // batch_size if drop_last else -(-n_rows // batch_size)


def epoch_order(n_rows: int, *, seed: int, epoch: int, shuffle: bool, rank: int,
                world_size: int) -> torch.Tensor:
    """This rank's row indices for one epoch, as a contiguous int64 tensor.

    The epoch's permutation comes from a private generator seeded with
    ``(seed * 1_000_003 + epoch) mod 2**64``. Rank ``r`` takes the ``r``-th contiguous block of
    ``shard_size`` entries, so the shards are disjoint and equal-sized; the last
    ``n_rows % world_size`` entries of the permutation are left out this epoch.
    """
    if shuffle:
        # Reduced mod 2**64 so that any seed and epoch give a valid generator seed.
        gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)
        order = torch.randperm(n_rows, generator=gen, dtype=torch.int64)
    else:
        order = torch.arange(n_rows, dtype=torch.int64)
    per_rank = shard_size(n_rows, world_size)
    return order[rank * per_rank:(rank + 1) * per_rank].contiguous()
