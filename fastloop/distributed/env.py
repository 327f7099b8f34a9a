"""Where this process sits in a distributed run: global/local rank, world size, node rank.

Read from an initialized ``torch.distributed`` process group when there is one (a user who
set the group up himself), else from the variables ``torchrun`` (torch.distributed.elastic)
sets for every worker: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``GROUP_RANK`` (the node rank), ``MASTER_ADDR``/``MASTER_PORT``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

import torch.distributed as dist

# Present in every torchrun worker; RANK alone is also set by other launchers (SLURM wrappers...).
TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")


@dataclass(frozen=True)
class ClusterEnv:
    """This process's coordinates; the defaults describe a single process."""

    global_rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def launched_by_torchrun(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is a worker started by ``torchrun`` (or torch's launcher API)."""
    return all(key in environ for key in TORCHRUN_KEYS)


def group_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _int_var(environ: Mapping[str, str], key: str, default: Optional[int] = None) -> int:
    value = environ.get(key)
    if value is None:
        if default is None:
            raise ValueError(f"environment variable {key} is not set (torchrun sets it for every worker)")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def from_torchrun_env(environ: Mapping[str, str] = os.environ) -> ClusterEnv:
    """The coordinates torchrun gave this worker."""
    rank = _int_var(environ, "RANK")
    world = _int_var(environ, "WORLD_SIZE")
    local_rank = _int_var(environ, "LOCAL_RANK")
    local_world = _int_var(environ, "LOCAL_WORLD_SIZE", world)
    node_rank = _int_var(environ, "GROUP_RANK", rank // max(1, local_world))
    if not 0 <= rank < world:
        raise ValueError(f"environment variable RANK={rank} is out of range for WORLD_SIZE={world}")
    return ClusterEnv(rank, world, local_rank, local_world, node_rank)


def from_process_group(environ: Mapping[str, str] = os.environ) -> ClusterEnv:
    """The coordinates of an initialized process group (local rank from torchrun's variables when
    they are there, else every process is taken to be on one node)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    local_world = _int_var(environ, "LOCAL_WORLD_SIZE", world)
    local_rank = _int_var(environ, "LOCAL_RANK", rank % max(1, local_world))
    node_rank = _int_var(environ, "GROUP_RANK", rank // max(1, local_world))
    return ClusterEnv(rank, world, local_rank, local_world, node_rank)


def detect(environ: Mapping[str, str] = os.environ) -> Optional[ClusterEnv]:
    """The process group's coordinates, else torchrun's, else None (a plain single process)."""
    if group_initialized():
        return from_process_group(environ)
    if launched_by_torchrun(environ):
        return from_torchrun_env(environ)
    return None
