"""Fused grad norm / clip / found_inf against torch.nn.utils.clip_grad_norm_/clip_grad_value_.

Tolerance rtol=1e-5, atol=1e-6: the kernel sums squares per block then sums the block
partials (fp32), while torch takes per-tensor norms and then the norm of those; the two
summation orders differ by a few ulps of the total for a few thousand elements.
"""
import math

import pytest

from fastloop.kernels import triton_available, unavailable_reason

if not triton_available():
    pytest.skip(unavailable_reason(), allow_module_level=True)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from fastloop.kernels import FlatArena  # noqa: E402
from fastloop.kernels.grad_norm import clip_grads_, flat_grad_norm  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6
SHAPES = [(40, 30), (77,), (5, 6, 7), (3,)]


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _setup(scale: float = 1.0):
    params = [nn.Parameter(torch.randn(s, device=_device())) for s in SHAPES]
    ref = [nn.Parameter(p.detach().clone()) for p in params]
    arena = FlatArena(params)
    for p, r in zip(params, ref):
        g = torch.randn_like(r) * scale
        p.grad.copy_(g)
        r.grad = g.clone()
    return params, ref, arena


def _assert_grads(params, ref):
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r.grad, rtol=RTOL, atol=ATOL, equal_nan=True)


@pytest.mark.parametrize("max_norm", [1.0, 1e6])  # clipping active / inactive
def test_norm_and_clip_match_torch(max_norm):
    params, ref, arena = _setup()
    norm, found_inf = clip_grads_(arena.grad, max_norm=max_norm)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm, foreach=False)
    assert norm.shape == () and norm.device == arena.device
    torch.testing.assert_close(norm, ref_norm, rtol=RTOL, atol=ATOL)
    assert found_inf.item() == 0.0
    _assert_grads(params, ref)


def test_clip_value_matches_torch():
    params, ref, arena = _setup()
    norm, _ = clip_grads_(arena.grad, clip_value=0.5)
    expected_norm = torch.linalg.vector_norm(torch.cat([r.grad.reshape(-1) for r in ref]))
    torch.nn.utils.clip_grad_value_(ref, 0.5, foreach=False)
    torch.testing.assert_close(norm, expected_norm, rtol=RTOL, atol=ATOL)  # norm before clip
    _assert_grads(params, ref)
    assert arena.grad.abs().max().item() <= 0.5


def test_norm_then_value():
    params, ref, arena = _setup()
    clip_grads_(arena.grad, max_norm=2.0, clip_value=0.05)
    torch.nn.utils.clip_grad_norm_(ref, 2.0, foreach=False)
    torch.nn.utils.clip_grad_value_(ref, 0.05, foreach=False)
    _assert_grads(params, ref)


def test_grad_norm_does_not_modify_and_many_blocks():
    # block=2 gives more partials than the finalize kernel reduces per loop iteration
    g = torch.randn(2500, device=_device())
    before = g.clone()
    norm, found_inf = flat_grad_norm(g, block=2)
    torch.testing.assert_close(norm, torch.linalg.vector_norm(g), rtol=RTOL, atol=ATOL)
    assert found_inf.item() == 0.0
    assert torch.equal(g, before)


# numpy (the interpreter's backend) warns about inf * 0 and overflow: expected here
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_grad(bad):
    params, ref, arena = _setup()
    params[1].grad[10] = bad
    ref[1].grad[10] = bad
    norm, found_inf = clip_grads_(arena.grad, max_norm=1.0)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0, foreach=False)
    assert found_inf.item() == 1.0
    torch.testing.assert_close(norm, ref_norm, equal_nan=True)  # inf, or nan for nan
    _assert_grads(params, ref)  # same 0/nan pattern as torch after scaling


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_large_finite_grads_are_not_flagged():
    # squares overflow fp32 (norm becomes inf) but every value is finite
    g = torch.full((64,), 1e30, device=_device())
    norm, found_inf = flat_grad_norm(g)
    assert found_inf.item() == 0.0
    assert math.isinf(norm.item())


def test_empty_buffer():
    norm, found_inf = clip_grads_(torch.zeros(0, device=_device()), max_norm=1.0)
    assert norm.item() == 0.0 and found_inf.item() == 0.0


def test_rejects_non_flat():
    with pytest.raises(ValueError):
        flat_grad_norm(torch.zeros(3, 3, device=_device()))
    with pytest.raises(ValueError):
        clip_grads_(torch.zeros(3, device=_device()), clip_value=-1.0)


def test_registered_op_matches():
    from fastloop.kernels import ops

    if not ops.REGISTERED:
        pytest.skip("this torch has no torch.library.custom_op/triton_op")
    g = torch.randn(1000, device=_device())
    g2 = g.clone()
    n1, f1 = clip_grads_(g, max_norm=1.0, clip_value=0.01)
    n2, f2 = torch.ops.fastloop.clip_grads(g2, 1.0, 0.01)
    assert torch.equal(n1, n2) and torch.equal(f1, f2) and torch.equal(g, g2)


@pytest.mark.gpu
def test_bf16_grads_on_gpu():
    g = torch.randn(10000, device="cuda").to(torch.bfloat16)
    norm, found_inf = clip_grads_(g.clone(), max_norm=1.0)
    torch.testing.assert_close(norm, torch.linalg.vector_norm(g.float()), rtol=1e-4, atol=1e-4)
    assert found_inf.item() == 0.0
