"""nn.LSTM/GRU/RNN in compiled mode: the twins of step/recurrent.py against torch's modules (no
compile; the unrolled cells, and LSTM layers as oneDNN calls, step/onednn_lstm.py), then whole fits
in compiled mode against eager (parameters after several steps, one graph), and the fallbacks with
their reasons.

Tolerance as in test_compiled_parity.py (rtol=1e-4, atol=1e-5 after the fit): inductor reorders
fp32 arithmetic, and eager's LSTM runs on oneDNN (before compiling, the unrolled twins equal eager
to ~2e-6, the oneDNN twin bit for bit).
"""
import copy
import itertools

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad_and_value
from torch.utils.data import DataLoader, TensorDataset

from fastloop import CompileConfig, Module, Trainer
from fastloop.step.recurrent import MAX_UNROLLED_STEPS, RecurrentSwap, UnrolledRecurrent, recurrent_blockers

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
    twin = UnrolledRecurrent(rnn)
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


def test_onednn_twin_under_grad_and_value_equals_eager_backward():
    """What the fused step traces: torch.func.grad_and_value over the twin (no compile)."""
    torch.manual_seed(0)
    rnn = nn.LSTM(3, 4, batch_first=True)
    x = torch.randn(2, MAX_UNROLLED_STEPS + 1, 3)
    params = {n: p.detach() for n, p in rnn.named_parameters()}

    def loss(p):
        out, (h, _) = functional_call(UnrolledRecurrent(rnn), p, (x,))
        return out.square().mean() + h.sum()

    grads, value = grad_and_value(loss)(params)
    out, (h, _) = rnn(x)
    expected = out.square().mean() + h.sum()
    expected.backward()
    assert torch.equal(value, expected.detach())
    for name, p in rnn.named_parameters():
        assert torch.equal(grads[name], p.grad), name


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
    (lambda: nn.LSTM(3, 20, batch_first=True), 100),  # tiny-lstm's shape: one oneDNN call per step
    pytest.param(lambda: nn.LSTM(3, 5, num_layers=2, bidirectional=True), 40, marks=pytest.mark.slow),  # 4 oneDNN calls
    (lambda: nn.GRU(3, 4, batch_first=True), 4),  # unrolled
    pytest.param(lambda: nn.GRU(3, 4, num_layers=2, bidirectional=True, batch_first=True), 4, marks=pytest.mark.slow),
], ids=["lstm-100-steps", "lstm-2layer-bidirectional", "gru", "gru-2layer-bidirectional"])
def test_recurrent_model_compiles_and_matches_eager(make_rnn, seq):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager_model = SeqNet(make_rnn())
    compiled_model = copy.deepcopy(eager_model)
    fit(eager_model, "eager", seq=seq)
    trainer = fit(compiled_model, "compiled", seq=seq)
    report = trainer.fit_loop.epoch_loop.batch_loop.optimizer_loop.step_report
    assert report.used == "compiled", trainer.explain()
    assert report.step.graph_count == 1
    assert type(compiled_model.rnn) in (nn.LSTM, nn.GRU)  # the user's module is back in place
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
