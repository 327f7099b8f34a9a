"""The reference contender: a hand-written PyTorch loop, and the same step under
``torch.compile(mode="reduce-overhead")`` (CUDA graphs; CUDA only).

Like the framework contenders (whose ``fit`` runs in a worker thread, see ``driven_fit``), the
raw loop runs every phase on a worker thread of its own, so all contenders run ATen under the
same threading conditions. This matters: on an oversubscribed 2-core machine (load average 5)
the tiny-mlp raw step took 178 ms on the main thread with 2 intra-op threads and 2.6 ms on a
worker thread (3.2 ms on the main thread with ``torch.set_num_threads(1)``).
"""
from __future__ import annotations

import copy
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from fastloop.bench.contender import Contender, Outcome, RunSpec, synchronize


class RawLoop(Contender):
    """zero_grad, forward, loss, backward, step: nothing else per step."""

    name = "raw"
    mode_requested = "eager"
    mode_used = "eager"

    _pool: Optional[ThreadPoolExecutor] = None

    def _on_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on this contender's own thread (always the same one) and wait for it."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"bench-{self.name}")
        return self._pool.submit(fn, *args).result()

    def setup(self, spec: RunSpec) -> None:
        self._on_worker(self._setup, spec)

    def warmup(self, steps: int) -> float:
        return self._on_worker(self._warmup, steps)

    def run(self, steps: int) -> float:
        return self._on_worker(self._run, steps)

    def finish(self) -> Outcome:
        return self._on_worker(self._finish)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _setup(self, spec: RunSpec) -> None:
        self.spec = spec
        self.model = copy.deepcopy(spec.model).to(spec.device)
        self.model.train()
        self.optimizer = spec.workload.make_optimizer(list(self.model.parameters()))
        self.step_fn = self.make_step()
        self.index = 0
        self.loss: Optional[Tensor] = None

    def make_step(self) -> Callable[[Any, Any], Tensor]:
        model, optimizer, loss_fn = self.model, self.optimizer, self.spec.workload.loss_fn

        def step(x: Tensor, y: Tensor) -> Tensor:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            return loss.detach()

        return step

    def _steps(self, n: int) -> None:
        step, pool, i = self.step_fn, self.spec.batches, self.index
        size = len(pool)
        loss = self.loss
        for _ in range(n):
            x, y = pool[i % size]
            loss = step(x, y)
            i += 1
        self.index, self.loss = i, loss

    def _warmup(self, steps: int) -> float:
        device = self.spec.device
        start = time.perf_counter()
        self._steps(1)
        synchronize(device)  # host-device sync: end of the first (cold) step
        first = time.perf_counter() - start
        self._steps(steps - 1)
        synchronize(device)  # host-device sync: end of warm-up
        return first

    def _run(self, steps: int) -> float:
        start = time.perf_counter()
        self._steps(steps)
        synchronize(self.spec.device)  # host-device sync: the one per timed round
        return time.perf_counter() - start

    def _finish(self) -> Outcome:
        loss = None if self.loss is None else float(self.loss.clone())  # .item(): a sync, after timing
        return Outcome(loss, self.mode_used)


class TorchCompileReduceOverhead(RawLoop):
    """The raw step function under ``torch.compile(mode="reduce-overhead")``."""

    name = "torch-compile-ro"
    mode_requested = "reduce-overhead"
    mode_used = "torch.compile reduce-overhead"

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if device.type != "cuda":
            return "CUDA only (reduce-overhead means CUDA graphs)"
        return None

    def make_step(self) -> Callable[[Any, Any], Tensor]:
        return torch.compile(super().make_step(), mode="reduce-overhead")

    def _steps(self, n: int) -> None:
        super()._steps(n)
        # CUDA-graph outputs are overwritten by the next replay: keep a private copy.
        if self.loss is not None:
            self.loss = self.loss.clone()
