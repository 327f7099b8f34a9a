"""The fused step's Triton switch and mixed precision, on CPU.

Triton: ``conftest`` sets ``TRITON_INTERPRET=1`` on a machine without CUDA, so the kernels
run interpreted on CPU tensors and ``torch.ops.fastloop.*`` are opaque custom ops. The
kernels compute Adam's bias corrections in fp32 (torch: float64), so parameters agree to
about 1e-6 after 20 steps, not bit for bit.

Precision: the same fused code runs with CPU autocast (bf16; fp16 with the device loss
scale). References are plain eager loops with ``torch.autocast`` and ``torch.amp.GradScaler``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastloop import kernels
from fastloop.step.functional_optim import make_functional_optimizer
from fastloop.step.fused_step import build_fused_step
from fastloop.step.precision import DeviceLossScaler, autocast, make_grad_scaler

# The suite pins FASTLOOP_MODE=eager; these tests choose their modes themselves.
pytestmark = pytest.mark.usefixtures("no_mode_override")

needs_triton = pytest.mark.skipif(not kernels.triton_available(), reason=kernels.unavailable_reason() or "")

IN, HID, OUT, BATCH = 12, 16, 4, 8


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, OUT))


def batches(n: int = 12):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(BATCH, IN, generator=g), torch.randint(0, OUT, (BATCH,), generator=g)) for _ in range(n)]


def loss_fn_for(model):
    def loss_fn(params, buffers, x, y):
        out = torch.func.functional_call(model, {**params, **buffers}, (x,))
        return F.cross_entropy(out, y), {}

    return loss_fn


OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.01, foreach=False),
    "adamw-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=0.01, amsgrad=True, foreach=False),
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "sgd-plain": lambda ps: torch.optim.SGD(ps, lr=0.1),
}


# ------------------------------------------------------------------ Triton switch
@needs_triton
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_triton_update_matches_torch_optim(name):
    model, ref = make_model(), make_model()
    opt, ref_opt = OPTIMIZERS[name](model.parameters()), OPTIMIZERS[name](ref.parameters())
    params = list(model.parameters())
    fopt, reason = make_functional_optimizer(opt, params, use_triton=True)
    assert reason is None and fopt.use_triton, fopt.triton_reason
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for q, gr in zip(ref.parameters(), grads):
            q.grad = gr.clone()
        ref_opt.step()
        fopt.update(params, grads, fopt.prepare())
        fopt.finish()
    for p, q in zip(params, ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=2e-6)
    # the state keeps torch's keys, so state_dict round-trips with eager torch
    ref_opt.load_state_dict(opt.state_dict())


def test_triton_switch_off_or_unavailable_keeps_the_torch_update():
    model = make_model()
    opt = torch.optim.Adam(model.parameters())
    fopt, _ = make_functional_optimizer(opt, list(model.parameters()))
    assert not fopt.use_triton and fopt.triton_reason == "not requested"
    nc = nn.Parameter(torch.randn(4, 3).t())  # not contiguous
    fopt, _ = make_functional_optimizer(torch.optim.Adam([nc]), [nc], use_triton=True)
    assert not fopt.use_triton and "contiguous" in fopt.triton_reason or not kernels.triton_available()


def run_fused(use_triton: bool, clip, algorithm="norm", compile=False, opt_name="adam", accumulate=1):
    model = make_model()
    opt = OPTIMIZERS[opt_name](model.parameters())
    names = [n for n, _ in model.named_parameters()]
    fused, reason = build_fused_step(loss_fn_for(model), model, names, opt, clip_val=clip, clip_algorithm=algorithm,
                                     accumulate=accumulate, compile=compile, triton_kernels=use_triton)
    assert reason is None
    losses = []
    for i, (x, y) in enumerate(batches()):
        loss, _ = fused(x, y, step=(i + 1) % accumulate == 0)
        losses.append(loss)
    return model, fused, torch.stack(losses)


@needs_triton
@pytest.mark.parametrize("algorithm", ["norm", "value"])
@pytest.mark.parametrize("opt_name", ["adam", "sgd-nesterov"])
def test_fused_step_through_the_triton_switch_matches_torch(algorithm, opt_name):
    ref, _, ref_losses = run_fused(False, 0.3, algorithm, opt_name=opt_name, accumulate=2)
    model, fused, losses = run_fused(True, 0.3, algorithm, opt_name=opt_name, accumulate=2)
    assert fused.functional_optimizer.use_triton and fused._core_kwargs["triton_clip"]
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=2e-6)


@needs_triton
@pytest.mark.compile
def test_compiled_fused_step_with_triton_ops_matches_torch():
    """The custom ops (with flat views of the parameters) traced inside one fullgraph compile."""
    ref, _, ref_losses = run_fused(False, 0.3)
    model, fused, losses = run_fused(True, 0.3, compile=True)
    assert fused.graph_count == 1
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=2e-6)


# ------------------------------------------------------------------ precision
def eager_reference(precision: str, inject_inf_at: int = -1, n: int = 12):
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, foreach=False)
    scaler = make_grad_scaler("cpu", precision)
    losses, scales = [], []
    for i, (x, y) in enumerate(batches(n)):
        with autocast("cpu", precision):
            loss = F.cross_entropy(model(x), y)
        if i == inject_inf_at:
            loss = loss * float("inf")
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        else:
            opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return model, torch.stack(losses), scales


class InfAt:
    """Wraps a loss_fn so that call ``i`` returns an infinite loss (an fp16 overflow)."""

    def __init__(self, model, at: int):
        self.inner, self.at, self.calls = loss_fn_for(model), at, 0

    def __call__(self, params, buffers, x, y):
        loss, aux = self.inner(params, buffers, x, y)
        if self.calls == self.at:
            loss = loss * float("inf")
        self.calls += 1
        return loss, aux


def fused_run(precision: str, inject_inf_at: int = -1, n: int = 12):
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, foreach=False)
    names = [n_ for n_, _ in model.named_parameters()]
    fused, reason = build_fused_step(InfAt(model, inject_inf_at), model, names, opt, compile=False,
                                     precision=precision)
    assert reason is None
    losses, scales = [], []
    for x, y in batches(n):
        loss, _ = fused(x, y)
        losses.append(loss)
        if fused.scaler is not None:
            scales.append(float(fused.scaler.scale))
    return model, opt, torch.stack(losses), scales


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_fused_matches_eager_autocast(precision):
    ref, ref_losses, ref_scales = eager_reference(precision)
    model, _, losses, scales = fused_run(precision)
    assert torch.isfinite(losses).all()
    torch.testing.assert_close(losses.float(), ref_losses.float(), rtol=2e-2, atol=2e-2)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-2, atol=1e-3)
    assert scales == ref_scales


def test_fp16_overflow_skips_the_update_on_the_device_like_grad_scaler():
    at = 3
    ref, _, ref_scales = eager_reference("16-mixed", inject_inf_at=at, n=6)
    model, opt, _, scales = fused_run("16-mixed", inject_inf_at=at, n=6)
    assert scales == ref_scales and scales[at] == scales[at - 1] / 2
    # GradScaler skipped one optimizer.step(): the step count shows it
    steps = {float(opt.state[p]["step"]) for p in model.parameters()}
    assert steps == {5.0}
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-2, atol=1e-3)


def test_device_loss_scaler_grows_after_the_interval():
    s = DeviceLossScaler(torch.device("cpu"), init_scale=4.0, growth_interval=2)
    no, yes = torch.tensor(False), torch.tensor(True)
    for found in (no, no, no, yes):
        s.update(s.scale, s.growth_tracker, found)
    # 4 -> (2 clean) 8 -> (1 clean) 8 -> overflow 4
    assert float(s.scale) == 4.0 and int(s.growth_tracker) == 0


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_eager_trainer_uses_autocast_and_grad_scaler(precision):
    import copy

    from fastloop import Trainer
    from fastloop.testing import BoringModel, random_loader

    model = BoringModel(optimizer="sgd", lr=0.1)
    reference = copy.deepcopy(model)
    loader = random_loader(n=64, batch_size=16)
    trainer = Trainer(mode="eager", accelerator="cpu", precision=precision, max_epochs=2,
                      enable_progress_bar=False, num_sanity_val_steps=0, gradient_clip_val=1.0)
    trainer.fit(model, loader)
    assert (trainer.grad_scaler is not None) == (precision == "16-mixed")
    opt = reference.configure_optimizers()
    scaler = make_grad_scaler("cpu", precision)
    for _ in range(2):
        for x, y in loader:
            with autocast("cpu", precision):
                loss = reference.loss((x, y))
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.compile
@pytest.mark.parametrize("precision", [pytest.param("bf16-mixed", marks=pytest.mark.slow), "16-mixed"])  # 16-mixed: autocast and the loss scale
def test_compiled_mixed_precision_step_matches_uncompiled(precision):
    """autocast and the device loss scale traced inside the one fullgraph compiled function."""
    def run(compile):
        model = make_model()
        opt = torch.optim.Adam(model.parameters(), lr=0.01, foreach=False)
        names = [n for n, _ in model.named_parameters()]
        fused, _ = build_fused_step(loss_fn_for(model), model, names, opt, compile=compile, precision=precision)
        data = batches(5)
        if precision == "16-mixed":
            data[2][0][0, 0] = float("inf")  # an overflow at step 2, skipped on the device
        losses = torch.stack([fused(x, y)[0] for x, y in data])
        return model, fused, losses

    ref, _, ref_losses = run(False)
    model, fused, losses = run(True)
    assert fused.graph_count == 1
    if precision == "16-mixed":
        assert float(fused.scaler.scale) == 2.0 ** 15  # backed off once, on the device
    torch.testing.assert_close(losses.float(), ref_losses.float(), rtol=1e-2, atol=1e-2, equal_nan=True)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-2, atol=1e-3)
