"""Bad input and broken hook contracts: one clear error, before any parameter changes, with the
same exception type and message in eager and compiled mode.

Each case of the matrix runs in both modes. Cases that fail before the first step (optimizer
configuration, Trainer arguments, loaders) never compile anything; the ones that reach the fused
step compile (or try to) once, and the compiled run must show the eager error and nothing of the
compiler: no fallback warning, no traceback logged by torch.compile.
"""
import copy
import logging
import re
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastloop import Callback, Trainer
from fastloop.testing import BoringModel, random_loader

pytestmark = pytest.mark.usefixtures("no_mode_override")
MODES = ["eager", "compiled"]


def make_trainer(mode, **kwargs):
    kwargs.setdefault("max_epochs", 1)
    kwargs.setdefault("num_sanity_val_steps", 0)
    return Trainer(mode=mode, enable_progress_bar=False, logger=False, enable_checkpointing=False,
                   enable_model_summary=False, **kwargs)


def loader_of(x, y):
    return DataLoader(TensorDataset(x, y), batch_size=16)


# ----------------------------------------------------------------------------- models
class NoGradLoss(BoringModel):
    def training_step(self, batch, batch_idx):
        with torch.no_grad():
            return self.loss(batch)


class DetachedLoss(BoringModel):
    def training_step(self, batch, batch_idx):
        return self.loss(batch).detach()


class PerSampleLoss(BoringModel):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y, reduction="none")


class DictWithoutLoss(BoringModel):
    def training_step(self, batch, batch_idx):
        return {"los": self.loss(batch)}


class ReturnsString(BoringModel):
    def training_step(self, batch, batch_idx):
        return "loss"


def optimizers_returning(make):
    class Configured(BoringModel):
        def configure_optimizers(self):
            return make(self)

    return Configured


class ForeignTensor(BoringModel):
    def __init__(self):
        super().__init__()
        self.scale = torch.ones(3, requires_grad=True)  # a plain tensor, not an nn.Parameter

    def configure_optimizers(self):
        return torch.optim.SGD([*self.parameters(), self.scale], lr=0.1)


class TwoOptimizersNoIdx(BoringModel):
    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[2].parameters(), lr=0.1)]


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)


def _orphan_scheduler(model):
    return torch.optim.lr_scheduler.StepLR(_sgd(model), step_size=1)


CONFIGURE_OPTIMIZERS_EXPECTED = ("expected an optimizer, a list of optimizers, (optimizers, schedulers), a dict with "
                                 "an `optimizer` key, or a list of such dicts")

# id: (model class, loader factory, Trainer kwargs, exception type, exact message)
CASES = {
    "batch is None": (
        BoringModel, lambda: [None, None], {}, TypeError,
        "dataloader 0 yielded None as a batch; a batch must be a tensor or a tuple/list/dict of tensors"),
    "batch is a string": (
        BoringModel, lambda: ["text", "text"], {}, TypeError,
        "dataloader 0 yielded a str ('text') as a batch; a batch must be a tensor or a tuple/list/dict of tensors"),
    "integer features": (
        BoringModel, lambda: loader_of(torch.randint(0, 5, (32, 32)), torch.randint(0, 10, (32,))), {},
        RuntimeError, "mat1 and mat2 must have the same dtype, but got Long and Float"),
    "features of the wrong width": (
        BoringModel, lambda: loader_of(torch.randn(32, 8), torch.randint(0, 10, (32,))), {},
        RuntimeError, "mat1 and mat2 shapes cannot be multiplied (16x8 and 32x64)"),
    "float targets": (
        BoringModel, lambda: loader_of(torch.randn(32, 32), torch.randn(32)), {},
        RuntimeError, "expected target dtype to be Long or Byte, but got Float"),
    "non-scalar loss": (
        PerSampleLoss, random_loader, {}, ValueError, "`training_step` must return a scalar loss, got (16,)"),
    "loss under no_grad": (
        NoGradLoss, random_loader, {}, ValueError,
        "the loss returned by `training_step` does not require grad: it was computed without the model's "
        "parameters or under torch.no_grad()"),
    "detached loss": (
        DetachedLoss, random_loader, {}, ValueError,
        "the loss returned by `training_step` does not require grad: it was computed without the model's "
        "parameters or under torch.no_grad()"),
    "dict without loss": (
        DictWithoutLoss, random_loader, {}, ValueError,
        "In automatic optimization, `training_step` returned a dict without a 'loss' key (keys: ['los']); "
        "return the loss tensor or a dict with 'loss'"),
    "training_step returns a string": (
        ReturnsString, random_loader, {}, TypeError,
        "In automatic optimization, `training_step` must return a Tensor, a dict with 'loss', or None "
        "(to skip the batch); it returned str"),
    "configure_optimizers returns nothing": (
        optimizers_returning(lambda m: None), random_loader, {}, TypeError,
        f"`configure_optimizers` returned None (did it forget to `return`?); {CONFIGURE_OPTIMIZERS_EXPECTED}"),
    "configure_optimizers returns a string": (
        optimizers_returning(lambda m: "adam"), random_loader, {}, TypeError,
        f"`configure_optimizers` returned a str; {CONFIGURE_OPTIMIZERS_EXPECTED}"),
    "optimizer over tensors outside the module": (
        ForeignTensor, random_loader, {}, ValueError,
        "`configure_optimizers` optimizer 0 (SGD) holds 1 tensor(s) that are not parameters of ForeignTensor "
        "(shapes (3,)): they would not be saved in checkpoints nor moved to the device; make them `nn.Parameter` "
        "attributes of the module, or build the optimizer over `self.parameters()`"),
    "schedulers without optimizers": (
        optimizers_returning(lambda m: ([], [_orphan_scheduler(m)])), random_loader, {}, ValueError,
        f"`configure_optimizers` returned no optimizer for its 1 scheduler(s); {CONFIGURE_OPTIMIZERS_EXPECTED}"),
    "scheduler dict without optimizer": (
        optimizers_returning(lambda m: {"lr_scheduler": _orphan_scheduler(m)}), random_loader, {}, ValueError,
        "a dict returned by `configure_optimizers` needs an `optimizer` key (keys: ['lr_scheduler'])"),
    "scheduler in the optimizer list": (
        optimizers_returning(lambda m: (lambda opt: (opt, torch.optim.lr_scheduler.StepLR(opt, 1)))(_sgd(m))),
        random_loader, {}, TypeError,
        "`configure_optimizers` optimizer 1 is a StepLR, not a torch Optimizer: return ([optimizers], "
        "[schedulers]) or {\"optimizer\": ..., \"lr_scheduler\": ...}"),
    "scheduler of another optimizer": (
        optimizers_returning(lambda m: ([_sgd(m)], [_orphan_scheduler(m)])), random_loader, {}, ValueError,
        "the scheduler StepLR steps an optimizer that `configure_optimizers` did not return"),
    "two optimizers, no optimizer_idx": (
        TwoOptimizersNoIdx, random_loader, {}, ValueError,
        "Your Module defines 2 optimizers but `training_step` is missing the `optimizer_idx` argument."),
    "val_check_interval beyond the epoch": (
        BoringModel, random_loader, {"val_check_interval": 100}, ValueError,
        "val_check_interval=100 is more than the 4 training batches per epoch; set check_val_every_n_epoch=None "
        "to count batches across epochs"),
    "limit_train_batches below one batch": (
        BoringModel, random_loader, {"limit_train_batches": 0.1}, ValueError,
        "limit_train_batches=0.1 of the 4 batches of the train dataloader is less than one batch; pass at least "
        "limit_train_batches=0.25, or an int"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error_before_any_update(case, mode, capfd):
    model_cls, make_loader, kwargs, error, message = CASES[case]
    model = model_cls()
    reference = copy.deepcopy(model)
    trainer = make_trainer(mode, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(error, match=f"^{re.escape(message)}$"):
            trainer.fit(model, make_loader())
    assert trainer.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    # Nothing of a failed compile reaches the user: no fallback warning, no logged traceback.
    assert not [w for w in caught if "fastloop" in str(w.message)], [str(w.message) for w in caught]
    err = capfd.readouterr().err
    assert "Traceback" not in err and "fake_tensor" not in err, err


@pytest.mark.parametrize("kwargs, message", [
    ({"max_epochs": -5}, "max_epochs must be None or an int >= -1 (-1: no limit), got -5"),
    ({"max_epochs": "3"}, "max_epochs must be None or an int >= -1 (-1: no limit), got '3'"),
    ({"max_epochs": 2.5}, "max_epochs must be None or an int >= -1 (-1: no limit), got 2.5"),
    ({"min_epochs": -1}, "min_epochs must be None or an int >= 0, got -1"),
    ({"max_steps": -7}, "max_steps must be an int >= -1 (-1: no limit), got -7"),
    ({"max_steps": 1.5}, "max_steps must be an int >= -1 (-1: no limit), got 1.5"),
    ({"min_steps": -3}, "min_steps must be None or an int >= 0, got -3"),
    ({"accumulate_grad_batches": 0}, "accumulate_grad_batches must be a positive int, got 0"),
    ({"gradient_clip_val": "big"}, "gradient_clip_val must be None or a number >= 0, got 'big'"),
    ({"num_sanity_val_steps": 1.5}, "num_sanity_val_steps must be an int (-1: all), got 1.5"),
    ({"accumulate_grad_batches": -2}, "accumulate_grad_batches must be a positive int, got -2"),
    ({"gradient_clip_val": -1.0}, "gradient_clip_val must be >= 0, got -1.0"),
    ({"limit_train_batches": 1.5}, "limit_train_batches=1.5 is a fraction above 1.0; pass an int to count batches"),
    ({"val_check_interval": 0}, "val_check_interval must be a positive int or a float in (0, 1], got 0"),
    ({"num_sanity_val_steps": -2}, "num_sanity_val_steps must be -1 (all) or >= 0, got -2"),
    ({"check_val_every_n_epoch": 0}, "check_val_every_n_epoch must be None or a positive int, got 0"),
])
@pytest.mark.parametrize("mode", MODES)
def test_negative_or_absurd_trainer_arguments_are_named(mode, kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        make_trainer(mode, **kwargs)


WRONG_WIDTH = "mat1 and mat2 shapes cannot be multiplied (16x8 and 32x64)"


def test_bad_validation_batch_is_the_eager_error_in_compiled_mode(capfd):
    """The sanity check's compiled validation step: the eager error, no compiler output."""
    val = loader_of(torch.randn(32, 8), torch.randint(0, 10, (32,)))
    for mode in MODES:
        trainer = Trainer(mode=mode, max_epochs=1, enable_progress_bar=False, logger=False,
                          enable_checkpointing=False, enable_model_summary=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback warning either
            with pytest.raises(RuntimeError, match=re.escape(WRONG_WIDTH)):
                trainer.fit(BoringModel(), random_loader(), val)
        assert trainer.global_step == 0
    err = capfd.readouterr().err
    assert "Traceback" not in err and "fake_tensor" not in err, err


class BranchesOnTheLoss(BoringModel):
    """Fine eagerly; a data-dependent Python branch cannot be one fullgraph graph."""

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        return loss * 2 if loss.item() > 100 else loss


def test_a_compiler_failure_still_falls_back_with_its_reason():
    model = BranchesOnTheLoss()
    reference = copy.deepcopy(model)
    trainer = make_trainer("compiled")
    with pytest.warns(RuntimeWarning, match="falling back to the eager step: the fused step could not be compiled"):
        trainer.fit(model, random_loader())
    assert "the fused step could not be compiled" in trainer.explain()
    make_trainer("eager").fit(reference, random_loader())
    assert trainer.global_step == 4
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


class SkipsEveryBatch(BoringModel):
    def training_step(self, batch, batch_idx):
        self.loss(batch)
        return None  # legal: skips the batch (eagerly; the fused step needs a loss)


def test_a_step_the_fused_graph_cannot_express_falls_back_naming_why():
    trainer = make_trainer("compiled")
    with pytest.warns(RuntimeWarning) as caught:
        trainer.fit(SkipsEveryBatch(), random_loader())
    reason = ("the fused step could not be compiled (training_step must return a loss tensor or a dict of tensors "
              "with 'loss' to be fused)")
    assert any(str(w.message) == f"fastloop: falling back to the eager step: {reason}" for w in caught)
    assert f"fallback: {reason}" in trainer.explain()
    assert trainer.global_step == 4  # as eagerly: the optimizer steps count, the None losses skip backward


# ------------------------------------------------------------------------- loaders
@pytest.mark.parametrize("mode", MODES)
def test_empty_training_loader_warns_as_lightning_and_trains_nothing(mode):
    # Lightning 1.9.5 warns ("Total length of `DataLoader` across ranks is zero. Please make sure
    # this was your intention.") and fit stops without a step; fastloop does the same, naming the hook.
    empty = loader_of(torch.randn(0, 32), torch.randint(0, 10, (0,)))
    model = BoringModel()
    reference = copy.deepcopy(model)
    trainer = make_trainer(mode)
    with pytest.warns(UserWarning, match=re.escape(
            "`train_dataloader` (DataLoader) has zero length: fit runs no training step (global_step stays 0). "
            "Please make sure this was your intention.")):
        trainer.fit(model, empty)
    assert trainer.global_step == 0 and trainer.current_epoch == 0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


def test_empty_iterable_without_length_warns_at_its_first_epoch():
    class Nothing:
        def __iter__(self):
            return iter(())

    trainer = make_trainer("eager", max_epochs=2)
    with pytest.warns(UserWarning, match=re.escape(
            "`train_dataloader` (Nothing) yielded no batch this epoch. Please make sure this was your intention.")):
        trainer.fit(BoringModel(), Nothing())
    assert trainer.global_step == 0


class Pool:
    """A dataset that a callback shrinks between epochs (active learning takes samples out)."""

    def __init__(self):
        self.batches = list(random_loader(n=64, batch_size=16))

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(list(self.batches))


class TakeOneBatchOut(Callback):
    def __init__(self, pool):
        self.pool = pool

    def on_train_epoch_end(self, trainer, pl_module):
        self.pool.batches.pop()


@pytest.mark.parametrize("mode", MODES)
def test_loader_whose_length_changes_between_epochs_is_an_error(mode):
    pool = Pool()
    trainer = make_trainer(mode, max_epochs=2, callbacks=[TakeOneBatchOut(pool)])
    model = BoringModel()
    with pytest.raises(ValueError, match="^" + re.escape(
            "`train_dataloader` (Pool) gave 4 batches when they were counted and gives 3 at epoch 1: its length "
            "must not change between epochs; return a loader of fixed length, or set "
            "Trainer(reload_dataloaders_every_n_epochs=1) to count again each epoch") + "$"):
        trainer.fit(model, pool)
    assert trainer.global_step == 4  # epoch 0 ran; epoch 1 stopped before its first step


def test_reloading_each_epoch_counts_a_changing_loader_again():
    pool = Pool()
    trainer = make_trainer("eager", max_epochs=2, callbacks=[TakeOneBatchOut(pool)],
                           reload_dataloaders_every_n_epochs=1)
    trainer.fit(BoringModel(), pool)
    assert trainer.global_step == 4 + 3


# ------------------------------------------------------------------ compiler log plumbing
def test_compiler_error_logs_are_held_back_and_replayed_at_debug(caplog):
    import io

    from fastloop.step.errors import quietly

    dynamo_log = logging.getLogger("torch._dynamo.convert_frame")
    handler = logging.getLogger("torch._dynamo").handlers[0]  # torch's own, writing to stderr
    console = io.StringIO()
    previous = handler.setStream(console)
    try:
        noisy = quietly(lambda: dynamo_log.error("failed while attempting to run meta for aten.mm.default"))
        with caplog.at_level(logging.DEBUG, logger="fastloop.step"):
            noisy()
        assert console.getvalue() == ""
        replayed = [r.getMessage() for r in caplog.records if r.name == "fastloop.step"]
        assert replayed == ["torch.compile logged (torch._dynamo.convert_frame): failed while attempting to run "
                            "meta for aten.mm.default"]
        dynamo_log.error("outside a compiled call")  # the filter lets everything through again
        assert "outside a compiled call" in console.getvalue()
    finally:
        handler.setStream(previous)
