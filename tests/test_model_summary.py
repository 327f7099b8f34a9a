"""summarize() and the ModelSummary callback: tables equal to Lightning 1.9.5's for the same model."""
import pytest
import torch
from torch import nn

from fastloop import Module, Trainer
from fastloop.callbacks.model_summary import ModelSummary, human_count, summarize, summarized_layers
from fastloop.testing import TinyMLP, random_loader


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 4), nn.Tanh()))


class Mixed(Module):
    """Nested layers, a frozen weight, a shared layer, a lazy layer and a bare parameter."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
        self.head = nn.Linear(10, 2)
        self.bn = nn.BatchNorm1d(4)
        self.block = Block()
        self.shared = self.head  # listed and counted once
        self.big = nn.Embedding(50000, 64)
        self.lazy = nn.LazyLinear(3)  # uninitialized: 0 parameters
        self.head.weight.requires_grad_(False)
        self.extra = nn.Parameter(torch.zeros(5))  # in the totals, not a row


# Printed by pytorch_lightning 1.9.5's summarize() for the same model.
LIGHTNING_DEPTH_1 = """\
  | Name  | Type        | Params
--------------------------------------
0 | net   | Sequential  | 2.8 K 
1 | head  | Linear      | 22    
2 | bn    | BatchNorm1d | 8     
3 | block | Block       | 108   
4 | big   | Embedding   | 3.2 M 
5 | lazy  | LazyLinear  | 0     
--------------------------------------
3.2 M     Trainable params
20        Non-trainable params
3.2 M     Total params
12.812    Total estimated model params size (MB)"""

LIGHTNING_DEPTH_2 = """\
  | Name        | Type        | Params
--------------------------------------------
0 | net         | Sequential  | 2.8 K 
1 | net.0       | Linear      | 2.1 K 
2 | net.1       | ReLU        | 0     
3 | net.2       | Linear      | 650   
4 | head        | Linear      | 22    
5 | bn          | BatchNorm1d | 8     
6 | block       | Block       | 108   
7 | block.inner | Sequential  | 108   
8 | big         | Embedding   | 3.2 M 
9 | lazy        | LazyLinear  | 0     
--------------------------------------------
3.2 M     Trainable params
20        Non-trainable params
3.2 M     Total params
12.812    Total estimated model params size (MB)"""

LIGHTNING_EMPTY = """\
  | Name | Type | Params
------------------------------
------------------------------
0         Trainable params
0         Non-trainable params
0         Total params
0.000     Total estimated model params size (MB)"""


def test_summarize_equals_lightning():
    model = Mixed()
    assert summarize(model) == LIGHTNING_DEPTH_1
    assert summarize(model, max_depth=2) == LIGHTNING_DEPTH_2
    assert summarize(Module()) == LIGHTNING_EMPTY
    assert summarize(model, max_depth=0).splitlines()[:3] == ["  | Name | Type | Params", "-" * 30, "-" * 30]


def test_depths_select_rows():
    model = Mixed()
    every = [name for name, _ in model.named_modules()][1:]
    assert [name for name, _ in summarized_layers(model, -1)] == every
    assert [name for name, _ in summarized_layers(model, 3)] == [n for n in every if n.count(".") < 3]
    assert "block.inner.1.0" in every and "block.inner.1.0" not in dict(summarized_layers(model, 3))
    assert summarize(model, -1).count("\n") == len(every) + 6  # header, 2 dividers, 4 totals
    for bad in (-2, 1.0, True, "1"):
        with pytest.raises(ValueError, match=r"max_depth must be -1 \(all levels\), 0 \(no summary\) or > 0"):
            summarize(model, bad)


def test_human_count_equals_lightning():
    # (count, pytorch_lightning 1.9.5 get_human_readable_count)
    expected = [(0, "0  "), (9, "9  "), (999, "999  "), (1000, "1.0 K"), (1049, "1.0 K"), (1050, "1.1 K"),
                (1250, "1.2 K"), (2850, "2.9 K"), (9999, "10.0 K"), (99949, "99.9 K"), (99950, "100.0 K"),
                (100000, "100 K"), (999999, "999 K"), (1000000, "1.0 M"), (3000000000, "3.0 B"),
                (400000000000000, "400 T"), (5000000000000000, "5,000 T"), (123456789012345678, "123,456 T")]
    assert [(n, human_count(n)) for n, _ in expected] == expected
    with pytest.raises(ValueError, match="count >= 0, got -1"):
        human_count(-1)


def test_size_counts_the_parameters_bytes():
    model = TinyMLP()
    total = sum(p.numel() for p in model.parameters())
    assert total == 2762
    assert summarize(model).splitlines()[-1] == f"{total * 4e-6:<10.3f}Total estimated model params size (MB)"
    assert summarize(model.half()).splitlines()[-1] == f"{total * 2e-6:<10.3f}Total estimated model params size (MB)"


def test_callback_prints_the_table_at_fit_start(capsys):
    model = TinyMLP()
    table = summarize(model, 2)
    Trainer(max_epochs=1, callbacks=[ModelSummary(max_depth=2)], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, limit_train_batches=1).fit(model, random_loader(16, 16))
    assert capsys.readouterr().out == table + "\n"

    Trainer(max_epochs=1, callbacks=[ModelSummary(max_depth=0)], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, limit_train_batches=1).fit(model, random_loader(16, 16))
    assert capsys.readouterr().out == ""
    assert ModelSummary().max_depth == 1
    with pytest.raises(ValueError, match="got -3"):
        ModelSummary(max_depth=-3)
