"""The small networks the benchmark workloads train (plain ``nn.Module``s, no framework)."""
from __future__ import annotations

import math

import torch
from torch import nn


def mlp(sizes: "list[int]", act: type = nn.ReLU) -> nn.Sequential:
    """Linear layers of the given widths with ``act`` between them (none after the last)."""
    layers: "list[nn.Module]" = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def mnist_mlp() -> nn.Sequential:
    """Lightning's ``ParityModuleMNIST`` shape: 784->128, tanh, BatchNorm1d, Dropout, ->10."""
    return nn.Sequential(nn.Linear(784, 128), nn.Tanh(), nn.BatchNorm1d(128), nn.Dropout(0.1), nn.Linear(128, 10))


class LSTMRegressor(nn.Module):
    """Lightning's ``ParityModuleRNN``: LSTM(10->20) + Linear(20->5) on every time step."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(10, 20, batch_first=True)
        self.head = nn.Linear(20, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out)


def lenet() -> nn.Sequential:
    """A LeNet-like convnet on 1x28x28 inputs, 10 classes."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )


class TinyTransformerLM(nn.Module):
    """A causal 2-layer transformer language model (pre-norm, learned positions)."""

    def __init__(self, vocab: int = 128, seq: int = 32, d_model: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(seq, d_model) / math.sqrt(d_model))
        block = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=4 * d_model, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        # A constant buffer, so the mask is not rebuilt (and re-allocated) on every step.
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        h = self.blocks(h, mask=self.mask, is_causal=True)
        return self.head(self.norm(h))


def launch_bound_mlp(width: int = 512, depth: int = 8) -> nn.Sequential:
    """``depth`` x (Linear(width, width) + GELU): many small kernels, so launch latency dominates on GPUs."""
    layers: "list[nn.Module]" = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers)
