"""nn.LSTM/GRU/RNN in compiled mode: the twins of step/recurrent.py against torch's modules (no
compile; the unrolled cells, LSTM layers on fastloop's C++ loop, step/lstm_kernel.py, and as oneDNN
calls, step/onednn_lstm.py), then whole fits in compiled mode against eager (parameters after
several steps, one graph), and the fallbacks with their reasons.

Tolerance as in test_compiled_parity.py (rtol=1e-4, atol=1e-5 after the fit): inductor reorders
fp32 arithmetic, and eager's LSTM runs on oneDNN (before compiling, the unrolled twins and the C++
loop equal eager to ~2e-6, the oneDNN twin bit for bit).
"""
import copy
import itertools
import os

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad_and_value
from torch.utils.data import DataLoader, TensorDataset

from fastloop import CompileConfig, Module, Trainer, _ext
from fastloop.step import recurrent
from fastloop.step.recurrent import MAX_UNROLLED_STEPS, RecurrentSwap, UnrolledRecurrent, recurrent_blockers


@pytest.fixture
def cpp_loop():
    """The C++ LSTM loop is built; skips without it, unless FASTLOOP_REQUIRE_EXT=1 (then fails)."""
    if not _ext.lstm_ext.available():
        if os.environ.get("FASTLOOP_REQUIRE_EXT") == "1":
            pytest.fail(f"FASTLOOP_REQUIRE_EXT=1 but fastloop._lstm is unavailable: {_ext.lstm_ext.reason()}")
        pytest.skip(f"fastloop._lstm unavailable: {_ext.lstm_ext.reason()}")


def lstm_results(module, x, hx, params):
    """Outputs, last state and the gradients of x, the initial state (if given) and ``params``."""
    xg = x.clone().requires_grad_()
    hx = tuple(t.clone().requires_grad_() for t in hx) if hx is not None else None
    out, (h, c) = module(xg, hx)
    inputs = [xg, *(hx or ()), *params]
    grads = torch.autograd.grad(out.square().sum() + h.sum() + 2 * c.sum(), inputs)
    return [out, h, c, *grads]

CONFIGS = [  # (class, num_layers, bidirectional, batch_first, extra kwargs)
    (nn.LSTM, 1, False, True, {}), (nn.LSTM, 2, True, False, {"dropout": 0.0}), (nn.LSTM, 1, True, True, {"proj_size": 3}),
    (nn.LSTM, 1, False, False, {"bias": False}), (nn.GRU, 2, True, True, {}), (nn.GRU, 1, False, False, {"bias": False}),
    (nn.RNN, 2, False, True, {"nonlinearity": "relu"}), (nn.RNN, 1, True, False, {}),
]


@pytest.mark.parametrize("cls, layers, bidirectional, batch_first, extra", CONFIGS)
def test_unrolled_twin_matches_torch_module(cls, layers, bidirectional, batch_first, extra):
    torch.manual_seed(0)
    rnn = cls(4, 5, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, **extra)
    twin = UnrolledRecurrent(rnn, use_onednn=False)  # the cell math (6 steps: unrolled anyway; oneDNN: next test)
    assert [p for p in twin.parameters()] == [p for p in rnn.parameters()]  # the same objects
    x = torch.randn(3, 6, 4, requires_grad=True)
    dirs = 2 if bidirectional else 1
    h0 = torch.randn(layers * dirs, 3 if batch_first else 6, extra.get("proj_size") or 5)
    hx = (h0, torch.randn(layers * dirs, h0.shape[1], 5)) if cls is nn.LSTM else h0
    for args in ((x,), (x, hx)):
        out_a, h_a = rnn(*args)
        out_b, h_b = twin(*args)
        flat_a = [out_a, *(h_a if isinstance(h_a, tuple) else (h_a,))]
        flat_b = [out_b, *(h_b if isinstance(h_b, tuple) else (h_b,))]
        grads_a = torch.autograd.grad(sum(t.square().sum() for t in flat_a), [x, *rnn.parameters()])
        grads_b = torch.autograd.grad(sum(t.square().sum() for t in flat_b), [x, *rnn.parameters()])
        for a, b in itertools.chain(zip(flat_a, flat_b), zip(grads_a, grads_b)):
            assert a.shape == b.shape
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a - b).abs().max()
    x1 = torch.randn(6, 4)  # unbatched
    assert torch.allclose(rnn(x1)[0], twin(x1)[0], atol=1e-5)


ONEDNN_CONFIGS = [  # (num_layers, bidirectional, batch_first, extra kwargs)
    (1, False, True, {}), (2, True, False, {}), (1, False, False, {"bias": False}),
]


@pytest.mark.parametrize("layers, bidirectional, batch_first, extra", ONEDNN_CONFIGS)
def test_onednn_twin_equals_torch_lstm_bit_for_bit(layers, bidirectional, batch_first, extra):
    """Longer than MAX_UNROLLED_STEPS: the twin runs eager's own oneDNN calls, forward and backward."""
    torch.manual_seed(0)
    rnn = nn.LSTM(4, 5, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, **extra)
    twin = UnrolledRecurrent(rnn, use_cpp=False)
    seq = MAX_UNROLLED_STEPS + 8
    x = torch.randn(3, seq, 4) if batch_first else torch.randn(seq, 3, 4)
    dirs = 2 if bidirectional else 1
    hx = (torch.randn(layers * dirs, 3, 5), torch.randn(layers * dirs, 3, 5))
    for args in ((x,), (x, hx)):
        flat = []
        for module in (rnn, twin):
            xg = x.clone().requires_grad_()
            out, (h, c) = module(xg, *args[1:])
            grads = torch.autograd.grad(out.square().sum() + h.sum() + 2 * c.sum(), [xg, *rnn.parameters()])
            flat.append([out, h, c, *grads])
        for a, b in zip(*flat):
            assert torch.equal(a, b), (a - b).abs().max()
    with torch.no_grad():  # validation: forward only
        assert torch.equal(rnn(x)[0], twin(x)[0])
    x1 = x[0] if batch_first else x[:, 0]  # unbatched
    assert torch.equal(rnn(x1)[0], twin(x1)[0])
    assert twin.lstm_kernel == "oneDNN (not the C++ loop: switched off (use_cpp=False))"


CPP_CONFIGS = [  # (num_layers, bidirectional, batch_first, extra kwargs)
    (1, False, True, {}), (2, False, False, {}), (1, True, True, {}), (2, True, False, {"bias": False}),
]


@pytest.mark.usefixtures("cpp_loop")
@pytest.mark.parametrize("layers, bidirectional, batch_first, extra", CPP_CONFIGS,
                         ids=["1-layer", "2-layers", "bidirectional", "2-layers-bidirectional-no-bias"])
def test_cpp_twin_matches_torch_lstm(layers, bidirectional, batch_first, extra):
    """Longer than MAX_UNROLLED_STEPS and small: the twin runs fastloop's C++ loop; outputs and the
    gradients of the input, the initial state and every parameter equal eager nn.LSTM's to ~1e-6."""
    torch.manual_seed(0)
    rnn = nn.LSTM(4, 6, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, **extra)
    twin = UnrolledRecurrent(rnn)
    seq = MAX_UNROLLED_STEPS + 8
    x = torch.randn(3, seq, 4) if batch_first else torch.randn(seq, 3, 4)
    dirs = 2 if bidirectional else 1
    hx = (torch.randn(layers * dirs, 3, 6), torch.randn(layers * dirs, 3, 6))
    for state in (None, hx):
        expected = lstm_results(rnn, x, state, list(rnn.parameters()))
        got = lstm_results(twin, x, state, list(rnn.parameters()))
        assert twin.lstm_kernel == "C++ loop"
        assert len(got) == len(expected) == 3 + 1 + (2 if state else 0) + len(list(rnn.parameters()))
        for a, b in zip(expected, got):
            assert a.shape == b.shape
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()
    with torch.no_grad():  # validation: forward only
        assert torch.allclose(rnn(x)[0], twin(x)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("cpp_loop")
def test_large_hidden_size_stays_on_onednn():
    rnn = nn.LSTM(2, recurrent.CPP_MAX_HIDDEN + 1)
    twin = UnrolledRecurrent(rnn)
    x = torch.randn(MAX_UNROLLED_STEPS + 1, 2, 2)
    assert torch.equal(rnn(x)[0], twin(x)[0])
    assert twin.lstm_kernel == (f"oneDNN (not the C++ loop: hidden_size {recurrent.CPP_MAX_HIDDEN + 1} > "
                                f"CPP_MAX_HIDDEN {recurrent.CPP_MAX_HIDDEN}, where oneDNN is faster)")


def test_without_the_extension_onednn_serves(monkeypatch):
    """FASTLOOP_NO_EXT=1 (or no build): long LSTMs still fuse, on oneDNN, bit for bit as eager."""
    monkeypatch.setenv("FASTLOOP_NO_EXT", "1")
    _ext._reset()
    try:
        rnn = nn.LSTM(3, 4)
        twin = UnrolledRecurrent(rnn)
        x = torch.randn(MAX_UNROLLED_STEPS + 1, 2, 3)
        for a, b in zip(lstm_results(rnn, x, None, list(rnn.parameters())),
                        lstm_results(twin, x, None, list(rnn.parameters()))):
            assert torch.equal(a, b)
        assert twin.lstm_kernel == ("oneDNN (not the C++ loop: the C++ LSTM loop is unavailable: "
                                    "disabled by FASTLOOP_NO_EXT=1)")
    finally:
        _ext._reset()


@pytest.mark.parametrize("use_cpp", [True, False], ids=["cpp-loop", "onednn"])
def test_long_lstm_twin_under_grad_and_value_equals_eager_backward(use_cpp):
    """What the fused step traces: torch.func.grad_and_value over the twin (no compile)."""
    if use_cpp and not _ext.lstm_ext.available():
        pytest.skip(f"fastloop._lstm unavailable: {_ext.lstm_ext.reason()}")
    torch.manual_seed(0)
    rnn = nn.LSTM(3, 4, batch_first=True)
    x = torch.randn(2, MAX_UNROLLED_STEPS + 1, 3)
    params = {n: p.detach() for n, p in rnn.named_parameters()}
    twin = UnrolledRecurrent(rnn, use_cpp=use_cpp)

    def loss(p):
        out, (h, _) = functional_call(twin, p, (x,))
        return out.square().mean() + h.sum()

    grads, value = grad_and_value(loss)(params)
    assert twin.lstm_kernel.startswith("C++" if use_cpp else "oneDNN")
    out, (h, _) = rnn(x)
    expected = out.square().mean() + h.sum()
    expected.backward()
    same = (lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6)) if use_cpp else torch.equal
    assert same(value, expected.detach())
    for name, p in rnn.named_parameters():
        assert p.grad.abs().sum() > 0
        assert same(grads[name], p.grad), name


def test_swap_lasts_the_with_block_and_follows_train_mode():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.GRU(3, 4, batch_first=True))

    net = Net()
    swap = RecurrentSwap(net)
    original = net.body[0]
    net.eval()
    with swap:
        assert isinstance(net.body[0], UnrolledRecurrent) and not net.body[0].training
    assert net.body[0] is original
    assert not RecurrentSwap(nn.Linear(2, 2))


def test_blockers_name_the_module():
    class MyLSTM(nn.LSTM):
        def forward(self, x, hx=None):
            return super().forward(x, hx)

    net = nn.Sequential(MyLSTM(2, 3), nn.GRU(3, 3))
    net[1].register_forward_hook(lambda *a: None)
    assert recurrent_blockers(net) == [
        "0 (MyLSTM) defines its own forward; only torch's nn.LSTM/GRU/RNN are unrolled for the fused step",
        "1 (GRU) has hooks, which the unrolled recurrent layer of the fused step would not call",
    ]
    assert not RecurrentSwap(net)


class SeqNet(Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out, _ = self.rnn(x if self.rnn.batch_first else x.transpose(0, 1))
        out = out if self.rnn.batch_first else out.transpose(0, 1)
        loss = nn.functional.mse_loss(self.head(out), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.02)


def fit(model, mode, seq, steps=6):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(steps * 3, seq, 3, generator=g), torch.randn(steps * 3, seq, 2, generator=g))
    trainer = Trainer(max_steps=steps, mode=mode, enable_progress_bar=False, logger=False,
                      enable_checkpointing=False, enable_model_summary=False,
                      compile_config=CompileConfig(inductor_config={"fallback_random": True}))
    trainer.fit(model, DataLoader(data, batch_size=3))
    return trainer


@pytest.mark.compile
@pytest.mark.usefixtures("no_mode_override")
@pytest.mark.parametrize("make_rnn, seq", [
    (lambda: nn.LSTM(3, 20, batch_first=True), 100),  # tiny-lstm's shape: one C++ loop call per step
    pytest.param(lambda: nn.LSTM(3, 5, num_layers=2, bidirectional=True), 40, marks=pytest.mark.slow),  # 4 calls
    (lambda: nn.GRU(3, 4, batch_first=True), 4),  # unrolled
    pytest.param(lambda: nn.GRU(3, 4, num_layers=2, bidirectional=True, batch_first=True), 4, marks=pytest.mark.slow),
], ids=["lstm-100-steps", "lstm-2layer-bidirectional", "gru", "gru-2layer-bidirectional"])
def test_recurrent_model_compiles_and_matches_eager(make_rnn, seq, monkeypatch):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager_model = SeqNet(make_rnn())
    compiled_model = copy.deepcopy(eager_model)
    fit(eager_model, "eager", seq=seq)
    twins = []  # the fused step's twins, to see which LSTM kernel they chose
    swap_init = RecurrentSwap.__init__
    monkeypatch.setattr(RecurrentSwap, "__init__",
                        lambda self, m: (swap_init(self, m), twins.extend(site[3] for site in self.sites))[0])
    trainer = fit(compiled_model, "compiled", seq=seq)
    report = trainer.fit_loop.epoch_loop.batch_loop.optimizer_loop.step_report
    assert report.used == "compiled", trainer.explain()
    assert report.step.graph_count == 1
    assert type(compiled_model.rnn) in (nn.LSTM, nn.GRU)  # the user's module is back in place
    if isinstance(compiled_model.rnn, nn.LSTM) and seq > MAX_UNROLLED_STEPS:
        expected = "C++ loop" if _ext.lstm_ext.available() else "oneDNN"
        assert twins and all(t.lstm_kernel.startswith(expected) for t in twins), [t.lstm_kernel for t in twins]
    for (name, a), b in zip(eager_model.state_dict().items(), compiled_model.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), f"{name}: max abs diff {(a - b).abs().max():.3g}"


@pytest.mark.compile
@pytest.mark.usefixtures("no_mode_override")
@pytest.mark.parametrize("make_rnn, why", [
    (lambda: nn.RNN(3, 4, batch_first=True), ""),
    (lambda: nn.LSTM(3, 4, batch_first=True, proj_size=2), "; not on oneDNN: proj_size is set"),
], ids=["rnn", "lstm-proj-size"])
def test_long_sequence_runs_eagerly_with_the_reason(make_rnn, why):
    torch._dynamo.reset()
    torch.manual_seed(0)
    seq = MAX_UNROLLED_STEPS + 1
    model = SeqNet(make_rnn())
    model.head = nn.Linear(model.rnn.proj_size or model.rnn.hidden_size, 2)
    kind = type(model.rnn).__name__
    with pytest.warns(RuntimeWarning, match="falling back to the eager step"):
        trainer = fit(model, "compiled", seq=seq, steps=2)
    report = trainer.fit_loop.epoch_loop.batch_loop.optimizer_loop.step_report
    assert report.used == "eager"
    assert report.reasons == [
        f"the fused step could not be compiled (nn.{kind} over {seq} time steps x 1 layer(s) x 1 direction(s) = "
        f"{seq} cell calls, more than the {MAX_UNROLLED_STEPS} the fused step unrolls (compile time grows with "
        f"each; see fastloop.step.recurrent.MAX_UNROLLED_STEPS){why})"
    ]


class SeqNetWithValidation(SeqNet):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        out, _ = self.rnn(x)
        self.log("val_loss", nn.functional.mse_loss(self.head(out), y))


@pytest.mark.compile
@pytest.mark.usefixtures("no_mode_override")
def test_validation_of_a_recurrent_model_compiles_and_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = SeqNetWithValidation(nn.LSTM(3, 4, batch_first=True))  # 40 steps: oneDNN, forward only
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(6, 40, 3, generator=g), torch.randn(6, 40, 2, generator=g)),
                        batch_size=3)
    results = {}
    for mode in ("eager", "compiled"):
        trainer = Trainer(mode=mode, enable_progress_bar=False, logger=False, enable_model_summary=False)
        results[mode] = trainer.validate(model, loader, verbose=False)[0]["val_loss"]
    assert "validate_loop.epoch_loop (EvaluationEpochLoop): compiled [1 graph(s)" in trainer.explain(), trainer.explain()
    assert "fallback" not in trainer.explain()
    assert type(model.rnn) is nn.LSTM
    assert abs(results["compiled"] - results["eager"]) <= 1e-5 + 1e-4 * abs(results["eager"])
