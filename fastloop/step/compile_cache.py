"""Portable compile caches: ship the compiled step with a script, skip inductor on a new machine.

Inductor keeps what it compiled in an on-disk cache (``TORCHINDUCTOR_CACHE_DIR``, by default
under ``/tmp``): its FX-graph cache and the AOTAutograd cache make a second run of the same
script much faster (see ``benchmarks/RESULTS.md``, "Compile time"). A fresh machine, a CI job
or a container starts with an empty cache. ``torch.compiler.save_cache_artifacts`` packs what
this process compiled (or loaded) into bytes that ``load_cache_artifacts`` puts back into the
caches of another process, on another machine with the same torch build and CPU/GPU kind::

    from fastloop.step.compile_cache import compile_cache

    with compile_cache("model.compile-cache"):   # loads the file if it exists ...
        trainer.fit(model, loader)                # ... and (re)writes it when the block ends

What this saves is the AOTAutograd and inductor work (code generation, the C++/Triton
compiles). Dynamo's tracing of the step is never cached by torch and runs in every process.
An artifact that does not fit the current torch or hardware is simply a cache miss.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Union

import torch

__all__ = ["compile_cache", "load_compile_cache", "save_compile_cache"]

PathLike = Union[str, "os.PathLike[str]"]


def save_compile_cache(path: PathLike) -> int:
    """Write the cache artifacts of everything this process has compiled or loaded from a cache
    so far to ``path``, atomically. Returns how many artifacts were written (0: nothing was
    compiled yet, and nothing is written)."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return 0
    data, info = saved
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return _count(info)


def load_compile_cache(path: PathLike) -> int:
    """Put the artifacts saved in ``path`` into this process's compile caches; returns how many.

    Call it before the first compiled step. Raises ``ValueError`` naming the file when it is not
    a compile cache."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        info = torch.compiler.load_cache_artifacts(data)
    except Exception as exc:  # the deserializer raises assorted errors on foreign bytes
        raise ValueError(f"{path!r} is not a compile cache written by save_compile_cache "
                         f"({type(exc).__name__}: {exc})") from None
    if info is None:
        raise ValueError(f"{path!r} is not a compile cache written by save_compile_cache (no artifacts)")
    return _count(info)


@contextlib.contextmanager
def compile_cache(path: PathLike) -> Iterator[None]:
    """Load ``path`` if it exists; when the block ends without an error, save everything this
    process compiled or loaded (the file's own artifacts included, so it stays complete)."""
    if os.path.exists(path):
        load_compile_cache(path)
    yield
    save_compile_cache(path)


def _count(info: object) -> int:
    """Artifacts described by a ``torch.compiler.CacheInfo`` (keys per artifact kind)."""
    return sum(len(keys) for keys in getattr(info, "artifacts", {}).values())
