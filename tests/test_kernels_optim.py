"""Fused SGD/Adam/AdamW kernels against torch.optim, on an arena of a few parameters.

Runs under the Triton interpreter on CPU (fp32). Tolerance: rtol=1e-5, atol=1e-6. The
kernels do the same fp32 arithmetic as torch's single-tensor path but in a different
order (one fused expression instead of separate ops, so different rounding), keep
hyperparameters as fp32 tensors where torch uses Python doubles, and compute
``beta ** step`` in fp32 (torch: double). Each of these costs a few ulps per step; over 5
steps on O(1) values the measured gap is at most ~5e-7 (SGD) and ~1.2e-7 (Adam).
"""
import pytest

from fastloop.kernels import triton_available, unavailable_reason

if not triton_available():
    pytest.skip(unavailable_reason(), allow_module_level=True)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from fastloop.kernels import FlatArena  # noqa: E402
from fastloop.kernels.optim_kernels import adam_update_, sgd_update_  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6
SHAPES = [(17, 9), (33,), (4, 5, 6), (1,)]
STEPS = 5
LRS = [0.1, 0.05, 0.05, 0.2, 0.01]  # changed between steps through the lr tensor


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _scalar(x: float) -> torch.Tensor:
    return torch.tensor(float(x), dtype=torch.float32, device=_device())


def _setup():
    dev = _device()
    params = [nn.Parameter(torch.randn(s, device=dev)) for s in SHAPES]
    ref = [nn.Parameter(p.detach().clone()) for p in params]
    return params, ref, FlatArena(params)


def _set_grads(params, ref, arena):
    for p, r in zip(params, ref):
        g = torch.randn_like(r)
        r.grad = g.clone()
        p.grad.copy_(g)  # p.grad is a view of arena.grad
    assert arena.grads_installed()


def _assert_params_close(params, ref):
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=RTOL, atol=ATOL)


SGD_CASES = [
    # momentum, dampening, nesterov, weight_decay, maximize
    (0.0, 0.0, False, 0.0, False),
    (0.0, 0.0, False, 0.01, True),
    (0.9, 0.0, False, 0.0, False),
    (0.9, 0.1, False, 0.05, False),
    (0.9, 0.0, True, 0.01, False),
    (0.8, 0.0, True, 0.0, True),
]


@pytest.mark.parametrize("momentum,dampening,nesterov,weight_decay,maximize", SGD_CASES)
def test_sgd_matches_torch(momentum, dampening, nesterov, weight_decay, maximize):
    params, ref, arena = _setup()
    opt = torch.optim.SGD(ref, lr=LRS[0], momentum=momentum, dampening=dampening,
                          nesterov=nesterov, weight_decay=weight_decay, maximize=maximize,
                          foreach=False)
    buf = arena.new_buffer() if momentum != 0 else None
    if buf is not None:
        buf.fill_(123.0)  # garbage: the first step must ignore the old buffer
    step, lr = _scalar(0), _scalar(LRS[0])
    hyper = dict(momentum=_scalar(momentum), dampening=_scalar(dampening),
                 weight_decay=_scalar(weight_decay))
    for lr_value in LRS[:STEPS]:
        lr.fill_(lr_value)  # device-side write: no recompile, graph-capturable
        for group in opt.param_groups:
            group["lr"] = lr_value
        _set_grads(params, ref, arena)
        opt.step()
        sgd_update_(arena.flat, arena.grad, buf, step, lr, nesterov=nesterov,
                    maximize=maximize, **hyper)
        _assert_params_close(params, ref)
    assert step.item() == STEPS
    if buf is not None:
        for view, r in zip(arena.views(buf), ref):
            torch.testing.assert_close(view, opt.state[r]["momentum_buffer"], rtol=RTOL, atol=ATOL)


ADAM_CASES = [
    # decoupled, amsgrad, weight_decay, maximize
    (False, False, 0.0, False),
    (False, True, 0.1, False),
    (False, False, 0.05, True),
    (True, False, 0.01, False),
    (True, True, 0.1, True),
]


@pytest.mark.parametrize("decoupled,amsgrad,weight_decay,maximize", ADAM_CASES)
def test_adam_matches_torch(decoupled, amsgrad, weight_decay, maximize):
    params, ref, arena = _setup()
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    betas, eps = (0.9, 0.99), 1e-8
    opt = cls(ref, lr=LRS[0], betas=betas, eps=eps, weight_decay=weight_decay,
              amsgrad=amsgrad, maximize=maximize, foreach=False)
    exp_avg, exp_avg_sq = arena.new_buffer(), arena.new_buffer()
    max_sq = arena.new_buffer() if amsgrad else None
    step, lr = _scalar(0), _scalar(LRS[0])
    hyper = dict(beta1=_scalar(betas[0]), beta2=_scalar(betas[1]), eps=_scalar(eps),
                 weight_decay=_scalar(weight_decay))
    for lr_value in [x * 0.1 for x in LRS[:STEPS]]:
        lr.fill_(lr_value)
        for group in opt.param_groups:
            group["lr"] = lr_value
        _set_grads(params, ref, arena)
        opt.step()
        adam_update_(arena.flat, arena.grad, exp_avg, exp_avg_sq, max_sq, step, lr,
                     decoupled=decoupled, amsgrad=amsgrad, maximize=maximize, **hyper)
        _assert_params_close(params, ref)
    assert step.item() == STEPS
    for name, flat in [("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("max_exp_avg_sq", max_sq)]:
        if flat is None:
            continue
        for view, r in zip(arena.views(flat), ref):
            torch.testing.assert_close(view, opt.state[r][name], rtol=RTOL, atol=ATOL)


def test_padding_stays_zero():
    params, _, arena = _setup()
    used = torch.zeros(arena.numel, dtype=torch.bool, device=arena.device)
    for off, n in zip(arena.offsets, arena.numels):
        used[off : off + n] = True
    assert (~used).any()
    arena.grad.normal_()
    arena.grad[~used] = 0  # the arena keeps padding zero; grads only land in views
    m, v = arena.new_buffer(), arena.new_buffer()
    adam_update_(arena.flat, arena.grad, m, v, None, _scalar(0), _scalar(0.1), _scalar(0.9),
                 _scalar(0.999), _scalar(1e-8), _scalar(0.1), decoupled=True)
    assert torch.all(arena.flat[~used] == 0) and torch.all(m[~used] == 0)


def test_argument_errors():
    p, g = torch.zeros(8, device=_device()), torch.zeros(8, device=_device())
    s = _scalar(0)
    with pytest.raises(ValueError, match="nesterov"):
        sgd_update_(p, g, None, s, s, s, s, s, nesterov=True)
    with pytest.raises(ValueError, match="amsgrad"):
        adam_update_(p, g, p.clone(), p.clone(), None, s, s, s, s, s, s, amsgrad=True)
    with pytest.raises(ValueError, match="elements"):
        sgd_update_(p, g[:4], None, s, s, s, s, s)
    with pytest.raises(TypeError, match="floating"):
        sgd_update_(p, g, None, torch.tensor(0, device=_device()), s, s, s, s)
    with pytest.raises(TypeError, match="one-element"):
        sgd_update_(p, g, None, s, 0.1, s, s, s)
    assert s.item() == 0  # failed calls must not advance the step


def test_registered_ops_match_launchers():
    from fastloop.kernels import ops

    if not ops.REGISTERED:
        pytest.skip("this torch has no torch.library.custom_op/triton_op")
    dev = _device()
    p = torch.randn(300, device=dev)
    g = torch.randn(300, device=dev)
    a = [p.clone(), torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p), _scalar(0)]
    b = [x.clone() for x in a]
    hyper = [_scalar(1e-2), _scalar(0.9), _scalar(0.999), _scalar(1e-8), _scalar(0.1)]
    for _ in range(2):
        adam_update_(a[0], g, a[1], a[2], a[3], a[4], *hyper, decoupled=True, amsgrad=True)
        torch.ops.fastloop.fused_adam(b[0], g, b[1], b[2], b[3], b[4], *hyper, True, True, False)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    buf_a, buf_b, sa, sb = torch.zeros_like(p), torch.zeros_like(p), _scalar(0), _scalar(0)
    pa, pb = p.clone(), p.clone()
    sgd_update_(pa, g, buf_a, sa, _scalar(0.1), _scalar(0.9), _scalar(0), _scalar(0), nesterov=True)
    torch.ops.fastloop.fused_sgd(pb, g, buf_b, sb, _scalar(0.1), _scalar(0.9), _scalar(0),
                                 _scalar(0), True, False)
    torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert sb.item() == 1


@pytest.mark.compile
def test_registered_op_inside_torch_compile():
    """The fused update inside one fullgraph compiled function (aot_eager: no C++ build)."""
    from fastloop.kernels import ops

    if not ops.REGISTERED:
        pytest.skip("this torch has no torch.library.custom_op/triton_op")
    dev = _device()
    p0, g = torch.randn(200, device=dev), torch.randn(200, device=dev)

    def step_fn(p, g, m, v, step, lr):
        torch.ops.fastloop.clip_grads(g, 1.0, None)
        torch.ops.fastloop.fused_adam(p, g, m, v, None, step, lr, _scalar(0.9), _scalar(0.999),
                                      _scalar(1e-8), _scalar(0.0), True, False, False)
        return p.sum()

    compiled = torch.compile(step_fn, backend="aot_eager", fullgraph=True)
    eager_args = [p0.clone(), g.clone(), torch.zeros_like(p0), torch.zeros_like(p0), _scalar(0)]
    comp_args = [x.clone() for x in eager_args]
    for lr_value in (0.1, 0.05):  # a new lr value must not need a new graph
        step_fn(*eager_args, _scalar(lr_value))
        compiled(*comp_args, _scalar(lr_value))
    for x, y in zip(eager_args, comp_args):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert comp_args[4].item() == 2


@pytest.mark.gpu
def test_adamw_bf16_params_fp32_state_on_gpu():
    """bf16 params and grads with fp32 state: math in fp32, compared with an fp32 reference."""
    dev = torch.device("cuda")
    p32 = torch.randn(5000, device=dev)
    p = p32.to(torch.bfloat16)
    ref = nn.Parameter(p.float())
    opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1, foreach=False)
    m, v = torch.zeros_like(p32), torch.zeros_like(p32)
    step = _scalar(0)
    hyper = [_scalar(1e-2), _scalar(0.9), _scalar(0.999), _scalar(1e-8), _scalar(0.1)]
    for _ in range(3):
        g = torch.randn_like(p32).to(torch.bfloat16)
        ref.grad = g.float()
        opt.step()
        adam_update_(p, g, m, v, None, step, *hyper, decoupled=True)
        with torch.no_grad():
            ref.copy_(ref.to(torch.bfloat16).float())  # same rounding of the stored param
    torch.testing.assert_close(p.float(), ref.detach(), rtol=1e-2, atol=1e-2)
