"""The CPU inductor options of the fused step (fastloop/step/cpu_inductor.py)."""
from __future__ import annotations

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
