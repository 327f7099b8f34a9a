"""The reference contender: a hand-written PyTorch loop, and the same step under
``torch.compile(mode="reduce-overhead")`` (CUDA graphs; CUDA only).

Every contender runs on the runner's one thread (framework fits in greenlets, see
``driven_fit``), so all of them run ATen under the same threading conditions.
"""
from __future__ import annotations

import copy
import time
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from fastloop.bench.contender import Contender, Outcome, RunSpec, synchronize


class RawLoop(Contender):
    """zero_grad, forward, loss, backward, step: nothing else per step."""

    name = "raw"
    mode_requested = "eager"
    mode_used = "eager"

    def setup(self, spec: RunSpec) -> None:
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

    def warmup(self, steps: int) -> float:
        device = self.spec.device
        start = time.perf_counter()
        self._steps(1)
        synchronize(device)  # host-device sync: end of the first (cold) step
        first = time.perf_counter() - start
        self._steps(steps - 1)
        synchronize(device)  # host-device sync: end of warm-up
        return first

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        self._steps(steps)
        synchronize(self.spec.device)  # host-device sync: the one per timed round
        return time.perf_counter() - start

    def current_loss(self) -> Optional[float]:
        return None if self.loss is None else float(self.loss.detach())  # host sync: untimed

    def finish(self) -> Outcome:
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
