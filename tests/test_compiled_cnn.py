"""Convolutions in compiled mode: the fused step presents Conv2d weights channels_last on the CPU
(step/conv_layout.py), the user's tensors keep their layout, and parameters after several steps
match eager within test_compiled_parity.py's tolerance (inductor reorders fp32 arithmetic)."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastloop import Module, Trainer
from fastloop.step.conv_layout import conv_weight_names, single_channel_last, with_channels_last


def tiny_cnn():
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 3),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))


def test_conv_weight_names():
    net = nn.Sequential(tiny_cnn(), nn.Conv1d(2, 2, 1))
    expected = frozenset({"0.0.weight", "0.3.weight"}) if torch.backends.mkldnn.is_available() else frozenset()
    assert conv_weight_names(net, torch.device("cpu")) == expected
    assert conv_weight_names(net, torch.device("cuda")) == frozenset()
    assert conv_weight_names(nn.Conv2d(2, 2, 3), torch.device("cpu")) == (
        frozenset({"weight"}) if torch.backends.mkldnn.is_available() else frozenset())


def test_with_channels_last_converts_only_the_named_tensors():
    w, b = torch.randn(4, 3, 3, 3), torch.randn(4, 3, 3, 3)
    out = with_channels_last({"w": w, "b": b}, frozenset({"w"}))
    assert out["w"].is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous(
        memory_format=torch.channels_last)
    assert torch.equal(out["w"], w) and out["b"] is b


def test_single_channel_images_are_restrided_views():
    gray, rgb, labels = torch.randn(4, 1, 5, 5), torch.randn(4, 3, 5, 5), torch.arange(4)
    out = single_channel_last({"x": gray, "rgb": rgb, "y": labels})
    assert out["x"].stride() == (25, 1, 5, 1) and out["x"].data_ptr() == gray.data_ptr()
    assert torch.equal(out["x"], gray) and out["x"].view(4, -1).shape == (4, 25)
    assert out["rgb"] is rgb and out["y"] is labels


class CNN(Module):
    def __init__(self):
        super().__init__()
        self.net = tiny_cnn()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def fit(model, mode, steps=8):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(steps * 4, 1, 8, 8, generator=g), torch.randint(0, 3, (steps * 4,), generator=g))
    trainer = Trainer(max_steps=steps, mode=mode, enable_progress_bar=False, logger=False,
                      enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(data, batch_size=4))
    return trainer


@pytest.mark.compile
@pytest.mark.usefixtures("no_mode_override")
def test_cnn_compiled_matches_eager_and_keeps_layouts():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager_model = CNN()
    compiled_model = copy.deepcopy(eager_model)
    fit(eager_model, "eager")
    trainer = fit(compiled_model, "compiled")
    report = trainer.fit_loop.epoch_loop.batch_loop.optimizer_loop.step_report
    assert report.used == "compiled", trainer.explain()
    assert report.step.graph_count == 1
    optimizer = trainer.optimizers[0]
    for p in compiled_model.parameters():
        assert p.is_contiguous() and p.grad.is_contiguous()
        assert optimizer.state[p]["momentum_buffer"].is_contiguous()
    for (name, a), b in zip(eager_model.state_dict().items(), compiled_model.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), f"{name}: max abs diff {(a - b).abs().max():.3g}"
