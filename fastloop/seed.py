"""Seeding and the random-number-generator state that checkpoints carry."""
from __future__ import annotations

import contextlib
import os
import random
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch


def seed_everything(seed: Optional[int] = None, workers: bool = False) -> int:
    """Seed Python's ``random``, numpy and torch (CPU and CUDA); return the seed used."""
    if seed is None:
        seed = int(os.environ.get("FASTLOOP_GLOBAL_SEED", 0))
    seed = int(seed)
    os.environ["FASTLOOP_GLOBAL_SEED"] = str(seed)
    os.environ["FASTLOOP_SEED_WORKERS"] = str(int(workers))
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


def capture_rng_states() -> Dict[str, Any]:
    """RNG states as tensors and plain values, so ``torch.load(weights_only=True)`` reads them."""
    version, mt_state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    states: Dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch_cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Dict[str, Any]) -> None:
    py = states["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    np_state = states["numpy"]
    np.random.set_state(
        (np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"],
         np_state["gauss"])
    )
    torch.set_rng_state(states["torch"])
    if "torch_cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch_cuda"])


@contextlib.contextmanager
def isolate_rng() -> Iterator[None]:
    """Run a block without changing the RNG streams seen by the rest of the run."""
    states = capture_rng_states()
    try:
        yield
    finally:
        restore_rng_states(states)
