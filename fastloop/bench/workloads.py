"""The workload registry: model, optimizer, loss and synthetic batches of each benchmark.

All data is synthetic, generated in memory from a seed, so every contender sees exactly the same
batches in the same order. ``data-loading`` is not a training workload: it measures loader
throughput through ``fastloop.bench.data_throughput`` when that module is installed.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fastloop.bench import models

Batch = Tuple[Tensor, Tensor]
DEFAULT_WORKLOAD = "tiny-mlp"


@dataclass(frozen=True)
class Workload:
    """One benchmark problem. ``kind`` is ``"train"`` (step throughput) or ``"loader"``."""

    name: str
    description: str
    batch_size: int = 0
    make_model: Callable[[], nn.Module] = nn.Identity
    make_optimizer: Callable[[Sequence[nn.Parameter]], torch.optim.Optimizer] = partial(torch.optim.SGD, lr=0.1)
    make_batch: Callable[[torch.Generator], Batch] = lambda g: (torch.zeros(1), torch.zeros(1))
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.mse_loss
    kind: str = "train"
    gpu_only: bool = False  # meant for GPUs: still runs on CPU when asked for by name

    def model(self, seed: int) -> nn.Module:
        """The initial model, the same for every contender given the same seed."""
        torch.manual_seed(seed)
        return self.make_model()

    def batches(self, count: int, seed: int, device: torch.device) -> List[Batch]:
        """``count`` batches drawn from a private generator (the global RNG is not touched)."""
        g = torch.Generator().manual_seed(seed + 1)
        return [tuple(t.to(device) for t in self.make_batch(g)) for _ in range(count)]  # type: ignore[misc]


def _classes(g: torch.Generator, shape: Tuple[int, ...], n: int, classes: int) -> Batch:
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def _lm_batch(g: torch.Generator, n: int = 16, seq: int = 32, vocab: int = 128) -> Batch:
    tokens = torch.randint(0, vocab, (n, seq + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _lm_loss(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def _regression_batch(g: torch.Generator, n: int, width: int) -> Batch:
    return torch.randn(n, width, generator=g), torch.randn(n, width, generator=g)


def _sequence_batch(g: torch.Generator, n: int = 30, steps: int = 100) -> Batch:
    return torch.randn(n, steps, 10, generator=g), torch.randn(n, steps, 5, generator=g)


def _gru_regressor() -> nn.Module:
    """ParityModuleRNN with a GRU in place of the LSTM."""
    model = models.LSTMRegressor()
    model.rnn = nn.GRU(10, 20, batch_first=True)
    return model


WORKLOADS: Dict[str, Workload] = {w.name: w for w in [
    Workload(
        "tiny-mlp", "MLP 32->64->10, batch 64, Adam (pure loop overhead)", 64,
        make_model=partial(models.mlp, [32, 64, 10]), make_optimizer=partial(torch.optim.Adam, lr=1e-3),
        make_batch=partial(_classes, shape=(32,), n=64, classes=10), loss_fn=F.cross_entropy,
    ),
    Workload(
        "mnist-mlp", "ParityModuleMNIST: 784->128 tanh BN Dropout ->10, batch 128, Adam", 128,
        make_model=models.mnist_mlp, make_optimizer=partial(torch.optim.Adam, lr=1e-3),
        make_batch=partial(_classes, shape=(784,), n=128, classes=10), loss_fn=F.cross_entropy,
    ),
    Workload(
        "tiny-lstm", "ParityModuleRNN: LSTM 10->20 + Linear 20->5, batch 30, Adam lr 0.02, MSE", 30,
        make_model=models.LSTMRegressor, make_optimizer=partial(torch.optim.Adam, lr=0.02),
        make_batch=_sequence_batch, loss_fn=F.mse_loss,
    ),
    Workload(
        "short-lstm", "tiny-lstm over 16 time steps (short enough for the fused step to unroll)", 30,
        make_model=models.LSTMRegressor, make_optimizer=partial(torch.optim.Adam, lr=0.02),
        make_batch=partial(_sequence_batch, steps=16), loss_fn=F.mse_loss,
    ),
    Workload(
        "short-gru", "GRU 10->20 + Linear 20->5 over 16 time steps, batch 30, Adam lr 0.02, MSE", 30,
        make_model=_gru_regressor, make_optimizer=partial(torch.optim.Adam, lr=0.02),
        make_batch=partial(_sequence_batch, steps=16), loss_fn=F.mse_loss,
    ),
    Workload(
        "small-cnn", "LeNet-like convnet on 1x28x28, batch 64, SGD momentum 0.9", 64,
        make_model=models.lenet, make_optimizer=partial(torch.optim.SGD, lr=0.01, momentum=0.9),
        make_batch=partial(_classes, shape=(1, 28, 28), n=64, classes=10), loss_fn=F.cross_entropy,
    ),
    Workload(
        "small-transformer", "2-layer transformer LM, vocab 128, seq 32, d_model 64, batch 16, AdamW", 16,
        make_model=models.TinyTransformerLM, make_optimizer=partial(torch.optim.AdamW, lr=1e-3),
        make_batch=_lm_batch, loss_fn=_lm_loss,
    ),
    Workload(
        "launch-bound-mlp", "8 x (Linear 512x512 + GELU), batch 64, AdamW (for GPUs)", 64,
        make_model=models.launch_bound_mlp, make_optimizer=partial(torch.optim.AdamW, lr=1e-4),
        make_batch=partial(_regression_batch, n=64, width=512), loss_fn=F.mse_loss, gpu_only=True,
    ),
    Workload("data-loading", "loader throughput (fastloop.bench.data_throughput)", kind="loader"),
]}


def get_workload(name: str) -> Workload:
    try:
        return WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}") from None
