"""Which process may write logs: only global rank 0 does, as in Lightning.

The rank is the trainer's: that of the initialized ``torch.distributed`` process group (which
the Trainer joins under torchrun, or the user set up), else the launchers' environment variables
in Lightning's order of precedence. It is read on every call, so a logger built before the
processes were spawned still answers for the process it runs in.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Optional, TypeVar

import torch.distributed

_RANK_ENV_KEYS = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")

F = TypeVar("F", bound=Callable[..., Any])


def global_rank() -> int:
    """This process's global rank: the process group's, else the first rank variable set in the
    environment, else 0."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for key in _RANK_ENV_KEYS:
        value = os.environ.get(key)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {key}={value!r} is not an integer rank") from None
    return 0


def rank_zero() -> bool:
    """True in the process that writes logs (global rank 0)."""
    return global_rank() == 0


def rank_zero_only(fn: F) -> F:
    """Run ``fn`` on rank 0 only; elsewhere the call does nothing and returns None."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Optional[Any]:
        if rank_zero():
            return fn(*args, **kwargs)
        return None

    return wrapped  # type: ignore[return-value]


class DummyExperiment:
    """Stands in for a logger's experiment on ranks != 0: every method call is a no-op."""

    def nop(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __getattr__(self, _: str) -> Callable[..., None]:
        return self.nop

    def __getitem__(self, idx: Any) -> "DummyExperiment":  # logger.experiment[0].add_image(...)
        return self

    def __setitem__(self, *args: Any) -> None:
        pass


def rank_zero_experiment(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Decorate a logger's ``experiment`` getter: the real object on rank 0, a DummyExperiment elsewhere."""

    @functools.wraps(fn)
    def experiment(self: Any) -> Any:
        if not rank_zero():
            return DummyExperiment()
        return fn(self)

    return experiment
