"""Module helpers with Lightning 1.9.5's behaviour: log's signature, print, freeze, properties."""
import inspect
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fastloop import Module, Trainer
from fastloop.testing import BoringModel, random_loader

# Lightning 1.9.5's signatures, parameter by parameter (name, default).
LIGHTNING_LOG = [
    ("name", inspect.Parameter.empty), ("value", inspect.Parameter.empty), ("prog_bar", False), ("logger", None),
    ("on_step", None), ("on_epoch", None), ("reduce_fx", "mean"), ("enable_graph", False), ("sync_dist", False),
    ("sync_dist_group", None), ("add_dataloader_idx", True), ("batch_size", None), ("metric_attribute", None),
    ("rank_zero_only", False),
]
LIGHTNING_LOG_DICT = [("dictionary", inspect.Parameter.empty)] + [
    p for p in LIGHTNING_LOG[2:] if p[0] != "metric_attribute"
]


def signature_of(fn):
    return [(p.name, p.default) for p in list(inspect.signature(fn).parameters.values())[1:]]


class RecordingMetrics:
    def __init__(self):
        self.calls = []

    def log(self, name, value, **options):
        self.calls.append((name, value, options))


def attached(module, **trainer_attributes):
    metrics = RecordingMetrics()
    module._trainer = SimpleNamespace(metrics=metrics, **trainer_attributes)
    return metrics


def test_log_and_log_dict_signatures_are_lightnings():
    assert signature_of(Module.log) == LIGHTNING_LOG
    assert signature_of(Module.log_dict) == LIGHTNING_LOG_DICT


def test_log_accepts_every_lightning_argument_and_forwards_what_the_metric_logger_takes():
    module = BoringModel()
    metrics = attached(module)
    value = torch.tensor(2.0)
    group = object()
    module.log("a", value, prog_bar=True, logger=False, on_step=True, on_epoch=False, reduce_fx="sum",
               enable_graph=True, sync_dist=True, sync_dist_group=group, add_dataloader_idx=False, batch_size=4,
               metric_attribute="m", rank_zero_only=True)
    module.log("b", 1.0, sync_dist=True)
    module.log("c", 1.0)
    assert metrics.calls == [
        # rank_zero_only values are never reduced across ranks (only rank 0 would join the collective)
        ("a", value, dict(prog_bar=True, logger=False, on_step=True, on_epoch=False, reduce_fx="sum", batch_size=4,
                          sync_dist=False, sync_dist_group=group)),
        ("b", 1.0, dict(prog_bar=False, logger=True, on_step=None, on_epoch=None, reduce_fx="mean", batch_size=None,
                        sync_dist=True, sync_dist_group=None)),
        ("c", 1.0, dict(prog_bar=False, logger=True, on_step=None, on_epoch=None, reduce_fx="mean", batch_size=None,
                        sync_dist=False, sync_dist_group=None)),
    ]


@pytest.mark.parametrize("fx, name", [
    (torch.mean, "mean"), (torch.sum, "sum"), (torch.max, "max"), (torch.min, "min"),
    (sum, "sum"), (max, "max"), (min, "min"), ("max", "max"),
])
def test_reduce_fx_functions_become_names(fx, name):
    module = BoringModel()
    metrics = attached(module)
    module.log("x", 1.0, reduce_fx=fx)
    assert metrics.calls[0][2]["reduce_fx"] == name


def test_log_dict_passes_the_options_to_each_item():
    module = BoringModel()
    metrics = attached(module)
    module.log_dict({"a": 1.0, "b": 2.0}, prog_bar=True, on_epoch=True, reduce_fx=torch.max, batch_size=3,
                    sync_dist=True)
    options = dict(prog_bar=True, logger=True, on_step=None, on_epoch=True, reduce_fx="max", batch_size=3,
                   sync_dist=True, sync_dist_group=None)
    assert metrics.calls == [("a", 1.0, options), ("b", 2.0, options)]


def test_an_unknown_log_argument_is_a_type_error_naming_it():
    module = BoringModel()
    attached(module)
    with pytest.raises(TypeError, match="unexpected keyword argument 'on_stepp'"):
        module.log("a", 1.0, on_stepp=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'metric_attribute'"):
        module.log_dict({"a": 1.0}, metric_attribute="m")  # not a log_dict argument in Lightning either


def test_log_without_a_trainer_warns_and_drops_the_value():
    with pytest.warns(UserWarning, match=r"self.log\('a'\) was called but the module is not attached to a Trainer"):
        BoringModel().log("a", 1.0)


def test_log_with_every_argument_in_a_run():
    class LogsEverything(BoringModel):
        def training_step(self, batch, batch_idx):
            loss = self.loss(batch)
            self.log("loss_sum", loss, prog_bar=True, logger=True, on_step=False, on_epoch=True, reduce_fx=torch.sum,
                     enable_graph=False, sync_dist=True, sync_dist_group=None, add_dataloader_idx=True,
                     batch_size=16, metric_attribute=None, rank_zero_only=True)
            self.log_dict({"loss_max": loss}, on_step=False, on_epoch=True, reduce_fx="max")
            self.losses.append(loss.detach())
            return loss

    model = LogsEverything()
    model.losses = []
    trainer = Trainer(max_epochs=1, enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, random_loader(n=32, batch_size=16))
    assert len(model.losses) == 2
    assert torch.equal(trainer.callback_metrics["loss_sum"], model.losses[0] + model.losses[1])
    assert torch.equal(trainer.callback_metrics["loss_max"], torch.maximum(*model.losses))


def test_print_on_rank_zero_only(capsys, monkeypatch):
    module = BoringModel()
    monkeypatch.delenv("RANK", raising=False)
    module.print("a", 1, sep="-", end="!\n")
    monkeypatch.setenv("RANK", "0")
    module.print("b")
    monkeypatch.setenv("RANK", "1")
    module.print("c")
    assert capsys.readouterr().out == "a-1!\nb\n"


def test_print_follows_the_trainers_global_zero(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    module = BoringModel()
    attached(module, is_global_zero=False)
    module.print("hidden")
    attached(module, is_global_zero=True)
    module.print("shown")
    assert capsys.readouterr().out == "shown\n"


def test_print_goes_through_an_enabled_progress_bar(capsys):
    printed = []
    bar = SimpleNamespace(is_enabled=True, print=lambda *a, **k: printed.append((a, k)))
    module = BoringModel()
    attached(module, is_global_zero=True, progress_bar_callback=bar)
    module.print("x", end="")
    assert printed == [(("x",), {"end": ""})] and capsys.readouterr().out == ""


def test_freeze_and_unfreeze():
    module = BoringModel()
    module.freeze()
    assert [p.requires_grad for p in module.parameters()] == [False] * 4
    assert not module.training and not any(m.training for m in module.modules())
    module.unfreeze()
    assert [p.requires_grad for p in module.parameters()] == [True] * 4
    assert module.training and all(m.training for m in module.modules())


def test_example_input_array():
    module = BoringModel()
    assert module.example_input_array is None
    x = torch.zeros(2, 32)
    module.example_input_array = x
    assert module.example_input_array is x
    module.example_input_array = (x, {"k": 1})
    assert module.example_input_array == (x, {"k": 1})
    assert "_example_input_array" not in dict(module.named_buffers())


def test_logger_properties():
    module = BoringModel()
    assert module.logger is None and module.loggers == []
    first, second = object(), object()
    attached(module, logger=first, loggers=[first, second])
    assert module.logger is first and module.loggers == [first, second]


def test_a_bare_module_has_empty_hparams_and_its_defaults():
    module = Module()
    assert isinstance(module, nn.Module) and module.hparams == {} and module.automatic_optimization
    assert module.example_input_array is None and module._log_hyperparams is False
