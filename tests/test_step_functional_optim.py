"""Functional SGD/Adam/AdamW against torch.optim, eagerly (no compile: fast).

Tolerance: both sides do the same float32 math in the same order; what differs
is elementwise rounding (ATen's CPU kernels fuse some multiply-adds, e.g.
``add_(x, alpha=a)``; ours are separate ops), about 1 ulp per op per step.
Over 30 steps that stays below 1e-6 relative; we assert rtol=1e-6 plus an
atol of 1e-7 for entries near zero.
"""
from __future__ import annotations

import copy

import pytest
import torch

from fastloop.step.functional_optim import make_functional_optimizer

RTOL, ATOL = 1e-6, 1e-7

CASES = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, maximize=True)),
    ("Adam", dict(lr=1e-2)),
    ("Adam", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    ("Adam", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, maximize=True)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True)),
]


def _params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(7, 5, generator=g).requires_grad_(), torch.randn(5, generator=g).requires_grad_()]


def _grads(step: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    # Gradients depend on the parameters, as in training (errors compound).
    return [torch.randn(p.shape, generator=g) + 0.1 * p.detach() for p in params]


def _make(name: str, params, kw, **extra):
    cls = getattr(torch.optim, name)
    extra.setdefault("foreach", False)  # the single-tensor path is our reference
    return cls(params, **kw, **extra)


def _eager_step(opt, params, step):
    for p, g in zip(params, _grads(step, params)):
        p.grad = g
    opt.step()


def _fused_step(fopt, params, step):
    grads = _grads(step, params)
    inputs = fopt.prepare()
    fopt.update([p.detach() for p in params], grads, inputs)
    fopt.finish()


def _assert_close(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name,kw", CASES)
def test_matches_torch_for_30_steps(name, kw):
    ref_params, fused_params = _params(), _params()
    ref = _make(name, ref_params, kw)
    opt = _make(name, fused_params, kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=7, gamma=0.5)
    fopt, reason = make_functional_optimizer(opt, fused_params)
    assert reason is None and fopt is not None
    for step in range(30):
        _eager_step(ref, ref_params, step)
        _fused_step(fopt, fused_params, step)
        ref_sched.step()
        sched.step()
    _assert_close(ref_params, fused_params)
    # Same state keys, dtypes and devices as torch keeps.
    for rp, fp in zip(ref_params, fused_params):
        rs, fs = ref.state[rp], opt.state[fp]
        assert rs.keys() == fs.keys()
        for key in rs:
            assert rs[key].dtype == fs[key].dtype and rs[key].device == fs[key].device, key
            torch.testing.assert_close(rs[key], fs[key], rtol=RTOL, atol=ATOL)


def test_reduce_lr_on_plateau_floats_are_picked_up():
    ref_params, fused_params = _params(), _params()
    ref, opt = _make("Adam", ref_params, dict(lr=0.1)), _make("Adam", fused_params, dict(lr=0.1))
    fopt, _ = make_functional_optimizer(opt, fused_params)
    rs = torch.optim.lr_scheduler.ReduceLROnPlateau(ref, patience=0, factor=0.5)
    fs = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    for step in range(10):
        _eager_step(ref, ref_params, step)
        _fused_step(fopt, fused_params, step)
        rs.step(1.0)  # never improves: LR halves every step
        fs.step(1.0)
    assert opt.param_groups[0]["lr"] < 0.01
    _assert_close(ref_params, fused_params)


@pytest.mark.parametrize("name,kw", [CASES[2], CASES[5], CASES[8]])
@pytest.mark.parametrize("order", ["fused_then_eager", "eager_then_fused"])
def test_state_dict_cross_loading(name, kw, order):
    all_eager = _params()
    ref = _make(name, all_eager, kw)
    for step in range(20):
        _eager_step(ref, all_eager, step)

    first_params = _params()
    first = _make(name, first_params, kw)
    fopt, _ = make_functional_optimizer(first, first_params)
    for step in range(10):
        if order == "fused_then_eager":
            _fused_step(fopt, first_params, step)
        else:
            _eager_step(first, first_params, step)
    saved = copy.deepcopy(first.state_dict())

    second_params = [p.detach().clone().requires_grad_() for p in first_params]
    second = _make(name, second_params, kw)
    second.load_state_dict(saved)
    fopt2, _ = make_functional_optimizer(second, second_params)
    for step in range(10, 20):
        if order == "fused_then_eager":
            _eager_step(second, second_params, step)
        else:
            _fused_step(fopt2, second_params, step)
    _assert_close(all_eager, second_params)


def test_load_state_dict_into_same_optimizer_is_honoured():
    """State is looked up every step, so a reload mid-run takes effect."""
    params = _params()
    opt = _make("SGD", params, dict(lr=0.1, momentum=0.9))
    fopt, _ = make_functional_optimizer(opt, params)
    _fused_step(fopt, params, 0)
    snapshot = copy.deepcopy(opt.state_dict())
    before = [p.detach().clone() for p in params]
    _fused_step(fopt, params, 1)
    opt.load_state_dict(snapshot)
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
    _fused_step(fopt, params, 1)

    ref_params = _params()
    ref = _make("SGD", ref_params, dict(lr=0.1, momentum=0.9))
    _eager_step(ref, ref_params, 0)
    _eager_step(ref, ref_params, 1)
    _assert_close(ref_params, params)


@pytest.mark.parametrize(
    "factory,needle",
    [
        (lambda ps: torch.optim.RMSprop(ps), "RMSprop has no fused update"),
        (lambda ps: torch.optim.Adam(ps, differentiable=True), "differentiable"),
        (lambda ps: torch.optim.Adam(ps, fused=True), "fused=True"),
        (lambda ps: torch.optim.Adam(ps, capturable=True), "capturable"),
        (lambda ps: torch.optim.Adam(ps, betas=(torch.tensor(0.9), torch.tensor(0.99))), "tensor betas"),
    ],
)
def test_unsupported_gives_reason(factory, needle):
    params = _params()
    fopt, reason = make_functional_optimizer(factory(params), params)
    assert fopt is None
    assert needle in reason


def test_step_hooks_are_unsupported():
    params = _params()
    opt = torch.optim.SGD(params, lr=0.1)
    opt.register_step_pre_hook(lambda *a: None)
    fopt, reason = make_functional_optimizer(opt, params)
    assert fopt is None and "hooks" in reason


def test_foreign_parameter_is_unsupported():
    params = _params()
    opt = torch.optim.SGD(params[:1], lr=0.1)
    fopt, reason = make_functional_optimizer(opt, params)
    assert fopt is None and "param groups" in reason


def test_structural_change_after_build_raises():
    params = _params()
    opt = torch.optim.Adam(params, lr=0.1)
    fopt, _ = make_functional_optimizer(opt, params)
    opt.param_groups[0]["amsgrad"] = True
    with pytest.raises(RuntimeError, match="structural"):
        fopt.prepare()


def test_tensor_lr_is_copied_each_step():
    ref_params, fused_params = _params(), _params()
    ref = torch.optim.Adam(ref_params, lr=torch.tensor(0.01), foreach=False)
    opt = torch.optim.Adam(fused_params, lr=torch.tensor(0.01), foreach=False)
    fopt, reason = make_functional_optimizer(opt, fused_params)
    assert reason is None
    for step in range(5):
        for o in (ref, opt):
            o.param_groups[0]["lr"].fill_(0.01 / (step + 1))
        _eager_step(ref, ref_params, step)
        _fused_step(fopt, fused_params, step)
    _assert_close(ref_params, fused_params)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_float_dtypes(dtype):
    """fp64 matches tightly; bf16 runs with scalars in float32 (torch's opmath) and
    stays within bf16 resolution (a few ulp, 2**-8 relative each) of torch."""
    ref_params = [p.detach().to(dtype).requires_grad_() for p in _params()]
    fused_params = [p.detach().to(dtype).requires_grad_() for p in _params()]
    ref = torch.optim.Adam(ref_params, lr=1e-2, foreach=False)
    opt = torch.optim.Adam(fused_params, lr=1e-2, foreach=False)
    fopt, _ = make_functional_optimizer(opt, fused_params)
    for step in range(10):
        for p, g in zip(ref_params, _grads(step, ref_params)):
            p.grad = g.to(dtype)
        ref.step()
        inputs = fopt.prepare()
        fopt.update([p.detach() for p in fused_params], [g.to(dtype) for g in _grads(step, fused_params)], inputs)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(ref_params, fused_params):
        torch.testing.assert_close(b.detach(), a.detach(), **tol)
