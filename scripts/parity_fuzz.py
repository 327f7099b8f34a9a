"""Seeded fuzz: random loop configurations fitted in eager and in compiled mode must agree.

Each configuration draws an optimizer setup (SGD / Adam / AdamW with random hyperparameters,
one optimizer or two on a GAN-like module with ``optimizer_idx``, optionally with optimizer
frequencies), gradient accumulation, clipping, an LR scheduler, the validation schedule, a last
partial batch, BatchNorm or Dropout, and what ``self.log`` records. The same seeded model is
fitted in both modes; parameters, buffers, optimizer state, ``callback_metrics`` and the
counters are compared with the tolerance of ``tests/test_compiled_parity.py`` (rtol=1e-4,
atol=1e-5: a few ulps of reordered fp32 arithmetic per step, far below what a wrong update
changes).

    python scripts/parity_fuzz.py --count 20 --seed 0

prints one line per configuration and a summary; the exit status is 1 when any diverged.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import random
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastloop import CompileConfig, Module, Trainer

RTOL, ATOL = 1e-4, 1e-5  # the tolerance of tests/test_compiled_parity.py; do not widen
# Dropout masks equal to eager: inductor calls the same ATen random ops in the same order.
DETERMINISTIC = CompileConfig(inductor_config={"fallback_random": True})
FEATURES, CLASSES, NOISE = 8, 4, 4


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    kind: str  # "sgd" | "adam" | "adamw"
    kwargs: Tuple[Tuple[str, Any], ...]

    def build(self, params: Any) -> torch.optim.Optimizer:
        cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[self.kind]
        return cls(params, **dict(self.kwargs))


@dataclasses.dataclass(frozen=True)
class FuzzConfig:
    index: int
    seed: int
    optimizers: Tuple[OptimizerSpec, ...]
    frequencies: Optional[Tuple[int, ...]]  # two optimizers only
    accumulate: int
    clip: Optional[Tuple[str, float]]  # ("norm" | "value", value)
    scheduler: Optional[Tuple[str, float, int, str]]  # (kind, gamma, step_size, interval)
    val_check_interval: float  # 1.0: once per epoch
    batch_size: int
    samples: int  # never a multiple of batch_size: the last batch is partial
    layer: str  # "batchnorm" | "dropout" | "none"
    log_on: str  # "step" | "epoch" | "both"
    max_epochs: int

    def describe(self) -> str:
        opts = "+".join(f"{o.kind}({','.join(f'{k}={_short(v)}' for k, v in o.kwargs)})" for o in self.optimizers)
        parts = [f"#{self.index}", opts]
        if self.frequencies:
            parts.append(f"freq={list(self.frequencies)}")
        parts += [f"acc={self.accumulate}", f"clip={self.clip[0]}:{_short(self.clip[1])}" if self.clip else "clip=none"]
        if self.scheduler:
            kind, gamma, step_size, interval = self.scheduler
            parts.append(f"sched={kind}(g={_short(gamma)}{f',s={step_size}' if kind == 'step' else ''})/{interval}")
        else:
            parts.append("sched=none")
        parts += [f"val={self.val_check_interval:g}", f"n={self.samples}/bs={self.batch_size}", self.layer,
                  f"log={self.log_on}", f"epochs={self.max_epochs}"]
        return " ".join(parts)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, tuple):
        return "(" + ",".join(_short(x) for x in v) + ")"
    return str(v)


def _optimizer(rng: random.Random) -> OptimizerSpec:
    kind = rng.choice(["sgd", "adam", "adamw"])
    wd = rng.choice([0.0, round(10 ** rng.uniform(-4, -2), 6)])
    if kind == "sgd":
        momentum = rng.choice([0.0, round(rng.uniform(0.5, 0.95), 3)])
        kwargs: Dict[str, Any] = {"lr": round(10 ** rng.uniform(-2.3, -1), 5), "momentum": momentum, "weight_decay": wd}
        if momentum and rng.random() < 0.5:
            kwargs["nesterov"] = True  # valid only with momentum and no dampening
        return OptimizerSpec(kind, tuple(kwargs.items()))
    betas = (round(rng.uniform(0.8, 0.95), 3), round(rng.uniform(0.99, 0.999), 4))
    kwargs = {"lr": round(10 ** rng.uniform(-3, -2), 5), "betas": betas, "weight_decay": wd}
    if rng.random() < 0.25:
        kwargs["amsgrad"] = True
    return OptimizerSpec(kind, tuple(kwargs.items()))


def generate(count: int, seed: int) -> List[FuzzConfig]:
    """``count`` configurations, the same for the same ``seed``."""
    rng = random.Random(seed)
    configs = []
    for index in range(count):
        two = rng.random() < 0.35
        layer = rng.choice(["batchnorm", "dropout", "none"])
        batch_size = rng.randint(3, 8)
        # BatchNorm cannot train on a batch of one sample: its partial last batch holds >= 2
        samples = batch_size * rng.randint(2, 5) + rng.randint(2 if layer == "batchnorm" else 1, batch_size - 1)
        clip_kind = rng.choice([None, "norm", "value"])
        sched_kind = rng.choice([None, "step", "exponential"])
        configs.append(FuzzConfig(
            index=index,
            seed=rng.randrange(2 ** 31),
            optimizers=tuple(_optimizer(rng) for _ in range(2 if two else 1)),
            frequencies=(rng.randint(1, 2), rng.randint(1, 2)) if two and rng.random() < 0.5 else None,
            accumulate=rng.randint(1, 4),
            clip=(clip_kind, round(rng.uniform(0.05, 1.0), 3)) if clip_kind else None,
            scheduler=(sched_kind, round(rng.uniform(0.5, 0.95), 3), rng.randint(1, 3), rng.choice(["step", "epoch"]))
            if sched_kind else None,
            val_check_interval=rng.choice([1.0, 0.5, 0.34]),
            batch_size=batch_size,
            samples=samples,
            layer=layer,
            log_on=rng.choice(["step", "epoch", "both"]),
            max_epochs=rng.randint(1, 2),
        ))
    return configs


def _body(width: int, layer: str) -> List[nn.Module]:
    # No bias before BatchNorm: its true gradient is zero and Adam would turn the rounding noise
    # there into full-size steps of random sign (see tests/test_compiled_parity.py).
    first = nn.Linear(width, 16, bias=layer != "batchnorm")
    extra = {"batchnorm": [nn.BatchNorm1d(16)], "dropout": [nn.Dropout(0.2)], "none": []}[layer]
    return [first, *extra, nn.Tanh()]


class _FuzzModule(Module):
    def __init__(self, config: FuzzConfig):
        super().__init__()
        self.config = config
        self.log_kwargs = {"step": {"on_step": True, "on_epoch": False}, "epoch": {"on_step": False, "on_epoch": True},
                           "both": {"on_step": True, "on_epoch": True}}[config.log_on]

    def configure_optimizers(self):
        groups = self.parameter_groups()
        optimizers = [spec.build(params) for spec, params in zip(self.config.optimizers, groups)]
        configs = []
        for i, opt in enumerate(optimizers):
            entry: Dict[str, Any] = {"optimizer": opt}
            if self.config.scheduler:
                kind, gamma, step_size, interval = self.config.scheduler
                sched = (torch.optim.lr_scheduler.StepLR(opt, step_size, gamma) if kind == "step"
                         else torch.optim.lr_scheduler.ExponentialLR(opt, gamma))
                entry["lr_scheduler"] = {"scheduler": sched, "interval": interval}
            if self.config.frequencies:
                entry["frequency"] = self.config.frequencies[i]
            configs.append(entry)
        if len(configs) == 1:
            return configs[0]
        return configs


class Classifier(_FuzzModule):
    def __init__(self, config: FuzzConfig):
        super().__init__(config)
        self.net = nn.Sequential(*_body(FEATURES, config.layer), nn.Linear(16, CLASSES))

    def parameter_groups(self):
        return [self.parameters()]

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log("train_loss", loss, **self.log_kwargs)
        self.log("logit_mean", logits.mean(), **self.log_kwargs)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))


class Gan(_FuzzModule):
    """A generator and a discriminator, one optimizer each, as Lightning 1.x's GAN example."""

    def __init__(self, config: FuzzConfig):
        super().__init__(config)
        self.generator = nn.Sequential(*_body(NOISE, config.layer), nn.Linear(16, FEATURES))
        self.discriminator = nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, 1))

    def parameter_groups(self):
        return [self.generator.parameters(), self.discriminator.parameters()]

    def training_step(self, batch, batch_idx, optimizer_idx):
        x, _, z = batch
        bce = nn.functional.binary_cross_entropy_with_logits
        fake = self.generator(z)
        if optimizer_idx == 0:
            score = self.discriminator(fake)
            loss = bce(score, torch.ones_like(score))
            self.log("g_loss", loss, **self.log_kwargs)
            self.log("fake_mean", fake.mean(), **self.log_kwargs)
        else:
            real, faked = self.discriminator(x), self.discriminator(fake.detach())
            loss = bce(real, torch.ones_like(real)) + bce(faked, torch.zeros_like(faked))
            self.log("d_loss", loss, **self.log_kwargs)
        return loss

    def validation_step(self, batch, batch_idx):
        _, _, z = batch
        score = self.discriminator(self.generator(z))
        self.log("val_loss", nn.functional.binary_cross_entropy_with_logits(score, torch.ones_like(score)))


def build_model(config: FuzzConfig) -> Module:
    torch.manual_seed(config.seed)
    return (Gan if len(config.optimizers) == 2 else Classifier)(config)


def loaders(config: FuzzConfig) -> Tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(config.seed)

    def dataset(n: int) -> TensorDataset:
        return TensorDataset(torch.randn(n, FEATURES, generator=g), torch.randint(0, CLASSES, (n,), generator=g),
                             torch.randn(n, NOISE, generator=g))

    return (DataLoader(dataset(config.samples), batch_size=config.batch_size),
            DataLoader(dataset(2 * config.batch_size + 1), batch_size=config.batch_size))


def fit(model: Module, config: FuzzConfig, mode: str) -> Trainer:
    trainer = Trainer(
        mode=mode, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        max_epochs=config.max_epochs, accumulate_grad_batches=config.accumulate,
        gradient_clip_val=config.clip[1] if config.clip else None,
        gradient_clip_algorithm=config.clip[0] if config.clip else "norm",
        val_check_interval=config.val_check_interval, compile_config=DETERMINISTIC,
    )
    train, val = loaders(config)
    torch.manual_seed(7)  # the same dropout masks in both modes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, train, val)
    return trainer


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return torch.allclose(a, b, rtol=RTOL, atol=ATOL)
    return torch.equal(a, b)


def _diff(name: str, a: Any, b: Any) -> Optional[str]:
    """None when equal within tolerance, else what differs and by how much."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if _close(a, b):
            return None
        if a.shape != b.shape:
            return f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        worst = (a.double() - b.double()).abs().max().item()
        return f"{name}: max abs diff {worst:.3g} (eager max |x| {a.double().abs().max().item():.3g})"
    if a != b:
        return f"{name}: {a!r} vs {b!r}"
    return None


def compare(eager_model: Module, eager: Trainer, compiled_model: Module, compiled: Trainer) -> List[str]:
    """Every difference between the two fits, one string each."""
    diffs: List[Optional[str]] = []
    diffs.append(_diff("global_step", eager.global_step, compiled.global_step))
    diffs.append(_diff("current_epoch", eager.current_epoch, compiled.current_epoch))
    sd_e, sd_c = eager_model.state_dict(), compiled_model.state_dict()
    diffs.append(_diff("state_dict keys", sorted(sd_e), sorted(sd_c)))
    diffs += [_diff(name, sd_e[name], sd_c[name]) for name in sd_e if name in sd_c]
    for i, (oe, oc) in enumerate(zip(eager.optimizers, compiled.optimizers)):
        se, sc = oe.state_dict(), oc.state_dict()
        diffs.append(_diff(f"opt{i} lr", [g["lr"] for g in se["param_groups"]], [g["lr"] for g in sc["param_groups"]]))
        diffs.append(_diff(f"opt{i} state keys", sorted(se["state"]), sorted(sc["state"])))
        for p, state in se["state"].items():
            for key, value in state.items():
                diffs.append(_diff(f"opt{i}.state[{p}].{key}", value, sc["state"].get(p, {}).get(key)))
    me, mc = eager.callback_metrics, compiled.callback_metrics
    diffs.append(_diff("callback_metrics keys", sorted(me), sorted(mc)))
    diffs += [_diff(f"metric {k}", torch.as_tensor(me[k]), torch.as_tensor(mc[k])) for k in me if k in mc]
    return [d for d in diffs if d]


@dataclasses.dataclass
class Outcome:
    config: FuzzConfig
    used: str  # the mode the compiled run's training step used
    diffs: List[str]
    seconds: float

    def line(self) -> str:
        verdict = "ok" if not self.diffs else "DIVERGED " + "; ".join(self.diffs[:4]) + (
            f" (+{len(self.diffs) - 4} more)" if len(self.diffs) > 4 else "")
        return f"{verdict:<8} [{self.used}, {self.seconds:.0f}s] {self.config.describe()}"


def run_config(config: FuzzConfig) -> Outcome:
    torch._dynamo.reset()  # every configuration compiles from scratch
    start = time.perf_counter()
    eager_model = build_model(config)
    compiled_model = copy.deepcopy(eager_model)
    eager = fit(eager_model, config, "eager")
    compiled = fit(compiled_model, config, "compiled")
    report = compiled.fit_loop.epoch_loop.batch_loop.optimizer_loop.step_report
    diffs = compare(eager_model, eager, compiled_model, compiled)
    return Outcome(config, report.used if report else "?", diffs, time.perf_counter() - start)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20, help="configurations to run (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    parser.add_argument("--start", type=int, default=0, help="skip the first START configurations")
    args = parser.parse_args(argv)
    # FASTLOOP_MODE would override Trainer(mode=...) and make both runs the same mode.
    os.environ.pop("FASTLOOP_MODE", None)
    outcomes = []
    for config in generate(args.start + args.count, args.seed)[args.start:]:
        try:
            outcome = run_config(config)
        except Exception as exc:  # noqa: BLE001 - a crash in one mode is a divergence too; keep fuzzing
            outcome = Outcome(config, "error", [f"{type(exc).__name__}: {exc}"[:300]], 0.0)
        outcomes.append(outcome)
        print(outcome.line(), flush=True)
    bad = [o for o in outcomes if o.diffs]
    fused = sum(o.used == "compiled" for o in outcomes)
    print(f"summary: {len(outcomes)} configurations (seed {args.seed}), {len(outcomes) - len(bad)} agree, "
          f"{len(bad)} diverged{': #' + ', #'.join(str(o.config.index) for o in bad) if bad else ''}; "
          f"{fused} ran the fused compiled step", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
