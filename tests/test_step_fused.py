"""The fused step against a hand-written eager loop.

Reference loop (what Lightning does with accumulation and clipping)::

    loss = loss_fn(batch) / accumulate; loss.backward()
    at the end of a window: clip_grad_norm_; opt.step(); opt.zero_grad(); sched.step()

Dropout is kept on (p=0.25) and made deterministic: with the same seed the
eager functional path draws the same masks as the reference (same ops in the
same order on the global generator); for the compiled path
``fallback_random=True`` makes inductor call ATen's RNG ops instead of its
own generator, so the masks match too.

Tolerances: the eager functional path does the same math as the reference,
up to elementwise rounding in the optimizer (see test_step_functional_optim)
-> rtol 1e-5 / atol 1e-6 over 30 steps. The compiled path also reorders the
reductions (matmul, BatchNorm mean/var, grad norm) inductor generates: a few
ulp per step; Adam normalises the update, so these stay ~1e-7 absolute on
O(1) weights after 30 steps (measured); we allow rtol 1e-4 / atol 1e-5.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastloop.step.fused_step import build_fused_step

IN, HID, OUT, BATCH = 20, 32, 5, 16


def make_model() -> nn.Module:
    torch.manual_seed(0)
    # Lightning's parity MNIST shape, scaled down: Linear, tanh, BN, Dropout, Linear.
    return nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.BatchNorm1d(HID), nn.Dropout(0.25),
                         nn.Linear(HID, OUT)).train()


def make_batches(windows: int, accumulate: int, last: int = 8) -> list:
    g = torch.Generator().manual_seed(123)
    sizes = [BATCH] * (windows * accumulate) + ([last] if last else [])
    return [(torch.randn(n, IN, generator=g), torch.randint(0, OUT, (n,), generator=g)) for n in sizes]


def loss_fn_for(model: nn.Module):
    def loss_fn(params, buffers, x, y):
        out = torch.func.functional_call(model, {**params, **buffers}, (x,))
        loss = F.cross_entropy(out, y)
        return loss, {"acc": (out.argmax(1) == y).float().mean()}

    return loss_fn


def steps_at(batches: list, accumulate: int) -> list[bool]:
    """Step at the end of each window and on the last (possibly partial) batch."""
    n = len(batches)
    return [(i + 1) % accumulate == 0 or i == n - 1 for i in range(n)]


def make_opt_and_sched(model, opt_name: str, total_steps: int):
    if opt_name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=0.01, foreach=False)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=total_steps)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    return opt, sched


def run_eager_reference(batches, accumulate, clip_val, clip_algorithm, opt_name):
    model = make_model()
    opt, sched = make_opt_and_sched(model, opt_name, sum(steps_at(batches, accumulate)))
    torch.manual_seed(1)
    losses, used_grads = [], None
    for x, y, do_step in zip(*zip(*batches), steps_at(batches, accumulate)):
        loss = F.cross_entropy(model(x), y)
        (loss / accumulate).backward()
        losses.append(loss.detach())
        if do_step:
            if clip_val is not None:
                if clip_algorithm == "norm":
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_val)
                else:
                    torch.nn.utils.clip_grad_value_(model.parameters(), clip_val)
            opt.step()
            used_grads = [p.grad.clone() for p in model.parameters()]
            opt.zero_grad()
            sched.step()
    return model, losses, used_grads


def run_fused(batches, accumulate, clip_val, clip_algorithm, opt_name, compile, probe=None):
    model = make_model()
    opt, sched = make_opt_and_sched(model, opt_name, sum(steps_at(batches, accumulate)))
    names = [n for n, _ in model.named_parameters()]
    fused, reason = build_fused_step(
        loss_fn_for(model), model, names, opt, clip_val=clip_val, clip_algorithm=clip_algorithm,
        accumulate=accumulate, compile=compile, inductor_config={"fallback_random": True},
    )
    assert reason is None, reason
    torch.manual_seed(1)
    losses = []
    for i, ((x, y), do_step) in enumerate(zip(batches, steps_at(batches, accumulate))):
        loss, aux = fused(x, y, step=do_step)
        assert set(aux) == {"acc"} and not loss.requires_grad
        losses.append(loss)
        if do_step:
            sched.step()
        if probe is not None:
            probe(i, fused)
    return model, losses, fused


def assert_models_close(ref: nn.Module, got: nn.Module, rtol: float, atol: float) -> None:
    for (name, a), b in zip(ref.state_dict().items(), got.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
        else:  # num_batches_tracked
            assert torch.equal(a, b), name


# ----------------------------------------------------------------- eager (fast)
@pytest.mark.parametrize(
    "opt_name,accumulate,clip_val,clip_algorithm",
    [("adam", 2, 0.5, "norm"), ("sgd", 3, 0.05, "value"), ("sgd", 1, None, "norm"), ("adam", 1, 1e-3, "norm")],
)
def test_eager_functional_matches_reference(opt_name, accumulate, clip_val, clip_algorithm):
    batches = make_batches(10, accumulate)
    ref, ref_losses, ref_grads = run_eager_reference(batches, accumulate, clip_val, clip_algorithm, opt_name)
    got, losses, _ = run_fused(batches, accumulate, clip_val, clip_algorithm, opt_name, compile=False)
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=1e-5, atol=1e-6)
    assert_models_close(ref, got, rtol=1e-5, atol=1e-6)
    # After a stepping call p.grad holds the (clipped) gradient that was applied.
    for p, g in zip(got.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


def test_only_trainable_parameters_move():
    model = make_model()
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("4.")}
    head = [p for n, p in model.named_parameters() if n.startswith("4.")]
    opt = torch.optim.SGD(head, lr=0.1)
    fused, reason = build_fused_step(loss_fn_for(model), model, ["4.weight", "4.bias"], opt, compile=False)
    assert reason is None
    # Reference: same optimizer over the head only, body frozen.
    ref = make_model()
    for n, p in ref.named_parameters():
        p.requires_grad_(n.startswith("4."))
    ref_opt = torch.optim.SGD([p for n, p in ref.named_parameters() if n.startswith("4.")], lr=0.1)
    for x, y in make_batches(5, 1, last=0):
        torch.manual_seed(7)
        fused(x, y)
        torch.manual_seed(7)
        F.cross_entropy(ref(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]) and p.grad is None, n
    assert_models_close(ref, model, rtol=1e-5, atol=1e-6)


def test_user_zero_grad_set_to_none_is_tolerated():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fused, _ = build_fused_step(loss_fn_for(model), model, [n for n, _ in model.named_parameters()], opt,
                                accumulate=2, compile=False)
    x, y = make_batches(1, 1, last=0)[0]
    fused(x, y, step=False)
    opt.zero_grad()  # drops the partial window, as in eager
    fused(x, y, step=False)
    fused(x, y, step=True)
    assert all(p.grad is not None for p in model.parameters())


def test_unsupported_optimizer_returns_reason():
    model = make_model()
    fused, reason = build_fused_step(loss_fn_for(model), model, [n for n, _ in model.named_parameters()],
                                     torch.optim.RMSprop(model.parameters()), compile=False)
    assert fused is None and "RMSprop" in reason


def test_accumulate_only_call_needs_accumulation():
    model = make_model()
    fused, _ = build_fused_step(loss_fn_for(model), model, [n for n, _ in model.named_parameters()],
                                torch.optim.SGD(model.parameters(), lr=0.1), compile=False)
    x, y = make_batches(1, 1, last=0)[0]
    with pytest.raises(ValueError, match="accumulate"):
        fused(x, y, step=False)


def test_call_key_tells_apart_what_a_direct_call_depends_on():
    import numpy as np

    from fastloop.step.direct_call import call_key

    model = make_model()
    x, y = torch.randn(4, IN), torch.arange(4)
    key = call_key(model, ((x, y), {"w": 0.5, "tag": "a"}))
    assert key == call_key(model, ((x.clone(), y.clone()), {"w": 0.5, "tag": "a"}))
    assert hash(key) is not None
    different = [
        ((x[:3], y[:3]), {"w": 0.5, "tag": "a"}),  # shape
        ((x.double(), y), {"w": 0.5, "tag": "a"}),  # dtype
        ((x.t().contiguous().t(), y), {"w": 0.5, "tag": "a"}),  # strides
        ((x, y), {"w": 0.25, "tag": "a"}),  # a non-tensor value the trace saw as a constant
        [(x, y), {"w": 0.5, "tag": "a"}],  # container type
    ]
    for batch in different:
        assert call_key(model, batch) != key
    model.eval()
    assert call_key(model, ((x, y), {"w": 0.5, "tag": "a"})) != key  # module mode
    with pytest.raises(TypeError):  # the caller then takes the guarded path
        hash(call_key(model, (x, np.zeros(3))))


# ------------------------------------------------------------ compiled (slow)
@pytest.mark.compile
def test_compiled_matches_reference_with_expected_graph_count():
    """30 optimizer steps, Adam + OneCycleLR (LR and beta1 change every step) +
    clip_grad_norm_ + accumulate 2 + a smaller last batch: exactly three graphs
    (accumulate-only, stepping, stepping for the small last batch)."""
    torch._dynamo.reset()
    accumulate = 2
    batches = make_batches(29, accumulate, last=8)  # 29 full windows + a lone batch of 8
    n = len(batches)
    assert sum(steps_at(batches, accumulate)) == 30
    graphs_seen = []

    def probe(i, fused):
        graphs_seen.append(fused.graph_count)
        if i == 10:  # replaces the optimizer's state tensors: the next call must notice
            fused.optimizer.load_state_dict(copy.deepcopy(fused.optimizer.state_dict()))

    ref, ref_losses, ref_grads = run_eager_reference(batches, accumulate, 0.5, "norm", "adam")
    got, losses, fused = run_fused(batches, accumulate, 0.5, "norm", "adam", compile=True, probe=probe)

    # Graph 1 on the first (accumulate-only) call, graph 2 on the first step;
    # then none while the LR/betas change every step; graph 3 for the last, smaller batch.
    assert graphs_seen[0] == 1 and graphs_seen[1] == 2
    assert graphs_seen[n - 2] == 2, graphs_seen
    assert fused.graph_count == 3
    assert fused.compile_seconds > 0
    # Every other call ran its graph directly, except the one after the state was replaced.
    assert fused.direct_reason == ""
    assert fused.direct_calls == n - 3 - 1

    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=1e-4, atol=1e-5)
    assert_models_close(ref, got, rtol=1e-4, atol=1e-5)
    for p, g in zip(got.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
