"""FlatArena: packing, views, grads and optimizer-state buffers (pure torch, no triton)."""
import pytest
import torch
from torch import nn

from fastloop.kernels.arena import FlatArena, group_for_arenas


def _params():
    return [nn.Parameter(torch.randn(s)) for s in [(3, 5), (7,), (2, 3, 4), ()]]


def test_packing_keeps_objects_values_and_layout():
    params = _params()
    ids = [id(p) for p in params]
    before = [p.detach().clone() for p in params]
    arena = FlatArena(params, align=16)

    assert [id(p) for p in arena.tensors] == ids
    for p, b in zip(params, before):
        assert isinstance(p, nn.Parameter) and p.requires_grad
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)
    assert all(off % 16 == 0 for off in arena.offsets)
    assert arena.numel % 16 == 0 and arena.flat.shape == (arena.numel,)
    assert arena.is_packed()
    # padding is zero
    used = torch.zeros(arena.numel, dtype=torch.bool)
    for off, n in zip(arena.offsets, arena.numels):
        used[off : off + n] = True
    assert torch.all(arena.flat[~used] == 0)


def test_flat_and_params_share_storage():
    params = _params()
    arena = FlatArena(params)
    with torch.no_grad():
        arena.flat.mul_(2)
    torch.testing.assert_close(params[0].detach(), arena.flat[: 15].view(3, 5))
    with torch.no_grad():
        params[1].fill_(3.0)
    off = arena.offsets[1]
    assert torch.all(arena.flat[off : off + 7] == 3.0)


def test_backward_accumulates_into_flat_grad():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    ref = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    ref.load_state_dict(model.state_dict())
    arena = FlatArena(list(model.parameters()))
    assert arena.grads_installed()
    x = torch.randn(5, 4)
    for _ in range(2):  # two backwards: grads accumulate in place in the flat buffer
        model(x).square().sum().backward()
        ref(x).square().sum().backward()
    assert arena.grads_installed()
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad)
    flat_ref = torch.cat([r.grad.reshape(-1) for r in ref.parameters()])
    total = torch.cat([v.reshape(-1) for v in arena.views(arena.grad)])
    torch.testing.assert_close(total, flat_ref)
    arena.zero_grad()
    assert torch.all(arena.grad == 0) and arena.grads_installed()


def test_gather_grads_copies_separate_grads_and_zeroes_missing():
    params = _params()
    arena = FlatArena(params, install_grads=False)
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    params[2].grad = None
    arena.grad.fill_(7.0)  # stale values must not survive
    flat = arena.gather_grads()
    assert flat is arena.grad and arena.grads_installed()
    for i, (p, g) in enumerate(zip(params, grads)):
        expected = torch.zeros_like(g) if i == 2 else g
        torch.testing.assert_close(p.grad, expected, rtol=0, atol=0)


def test_state_buffers_and_views():
    params = _params()
    arena = FlatArena(params, with_grad=False)
    assert arena.grad is None
    exp_avg = arena.new_buffer()
    assert exp_avg.shape == arena.flat.shape and torch.all(exp_avg == 0)
    views = arena.views(exp_avg)
    assert [v.shape for v in views] == [p.shape for p in params]
    views[0].fill_(1.0)
    assert exp_avg[:15].eq(1.0).all()
    half = arena.new_buffer(torch.float64)
    assert half.dtype == torch.float64
    with pytest.raises(ValueError):
        arena.views(torch.zeros(arena.numel + 1))
    with pytest.raises(RuntimeError):
        arena.install_grads()


def test_rejects_mixed_dtypes_duplicates_and_empty():
    with pytest.raises(ValueError, match="dtype"):
        FlatArena([torch.zeros(3), torch.zeros(3, dtype=torch.float64)])
    t = torch.zeros(3)
    with pytest.raises(ValueError, match="twice"):
        FlatArena([t, t])
    with pytest.raises(ValueError):
        FlatArena([])
    groups = group_for_arenas([torch.zeros(1), torch.zeros(1, dtype=torch.float64), torch.zeros(2)])
    assert [len(v) for v in groups.values()] == [2, 1]


def test_replacing_data_unpacks():
    params = _params()
    arena = FlatArena(params)
    params[0].data = torch.zeros(3, 5)
    assert not arena.is_packed()
