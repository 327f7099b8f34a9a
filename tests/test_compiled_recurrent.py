"""nn.LSTM/GRU/RNN in compiled mode: the unrolled twins of step/recurrent.py against torch's modules
(no compile), then whole fits in compiled mode against eager (parameters after several steps, one
graph), and the fallbacks with their reasons.

Tolerance as in test_compiled_parity.py (rtol=1e-4, atol=1e-5 after the fit): inductor reorders
fp32 arithmetic, and eager's LSTM runs on oneDNN (before compiling, the twins equal eager to ~2e-6).
"""
import copy
import itertools

import pytest
import torch
from torch import nn
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
    twin = UnrolledRecurrent(rnn)
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
        out, _ = self.rnn(x)
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
@pytest.mark.parametrize("make_rnn", [
    lambda: nn.LSTM(3, 5, batch_first=True),
    pytest.param(lambda: nn.GRU(3, 4, num_layers=2, bidirectional=True, batch_first=True), marks=pytest.mark.slow),
], ids=["lstm", "gru-2layer-bidirectional"])
def test_recurrent_model_compiles_and_matches_eager(make_rnn):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager_model = SeqNet(make_rnn())
    compiled_model = copy.deepcopy(eager_model)
    fit(eager_model, "eager", seq=4)
    trainer = fit(compiled_model, "compiled", seq=4)
    report = trainer.fit_loop.epoch_loop.batch_loop.optimizer_loop.step_report
    assert report.used == "compiled", trainer.explain()
    assert report.step.graph_count == 1
    assert type(compiled_model.rnn) in (nn.LSTM, nn.GRU)  # the user's module is back in place
    for (name, a), b in zip(eager_model.state_dict().items(), compiled_model.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), f"{name}: max abs diff {(a - b).abs().max():.3g}"


@pytest.mark.compile
@pytest.mark.usefixtures("no_mode_override")
def test_long_sequence_runs_eagerly_with_the_reason():
    torch._dynamo.reset()
    torch.manual_seed(0)
    seq = MAX_UNROLLED_STEPS + 1
    with pytest.warns(RuntimeWarning, match="falling back to the eager step"):
        trainer = fit(SeqNet(nn.RNN(3, 4, batch_first=True)), "compiled", seq=seq, steps=2)
    report = trainer.fit_loop.epoch_loop.batch_loop.optimizer_loop.step_report
    assert report.used == "eager"
    assert report.reasons == [
        f"the fused step could not be compiled (nn.RNN over {seq} time steps x 1 layer(s) x 1 direction(s) = "
        f"{seq} cell calls, more than the {MAX_UNROLLED_STEPS} the fused step unrolls (compile time grows with "
        "each; see fastloop.step.recurrent.MAX_UNROLLED_STEPS))"
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
    model = SeqNetWithValidation(nn.GRU(3, 4, batch_first=True))
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(6, 4, 3, generator=g), torch.randn(6, 4, 2, generator=g)), batch_size=3)
    results = {}
    for mode in ("eager", "compiled"):
        trainer = Trainer(mode=mode, enable_progress_bar=False, logger=False, enable_model_summary=False)
        results[mode] = trainer.validate(model, loader, verbose=False)[0]["val_loss"]
    assert "validate_loop.epoch_loop (EvaluationEpochLoop): compiled [1 graph(s)" in trainer.explain(), trainer.explain()
    assert "fallback" not in trainer.explain()
    assert type(model.rnn) is nn.GRU
    assert abs(results["compiled"] - results["eager"]) <= 1e-5 + 1e-4 * abs(results["eager"])
