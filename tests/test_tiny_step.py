"""The CPU inductor options of the fused step (fastloop/step/cpu_inductor.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fastloop.step.cpu_inductor import ATEN_GRAIN_SIZE, CPP_WRAPPER_MAX_PARAMETERS, cpu_step_options
from fastloop.step.fused_step import build_fused_step


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def test_cpu_options_follow_aten_grain_size_and_pick_cpp_wrapper_for_a_small_model():
    threads = torch.get_num_threads()
    options = cpu_step_options(tiny_mlp(), torch.device("cpu"))
    assert options == {"cpp.min_chunk_size": ATEN_GRAIN_SIZE // threads, "cpp_wrapper": True}


def test_a_model_over_the_threshold_keeps_the_python_wrapper():
    big = nn.Linear(CPP_WRAPPER_MAX_PARAMETERS, 1, bias=True)  # threshold + 1 elements
    assert sum(p.numel() for p in big.parameters()) == CPP_WRAPPER_MAX_PARAMETERS + 1
    assert "cpp_wrapper" not in cpu_step_options(big, torch.device("cpu"))
    at_limit = nn.Linear(CPP_WRAPPER_MAX_PARAMETERS, 1, bias=False)
    assert cpu_step_options(at_limit, torch.device("cpu"))["cpp_wrapper"] is True


def test_user_options_win_and_other_devices_get_only_them():
    user = {"cpp_wrapper": False, "fallback_random": True}
    options = cpu_step_options(tiny_mlp(), torch.device("cpu"), user)
    assert options["cpp_wrapper"] is False and options["fallback_random"] is True
    assert "cpp.min_chunk_size" in options
    assert cpu_step_options(tiny_mlp(), torch.device("cuda"), user) == user
    assert cpu_step_options(tiny_mlp(), torch.device("cuda")) == {}


def test_one_thread_gives_the_grain_size_itself(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert cpu_step_options(tiny_mlp(), torch.device("cpu"))["cpp.min_chunk_size"] == ATEN_GRAIN_SIZE


@pytest.mark.parametrize("user", [None, {"cpp_wrapper": False}])
def test_the_fused_step_compiles_with_them(user):
    model = tiny_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss_fn(params, buffers, x, y):
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y), {}

    fused, reason = build_fused_step(loss_fn, model, [n for n, _ in model.named_parameters()], opt,
                                     compile=False, inductor_config=user)
    assert reason is None
    expected = cpu_step_options(model, torch.device("cpu"), user)
    assert fused._backend.inductor_config == expected


def _steps_close(kind: str, groups_lr: tuple, steps: int = 6, change_lr_at: int = 3) -> None:
    """The functional update against torch's, with per-group rows and an lr change mid-way."""
    from fastloop.step.functional_optim import make_functional_optimizer

    torch.manual_seed(0)
    ref = [torch.randn(4, 3), torch.randn(3), torch.randn(2, 2)]
    mine = [p.clone() for p in ref]
    make = (lambda ps: torch.optim.SGD(ps, lr=groups_lr[0], momentum=0.9)) if kind == "SGD" else (
        lambda ps: torch.optim.Adam(ps, lr=groups_lr[0]))
    opts = []
    for params in (ref, mine):
        for p in params:
            p.requires_grad_(True)
        groups = [{"params": params[:2]}, {"params": params[2:], "lr": groups_lr[1]}]
        opts.append(make(groups))
    fopt, reason = make_functional_optimizer(opts[1], mine)
    assert reason is None
    fopt._scalars_np = fopt._scalars_np.view(_CountingArray)  # same memory, counts the writes
    _CountingArray.writes = 0
    for step in range(steps):
        if step == change_lr_at:
            for opt in opts:
                opt.param_groups[1]["lr"] *= 0.5
        grads = [torch.full(p.shape, 0.1 * (step + 1)) + 0.01 * p.detach() for p in ref]
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        opts[0].step()
        inputs = fopt.prepare()
        fopt.update([p.detach() for p in mine], grads, inputs)
        fopt.finish()
        for a, b in zip(ref, mine):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
    if kind == "SGD":  # constant rows are written once, and again after the lr change only
        assert _CountingArray.writes == 2
    else:  # Adam's bias corrections change every step
        assert _CountingArray.writes == steps


class _CountingArray(np.ndarray):
    writes = 0

    def __setitem__(self, key, value):
        type(self).writes += 1
        super().__setitem__(key, value)


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
def test_scalar_table_is_rewritten_only_when_a_row_changes(kind):
    _steps_close(kind, (0.1, 0.05))
