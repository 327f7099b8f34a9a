"""``Trainer(nonfinite="raise" | "skip" | "ignore")``: a NaN/inf loss or gradient injected at a
known step, in eager mode, in the fused step's functional code (``compile=False``) and in
compiled mode, against references that skip the same step (training without that batch gives
the same parameters and optimizer state, so equality is exact where the code path is the same).
"""
import math
import os
import re

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastloop import Callback, CompileConfig, Module, Trainer
from fastloop.callbacks import ModelCheckpoint
from fastloop.step.fused_step import build_fused_step
from fastloop.step.nonfinite import FusedNonFiniteGuard, NonFiniteError, new_state

N_BATCHES, BS = 8, 4
NAN, INF_GRAD, INF_LOSS = "nan", "inf-grad", "inf-loss"
TAIL = ": the optimizer step was not applied. Trainer(nonfinite='skip') skips such steps; " \
       "nonfinite='ignore' applies them (unsafe)"


def columns(bad=(), kind=NAN, n=N_BATCHES):
    """(x, y, e, c): the loss is ``ce + sqrt(b - b.detach() + e[0]) + c[0]`` with ``b`` a bias entry.
    Per batch: e=nan gives a NaN loss and gradients; e=0 an infinite gradient of ``net.2.bias``
    with a finite loss; c=inf an infinite loss with finite gradients."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n * BS, 8, generator=g), torch.randint(0, 4, (n * BS,), generator=g)
    e, c = torch.ones(n * BS), torch.zeros(n * BS)
    for k in bad:
        rows = slice(k * BS, (k + 1) * BS)
        if kind == NAN:
            e[rows] = math.nan
        elif kind == INF_GRAD:
            e[rows] = 0.0
        else:
            c[rows] = math.inf
    return x, y, e, c


def loader(bad=(), kind=NAN, drop=()):
    x, y, e, c = columns(bad, kind)
    keep = torch.cat([torch.arange(k * BS, (k + 1) * BS) for k in range(N_BATCHES) if k not in drop])
    return DataLoader(TensorDataset(x[keep], y[keep], e[keep], c[keep]), batch_size=BS)


def injected_loss(net, x, y, e, c):
    b = net[2].bias[0]
    return nn.functional.cross_entropy(net(x), y) + torch.sqrt(b - b.detach() + e[0]) + c[0]


class Injected(Module):
    def __init__(self, opt="adam"):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.opt = opt

    def training_step(self, batch, batch_idx):
        return injected_loss(self.net, *batch)

    def configure_optimizers(self):
        return make_optimizer(self.parameters(), self.opt)


def make_optimizer(params, name):
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-2)
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, dampening=0.1)


def trainer(**kwargs):
    kwargs.setdefault("max_epochs", 1)
    return Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   **kwargs)


def fit(data, **kwargs):
    model = Injected(kwargs.pop("opt", "adam"))
    t = trainer(**kwargs)
    error = None
    try:
        t.fit(model, data)
    except NonFiniteError as exc:
        error = exc
    return model, t, error


def assert_same_state(a, b):
    """Parameters and optimizer state (every tensor, step counts included) equal bit for bit."""
    for (name, p), q in zip(a[0].named_parameters(), b[0].parameters()):
        assert torch.equal(p, q), name
    sa, sb = a[1].optimizers[0].state_dict()["state"], b[1].optimizers[0].state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for key in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][key]), torch.as_tensor(sb[i][key])), (i, key)


# ------------------------------------------------------------------------------ arguments
def test_arguments_are_checked():
    with pytest.raises(ValueError, match=r"nonfinite must be one of \('raise', 'skip', 'ignore'\), got 'warn'"):
        Trainer(nonfinite="warn")
    with pytest.raises(ValueError, match=r"Trainer\(terminate_on_nan=True\) is not supported by fastloop: use "
                                         r"Trainer\(nonfinite='raise'\) \(the default"):
        Trainer(terminate_on_nan=True)
    with pytest.raises(ValueError, match=r"CompileConfig\(nonfinite_check_interval=0\) must be an int >= 1"):
        CompileConfig(nonfinite_check_interval=0)
    assert Trainer().config.nonfinite == "raise"


# ---------------------------------------------------------------------------------- eager
@pytest.mark.parametrize("kind,what", [(NAN, "loss"), (INF_GRAD, "gradient of parameter 'net.2.bias'"),
                                       (INF_LOSS, "loss")])
def test_eager_raise_names_the_step_and_applies_nothing(kind, what):
    got = fit(loader([3], kind))
    assert str(got[2]) == f"non-finite {what} at global step 3 (batch 3, optimizer 0)" + TAIL
    # The first three steps were applied, the failing one was not.
    assert_same_state(got, fit(loader(), limit_train_batches=3))


@pytest.mark.parametrize("opt", ["adam", "sgd"])
@pytest.mark.parametrize("bad", [0, 3])
def test_eager_skip_equals_training_without_the_batch(opt, bad):
    grads_after = {}

    class Grads(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            grads_after[batch_idx] = [p.grad for p in module.parameters()]

    got = fit(loader([bad], INF_GRAD), nonfinite="skip", opt=opt, callbacks=[Grads()])
    assert got[2] is None
    assert_same_state(got, fit(loader(drop=[bad]), opt=opt))
    assert grads_after[bad] == [None] * 4 and all(g is not None for g in grads_after[bad + 1])
    assert got[1].callback_metrics["nonfinite_skipped"].item() == 1.0
    assert "note: optimizer 0: nonfinite='skip': 1 of 8 optimizer steps skipped" in got[1].explain()
    assert got[1].global_step == N_BATCHES  # a skipped step still counts


class WithHook(Injected):
    def on_before_optimizer_step(self, optimizer, optimizer_idx):  # keeps the generic eager step
        pass


def test_eager_generic_step_raises_and_skips_the_same_way():
    t = trainer()
    with pytest.raises(NonFiniteError, match=re.escape("non-finite gradient of parameter 'net.2.bias' at global "
                                                       "step 3 (batch 3, optimizer 0)" + TAIL)):
        t.fit(WithHook(), loader([3], INF_GRAD))
    assert "eager step with every hook dispatched" in t.explain()
    model, t = WithHook(), trainer(nonfinite="skip")
    t.fit(model, loader([3], INF_GRAD))
    assert_same_state((model, t), fit(loader(drop=[3])))
    assert t.callback_metrics["nonfinite_skipped"].item() == 1.0


def test_eager_ignore_lets_nan_in_and_checkpoints_stop_before_it():
    checkpoint = ModelCheckpoint(dirpath="ckpt", every_n_train_steps=1, save_top_k=-1)
    model, t = Injected(), Trainer(max_epochs=1, nonfinite="ignore", callbacks=[checkpoint], logger=False,
                                   enable_progress_bar=False, enable_model_summary=False)
    with pytest.warns(RuntimeWarning, match=r"ModelCheckpoint: no checkpoint saved at global step 4: "
                                            r"parameter 'net.2.bias' is not finite \(NaN or inf\)"):
        t.fit(model, loader([3], NAN))
    assert all(torch.isnan(p).all() for p in model.parameters())
    assert sorted(os.listdir("ckpt")) == [f"epoch=0-step={s}.ckpt" for s in (1, 2, 3)]
    assert "nonfinite='ignore': loss and gradients are not checked (unsafe)" in t.explain()


def test_eager_accumulation_reports_the_stepping_batch_of_a_bad_window():
    got = fit(loader([2], INF_LOSS), accumulate_grad_batches=2)  # batch 2 only accumulates
    assert str(got[2]) == "non-finite loss at global step 1 (batch 3, optimizer 0)" + TAIL
    skipped = fit(loader([2], INF_LOSS), accumulate_grad_batches=2, nonfinite="skip")
    assert_same_state(skipped, fit(loader(drop=[2, 3]), accumulate_grad_batches=2))


class TwoOptimizers(Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.other = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx, optimizer_idx):
        x, y, _, c = batch
        if optimizer_idx == 0:
            return nn.functional.cross_entropy(self.net(x), y)
        return self.other(x).pow(2).mean() + c[0]

    def configure_optimizers(self):
        return [torch.optim.SGD(self.net.parameters(), lr=0.1), torch.optim.SGD(self.other.parameters(), lr=0.1)]


def test_eager_several_optimizers_name_the_optimizer_and_log_per_optimizer():
    with pytest.raises(NonFiniteError, match=re.escape("non-finite loss at global step 5 (batch 2, optimizer 1)")):
        trainer().fit(TwoOptimizers(), loader([2], INF_LOSS))
    t = trainer(nonfinite="skip")
    t.fit(TwoOptimizers(), loader([2], INF_LOSS))
    assert t.callback_metrics["nonfinite_skipped_optimizer_0"].item() == 0.0
    assert t.callback_metrics["nonfinite_skipped_optimizer_1"].item() == 1.0


# ------------------------------------------------- fused step, functional code (compile=False)
def run_fused(data, policy, opt="adam", step_on_device=False, compile=False, stop_after=None):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = make_optimizer(net.parameters(), opt)

    def loss_fn(params, buffers, *batch):
        return _functional_loss(net, params, buffers, *batch), {}

    fused, reason = build_fused_step(loss_fn, net, [n for n, _ in net.named_parameters()], optimizer,
                                     compile=compile, nonfinite=policy, step_on_device=step_on_device)
    assert reason is None, reason
    snapshots = []
    for i, batch in enumerate(data):
        fused(*batch, step=True)
        snapshots.append(([p.detach().clone() for p in net.parameters()],
                          {k: v.clone() for st in optimizer.state.values() for k, v in st.items()}))
        if stop_after is not None and i == stop_after:
            break
    return net, optimizer, fused, snapshots


def _functional_loss(net, params, buffers, x, y, e, c):
    out = torch.func.functional_call(net, {**params, **buffers}, (x,))
    b = params["2.bias"][0]
    return nn.functional.cross_entropy(out, y) + torch.sqrt(b - b.detach() + e[0]) + c[0]


def assert_fused_equal(a, b):
    for p, q in zip(a[0].parameters(), b[0].parameters()):
        assert torch.equal(p, q)
    for sa, sb in zip(a[1].state.values(), b[1].state.values()):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("opt,step_on_device", [("adam", False), ("adam", True), ("sgd", False)])
@pytest.mark.parametrize("bad", [0, 3])
def test_fused_skip_equals_training_without_the_batch(opt, step_on_device, bad):
    got = run_fused(loader([bad], INF_GRAD), "skip", opt, step_on_device)
    assert_fused_equal(got, run_fused(loader(drop=[bad]), "ignore", opt, step_on_device))
    assert got[2].nonfinite_state.tolist() == [N_BATCHES, 1, bad, 4, 0]  # parameter 3 = 2.bias
    # The skipped step's gradients were zeroed ("cleared"); the next step's are its own.
    got = run_fused(loader([bad], INF_GRAD), "skip", opt, step_on_device, stop_after=bad)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in got[0].parameters())


def test_fused_graph_bias_correction_equals_host_bias_correction():
    # step_on_device computes Adam's bias corrections in the graph from the device step.
    assert_fused_equal(run_fused(loader(), "raise", step_on_device=True), run_fused(loader(), "raise"))


def test_fused_raise_withholds_every_update_from_the_first_bad_step():
    got = run_fused(loader([3, 5], NAN), "raise")
    params3, state3 = got[3][2]  # after step 2
    for params, state in got[3][3:]:
        assert all(torch.equal(p, q) for p, q in zip(params, params3))
        assert all(torch.equal(state[k], state3[k]) for k in state)
    # steps, withheld (bad ones only), first bad call, what (0: the loss), window flag
    assert got[2].nonfinite_state.tolist() == [N_BATCHES, 2, 3, 0, 0]


def test_fused_accumulation_carries_a_bad_loss_to_the_stepping_call():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = make_optimizer(net.parameters(), "adam")
    fused, _ = build_fused_step(lambda p, b, *batch: (_functional_loss(net, p, b, *batch), {}), net,
                                [n for n, _ in net.named_parameters()], optimizer, accumulate=2, compile=False,
                                nonfinite="skip")
    for i, batch in enumerate(loader([2], INF_LOSS)):
        if i % 2 == 0:
            fused.zero_grad()
        fused(*batch, step=i % 2 == 1)
    assert fused.nonfinite_state.tolist() == [4, 1, 1, 0, 0]


def test_guard_reads_late_and_names_the_first_bad_step():
    state = new_state(torch.device("cpu"))
    guard = FusedNonFiniteGuard("raise", 0, ["w", "b"], state, interval=3, several=False)
    guard.stepped(10, 10, last=False)
    guard.stepped(11, 11, last=False)
    state.copy_(torch.tensor([3, 0, -1, -1, 0]))  # what the graph counted for these three calls
    guard.stepped(12, 12, last=False)  # read: nothing bad
    state.copy_(torch.tensor([4, 1, 3, 2, 0]))  # call 3 (global step 13) had a bad gradient of "b"
    guard.stepped(13, 13, last=False)
    with pytest.raises(NonFiniteError) as info:
        guard.stepped(14, 14, last=True)
    assert str(info.value) == (
        "non-finite gradient of parameter 'b' at global step 13 (batch 13, optimizer 0)" + TAIL
        + " (read 1 step(s) later, at global step 14: the fused step's device-side check is read every "
          "CompileConfig.nonfinite_check_interval=3 steps; the steps in between were not applied either)")


# ---------------------------------------------------------------------- compiled (Trainer)
class Snapshots(Callback):
    def __init__(self):
        self.after = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        opt = trainer.optimizers[0]
        self.after[batch_idx] = ([p.detach().clone() for p in module.parameters()],
                                 [{k: v.clone() for k, v in opt.state[p].items()} for p in module.parameters()],
                                 [p.grad.clone() for p in module.parameters()])


@pytest.fixture(scope="module")
def compiled_runs():
    """One compiled fit per policy (a graph each), shared by the tests below."""
    pinned = os.environ.pop("FASTLOOP_MODE", None)  # what the no_mode_override fixture does, module-wide
    try:
        runs = {}
        for policy, kind in (("raise", NAN), ("skip", INF_GRAD)):
            snaps = Snapshots()
            runs[policy] = fit(loader([3], kind), mode="compiled", nonfinite=policy, callbacks=[snaps]) + (snaps,)
    finally:
        if pinned is not None:
            os.environ["FASTLOOP_MODE"] = pinned
    return runs


@pytest.mark.compile
def test_compiled_raise_is_read_late_and_leaves_the_pre_step_state(compiled_runs):
    model, t, error, snaps = compiled_runs["raise"]
    assert str(error) == (
        "non-finite loss at global step 3 (batch 3, optimizer 0)" + TAIL + " (read 4 step(s) later, at global "
        "step 7: the fused step's device-side check is read every CompileConfig.nonfinite_check_interval=20 "
        "steps; the steps in between were not applied either)")
    params, states, _ = snaps.after[2]
    for p, q, st in zip(model.parameters(), params, states):
        assert torch.equal(p, q)
        assert all(torch.equal(t.optimizers[0].state[p][k], v) for k, v in st.items())
        assert t.optimizers[0].state[p]["step"].item() == 3
    assert "nonfinite='raise': checked in the graph every step, read every 20 steps" in t.explain()


@pytest.mark.compile
def test_compiled_skip_leaves_state_untouched_and_matches_eager(compiled_runs):
    model, t, error, snaps = compiled_runs["skip"]
    assert error is None
    (p2, s2, _), (p3, s3, g3) = snaps.after[2], snaps.after[3]
    assert all(torch.equal(a, b) for a, b in zip(p2, p3))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(s2, s3) for k in a)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in g3)  # cleared (zeroed in the graph)
    assert t.callback_metrics["nonfinite_skipped"].item() == 1.0
    assert "note: optimizer 0: nonfinite='skip': 1 of 8 optimizer steps skipped" in t.explain()
    reference = fit(loader(drop=[3]))[0]
    for p, q in zip(model.parameters(), reference.parameters()):  # compiled vs eager: parity tolerance
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
