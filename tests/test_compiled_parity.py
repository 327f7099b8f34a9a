"""Compiled mode against eager: the same parameters after 32 steps, over a covering matrix of
models x optimizers x step features, with no recompilation from LR schedulers.

Tolerance: the fused graph computes the same fp32 math, but inductor fuses and reorders
element-wise arithmetic (fused multiply-adds, reductions in another order), so results differ
by a few ulps per step and Adam's division by sqrt(v) + eps amplifies relative differences
where v is tiny. Over 32 steps the measured worst case is ~2e-6 absolute on weights of order
0.1-1 (see the assertion message); we allow rtol=1e-4, atol=1e-5, well below the ~1e-2 changes
the training itself makes, so a wrong update (a missing clip, a skipped accumulation, a stale
LR) still fails.
"""
import copy
import itertools

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastloop import CompileConfig, Module, Trainer

pytestmark = [pytest.mark.compile, pytest.mark.usefixtures("no_mode_override")]
STEPS = 32
# Dropout masks equal to eager: inductor calls the same ATen random ops in the same order.
DETERMINISTIC = CompileConfig(inductor_config={"fallback_random": True})


def mlp():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def mlp_bn_dropout():
    # No bias before BatchNorm: its true gradient is zero, so what backward computes there is
    # rounding noise, which Adam rescales to full-size steps of random sign in either mode.
    return nn.Sequential(nn.Linear(16, 32, bias=False), nn.BatchNorm1d(32), nn.Tanh(), nn.Dropout(0.2), nn.Linear(32, 4))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 8, 3))
        self.head = nn.Linear(8 * 2 * 2, 4)

    def forward(self, x):
        return self.head(self.conv(x.view(-1, 1, 4, 4).repeat(1, 1, 2, 2)).flatten(1))


class TransformerBlock(nn.Module):
    """One pre-norm attention + MLP block. The key projection has no bias: its true gradient
    is zero (softmax ignores a constant added to every key score), so Adam would amplify
    rounding noise there, as with a bias before BatchNorm."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(4, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        h = self.embed(x.view(-1, 4, 4))
        n = self.norm1(h)
        b, t, d = n.shape

        def split(z):
            return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        att = torch.softmax(split(self.q(n)) @ split(self.k(n)).transpose(-1, -2) / (d // self.heads) ** 0.5, -1)
        h = h + self.out((att @ split(self.v(n))).transpose(1, 2).reshape(b, t, d))
        h = h + self.mlp(self.norm2(h))
        return self.head(h.mean(1))


MODELS = {"mlp": mlp, "mlp_bn_dropout": mlp_bn_dropout, "cnn": SmallCNN, "transformer": TransformerBlock}
OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4),
    "adam": lambda p: torch.optim.Adam(p, lr=3e-3, weight_decay=1e-4),
    "adamw": lambda p: torch.optim.AdamW(p, lr=3e-3, amsgrad=True),
}
FEATURES = ["plain", "clip", "accumulate", "scheduler"]


def covering_matrix():
    """Every (model, optimizer) pair once; features rotate so each meets every optimizer.

    The CNN and transformer graphs take 30-90 s each to compile on a 2-core CPU, so the
    default run keeps four cases (``QUICK``); ``pytest -m slow`` runs the whole matrix.
    """
    cases = []
    for i, (model, opt) in enumerate(itertools.product(MODELS, OPTIMIZERS)):
        case = (model, opt, FEATURES[i % len(FEATURES)])
        quick = case in QUICK
        cases.append(pytest.param(*case, marks=() if quick else pytest.mark.slow))
    return cases


# The default run's cases: AdamW, accumulation and the other BatchNorm/Dropout cases are covered
# by the parity fuzz sample (tests/test_parity_fuzz.py).
QUICK = {("mlp", "sgd_momentum", "plain"), ("mlp", "adam", "clip"),
         ("mlp_bn_dropout", "sgd_momentum", "scheduler"), ("cnn", "adam", "scheduler")}


class Net(Module):
    def __init__(self, model_name, opt_name, feature):
        super().__init__()
        self.net = MODELS[model_name]()
        self.opt_name, self.feature = opt_name, feature

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = OPTIMIZERS[self.opt_name](self.parameters())
        if self.feature != "scheduler":
            return opt
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=STEPS + 1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader():
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(STEPS * 8, 16, generator=g), torch.randint(0, 4, (STEPS * 8,), generator=g)),
                      batch_size=8)


def run(model, mode, feature):
    trainer = Trainer(
        max_steps=STEPS if feature != "accumulate" else STEPS // 2, mode=mode, enable_progress_bar=False,
        gradient_clip_val=0.5 if feature == "clip" else None,
        accumulate_grad_batches=2 if feature == "accumulate" else 1, compile_config=DETERMINISTIC,
    )
    torch.manual_seed(7)
    trainer.fit(model, loader())
    return trainer


@pytest.mark.parametrize("model_name, opt_name, feature", covering_matrix())
def test_compiled_matches_eager(model_name, opt_name, feature):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager_model = Net(model_name, opt_name, feature)
    compiled_model = copy.deepcopy(eager_model)
    eager = run(eager_model, "eager", feature)
    compiled = run(compiled_model, "compiled", feature)
    report = compiled.fit_loop.epoch_loop.batch_loop.optimizer_loop.step_report
    assert report.used == "compiled", compiled.explain()
    assert compiled.global_step == eager.global_step
    for (name, a), b in zip(eager_model.state_dict().items(), compiled_model.state_dict().values()):
        if a.is_floating_point():
            worst = (a - b).abs().max().item()
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), f"{name}: max abs diff {worst:.3g}"
        else:
            assert torch.equal(a, b), name
    assert torch.allclose(eager.callback_metrics["train_loss"], compiled.callback_metrics["train_loss"],
                          rtol=1e-4, atol=1e-5)
    step = compiled.fit_loop.epoch_loop.batch_loop.optimizer_loop.train_step
    # one graph per kind of call: stepping (+ accumulate-only with accumulation); the
    # OneCycleLR changes lr and momentum every step without recompiling
    assert step.graph_count == (2 if feature == "accumulate" else 1)
