"""Active learning: heuristics on hand-computed tensors, the pools, the cycle loop (Flash's numbers:
40 items, 5 initial labels, 5 per query, 3 cycles), MC dropout, weight/optimizer resets, resume."""
import math
import re

import pytest
import torch
from torch import nn

from fastloop import Callback, Trainer
from fastloop.active_learning import ActiveLearningDataModule, ActiveLearningLoop, MCDropoutPredictionLoop
from fastloop.active_learning import heuristics as H
from fastloop.loops import Loop, Progress
from fastloop.optim_snapshot import OptimizerSnapshot
from fastloop.testing import BoringModel, random_dataset


# ------------------------------------------------------------------ heuristics
def mc(*samples):
    """[N, C, T] from per-sample lists of per-pass probability vectors."""
    return torch.tensor(samples, dtype=torch.float64).transpose(1, 2)


CONFIDENT = [[1.0, 0.0], [1.0, 0.0]]       # both passes sure of class 0
DISAGREE = [[1.0, 0.0], [0.0, 1.0]]        # each pass sure, of different classes
UNSURE = [[0.5, 0.5], [0.5, 0.5]]          # both passes undecided
LEANING = [[0.9, 0.1], [0.7, 0.3]]         # mean [0.8, 0.2]


def h(ps):
    return -sum(p * math.log(p) for p in ps if p > 0)


EXPECTED = {
    "entropy": [0.0, math.log(2), math.log(2), h([0.8, 0.2])],
    "bald": [0.0, math.log(2), 0.0, h([0.8, 0.2]) - (h([0.9, 0.1]) + h([0.7, 0.3])) / 2],
    "margin": [0.0, 1.0, 1.0, 1 - 0.6],
    "least_confidence": [0.0, 0.5, 0.5, 0.2],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_heuristic_scores_equal_hand_computed_values(name):
    scores = H.HEURISTICS[name](mc(CONFIDENT, DISAGREE, UNSURE, LEANING))
    torch.testing.assert_close(scores, torch.tensor(EXPECTED[name], dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_higher_score_is_the_more_informative_sample(name):
    # The confident sample always ranks last, whichever the heuristic ("lower is better" ones are flipped).
    scores = H.resolve_heuristic(name)(mc(LEANING, CONFIDENT, DISAGREE))
    assert H.top_k(scores, 3).tolist()[-1] == 1
    assert H.top_k(scores, 1).tolist() == [2]


def test_bald_prefers_disagreeing_passes_over_agreeing_uncertainty():
    assert H.top_k(H.bald(mc(UNSURE, DISAGREE)), 1).tolist() == [1]
    assert H.bald(mc(UNSURE)).item() == 0.0


def test_random_heuristic_draws_from_the_torch_generator():
    torch.manual_seed(3)
    first = H.random(mc(CONFIDENT, UNSURE, LEANING))
    torch.manual_seed(3)
    assert torch.equal(first, H.random(mc(CONFIDENT, UNSURE, LEANING))) and first.shape == (3,)


def test_two_dimensional_probabilities_count_as_one_pass():
    assert torch.equal(H.entropy(torch.tensor([[0.5, 0.5]])), H.entropy(torch.tensor([[[0.5], [0.5]]])))


def test_heuristic_by_callable_and_errors():
    def first_class(p):
        return p.mean(-1)[:, 0]

    assert H.resolve_heuristic(first_class) is first_class
    with pytest.raises(ValueError, match="unknown heuristic 'bold'; choose one of bald, entropy"):
        H.resolve_heuristic("bold")
    with pytest.raises(TypeError, match="heuristic must be a name .* got int"):
        H.resolve_heuristic(3)
    with pytest.raises(ValueError, match=r"takes probabilities shaped \[N, C, iterations\].*got shape \(2,\)"):
        H.bald(torch.ones(2))
    with pytest.raises(ValueError, match=r"'first_two' returned scores shaped \(2,\); expected one per sample \(4,\)"):
        H.score(_named(lambda p: first_class(p)[:2], "first_two"), torch.ones(4, 2, 3))
    with pytest.raises(ValueError, match="'nan_scores' returned non-finite scores"):
        H.score(_named(lambda p: torch.full((p.shape[0],), float("nan")), "nan_scores"), torch.ones(4, 2, 3))


def _named(fn, name):
    fn.__name__ = name
    return fn


class FakeBaalHeuristic:
    """BaaL's contract: ``get_uncertainties(numpy) -> numpy``; ``reversed=False``: lower is better."""

    reversed = False

    def get_uncertainties(self, predictions):
        return predictions.mean(-1).max(1)  # BaaL's Certainty: the top probability


def test_baal_style_objects_are_flipped_when_lower_is_better():
    scores = H.resolve_heuristic(FakeBaalHeuristic())(mc(CONFIDENT, LEANING, UNSURE))
    assert H.top_k(scores, 3).tolist() == [2, 1, 0]


def test_real_baal_heuristics_when_installed():
    heuristics = pytest.importorskip("baal.active.heuristics")
    probabilities = mc(CONFIDENT, DISAGREE, UNSURE)
    for obj in (heuristics.BALD(), heuristics.Margin(), heuristics.Certainty()):
        assert H.top_k(H.resolve_heuristic(obj)(probabilities), 3).tolist()[-1] == 0


# ---------------------------------------------------------------- data module
def test_pools_labelling_and_state():
    dm = ActiveLearningDataModule(random_dataset(n=40), batch_size=5, initial_labels=5, query_size=5, seed=1)
    labelled = dm.labelled_indices
    assert len(labelled) == 5 and labelled == sorted(labelled)
    assert sorted(labelled + dm.unlabelled_indices) == list(range(40))
    pool = dm.unlabelled_indices
    dm.label([pool[3], pool[0]])
    assert dm.labelled_indices == sorted(labelled + [pool[0], pool[3]])
    assert dm.labelled_step[pool[0]].item() == 1 and dm.labelled_step[labelled[0]].item() == 0
    with pytest.raises(ValueError, match=f"item {pool[0]} is already labelled \\(query 1\\)"):
        dm.label([pool[0]])
    with pytest.raises(IndexError, match="index 40 is outside the dataset"):
        dm.label([40])
    with pytest.raises(ValueError, match="indices repeat"):
        dm.label([pool[5], pool[5]])
    again = ActiveLearningDataModule(random_dataset(n=40), batch_size=5, initial_labels=5, seed=2)
    again.load_state_dict(dm.state_dict())
    assert again.labelled_indices == dm.labelled_indices and again.queries == 1
    with pytest.raises(ValueError, match="the saved pools cover 40 items but the dataset has 8"):
        ActiveLearningDataModule(random_dataset(n=8)).load_state_dict(dm.state_dict())


def test_loaders_cover_the_pools():
    dm = ActiveLearningDataModule(random_dataset(n=40), batch_size=4, initial_labels=10, val_split=0.3)
    train = dm.train_dataloader().dataset.indices
    val = dm.val_dataloader().dataset.indices
    assert len(val) == 3 and sorted(train + val) == dm.labelled_indices
    assert dm.predict_dataloader().dataset.indices == dm.unlabelled_indices
    assert dm.test_dataloader() is None and not dm.has_test
    assert ActiveLearningDataModule(random_dataset(n=4)).val_dataloader() is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), r"batch_size=0\): expected an int >= 1"),
    (dict(query_size=1.5), r"query_size=1.5\): expected an int >= 1"),
    (dict(val_split=1.0), r"val_split=1.0\): expected a fraction in \[0, 1\)"),
    (dict(initial_labels=50), r"initial_labels=50\) exceeds the 40 items"),
])
def test_data_module_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ActiveLearningDataModule(random_dataset(n=40), **kwargs)


# ---------------------------------------------------------------------- loop
class DropoutModel(BoringModel):
    def __init__(self, optimizer="sgd", batchnorm=False):
        super().__init__(optimizer=optimizer)
        layers = [nn.Linear(32, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 10)]
        if batchnorm:
            layers.insert(1, nn.BatchNorm1d(64))
        self.net = nn.Sequential(*layers)


def al_run(model=None, max_epochs=3, initial_labels=5, n=40, callbacks=(), ckpt_path=None, test=True, **loop_kwargs):
    dm = ActiveLearningDataModule(random_dataset(n=n), batch_size=5, initial_labels=initial_labels, query_size=5,
                                  val_split=0.5, seed=0, test_dataset=random_dataset(n=10, seed=1) if test else None)
    trainer = Trainer(max_epochs=max_epochs, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=list(callbacks), logger=False, enable_checkpointing=False)
    loop = ActiveLearningLoop(**{"label_epoch_frequency": 1, "inference_iteration": 3, **loop_kwargs})
    loop.connect(trainer.fit_loop)
    trainer.fit_loop = loop
    model = model if model is not None else DropoutModel()
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, loop, dm, model


class Recorder:
    """A heuristic that keeps what it was called with."""

    def __init__(self, inner="bald"):
        self.inner = H.resolve_heuristic(inner)
        self.calls = []
        self.__name__ = "recorder"

    def __call__(self, probabilities):
        self.calls.append(probabilities.clone())
        return self.inner(probabilities)


def test_flash_numbers_three_cycles_label_twenty():
    recorder = Recorder()
    trainer, loop, dm, _ = al_run(heuristic=recorder)
    assert loop.progress.total.completed == 3
    assert len(dm.labelled_indices) == 20
    assert torch.bincount(dm.labelled_step[dm.labelled_step >= 0]).tolist() == [5, 5, 5, 5]
    # every unlabelled sample scored, not one per predict batch (pool batches hold 5)
    assert [tuple(p.shape) for p in recorder.calls] == [(35, 10, 3), (30, 10, 3), (25, 10, 3)]
    assert {"train_loss", "val_loss", "test_loss"} <= set(trainer.callback_metrics)
    # cycles of 1 epoch; global_step goes on across cycles: train sets of 3, 5 and 8 samples
    assert trainer.current_epoch == 1 and trainer.global_step == 1 + 1 + 2


def test_rows_follow_unlabelled_indices_order():
    # Scores falling with the row: each query must label the 5 smallest unlabelled dataset indices.
    trainer, loop, dm, _ = al_run(heuristic=lambda p: -torch.arange(p.shape[0], dtype=torch.float64))
    initial = (dm.labelled_step == 0).nonzero().flatten().tolist()
    pool = [i for i in range(40) if i not in initial]
    for query in (1, 2, 3):
        assert (dm.labelled_step == query).nonzero().flatten().tolist() == pool[5 * (query - 1): 5 * query]


def test_mc_passes_differ_and_batchnorm_stays_in_eval():
    seen = []

    class Modes(Callback):
        def on_predict_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
            seen.append((module.net[1].training, module.net[3].training, module.net[1].running_mean.clone()))

    recorder = Recorder()
    al_run(model=DropoutModel(batchnorm=True), max_epochs=1, heuristic=recorder, callbacks=[Modes()])
    p = recorder.calls[0]
    assert (p[:, :, 0] != p[:, :, 1]).any(dim=1).all() and (p[:, :, 1] != p[:, :, 2]).any(dim=1).all()
    assert all(bn is False and dropout is True for bn, dropout, _ in seen)
    assert all(torch.equal(seen[0][2], stats) for _, _, stats in seen)  # running stats untouched
    torch.testing.assert_close(p.sum(1), torch.ones(35, 3, dtype=torch.float64))


def test_mc_dropout_prediction_loop_on_its_own():
    trainer = Trainer(enable_progress_bar=False, logger=False)
    trainer.predict_loop = MCDropoutPredictionLoop(4)
    from fastloop.testing import random_loader

    outputs = trainer.predict(DropoutModel(), random_loader(n=20, batch_size=8))
    assert [tuple(o.shape) for o in outputs] == [(8, 10, 4), (8, 10, 4), (4, 10, 4)]
    assert not torch.equal(outputs[0][..., 0], outputs[0][..., 1])


def test_weights_and_optimizer_state_reset_in_place_each_cycle():
    starts = []

    class AtTrainStart(Callback):
        def on_train_start(self, trainer, module):
            opt = trainer.optimizers[0]
            starts.append(({k: v.clone() for k, v in module.state_dict().items()},
                           [p.data_ptr() for p in module.parameters()],
                           [{k: v.clone() for k, v in s.items()} for s in opt.state.values()]))

    model = DropoutModel(optimizer="adam")
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer, loop, _, _ = al_run(model=model, callbacks=[AtTrainStart()])
    assert len(starts) == 3
    for weights, pointers, states in starts:
        assert all(torch.equal(initial[k], v) for k, v in weights.items())
        assert pointers == starts[0][1]  # the same tensors: graphs and direct calls stay valid
        assert all(float(s["step"]) == 0 and not s["exp_avg"].any() for s in states)
    assert len(starts[1][2]) == 4  # Adam's state exists (zeroed), not rebuilt
    assert not all(torch.equal(initial[k], v) for k, v in model.state_dict().items())  # last cycle stays trained


def test_without_weight_reset_training_continues():
    starts = []

    class AtTrainStart(Callback):
        def on_train_start(self, trainer, module):
            starts.append(module.net[0].weight.clone())

    al_run(callbacks=[AtTrainStart()], should_reset_weights=False, max_epochs=2)
    assert not torch.equal(starts[0], starts[1])


def test_no_initial_labels_warns_and_labels_fifteen():
    with pytest.warns(UserWarning, match="no labels provided for the initial step"):
        trainer, loop, dm, _ = al_run(initial_labels=0)
    assert loop.progress.total.completed == 3 and len(dm.labelled_indices) == 15


def test_pool_exhaustion_ends_the_loop():
    trainer, loop, dm, _ = al_run(n=12, initial_labels=2, max_epochs=10, heuristic="random")
    assert loop.progress.total.completed == 3 and dm.labelled_indices == list(range(12))
    assert torch.bincount(dm.labelled_step).tolist() == [2, 5, 5]


def test_configuration_errors_before_the_first_step():
    with pytest.raises(TypeError, match="BoringModel has no torch.nn.Dropout\\* layer"):
        al_run(model=BoringModel())
    trainer = Trainer(max_epochs=2, enable_progress_bar=False, logger=False)
    loop = ActiveLearningLoop()
    loop.connect(trainer.fit_loop)
    trainer.fit_loop = loop
    with pytest.raises(TypeError, match="needs trainer.fit\\(model, datamodule=ActiveLearningDataModule"):
        trainer.fit(DropoutModel(), random_dataset())
    assert trainer.global_step == 0
    with pytest.raises(TypeError, match="takes the trainer's FitLoop, got ActiveLearningLoop"):
        ActiveLearningLoop().connect(loop)
    with pytest.raises(ValueError, match="label_epoch_frequency=0\\): expected an int >= 1"):
        ActiveLearningLoop(label_epoch_frequency=0)
    with pytest.raises(ValueError, match="MCDropoutPredictionLoop\\(iterations=0\\)"):
        ActiveLearningLoop(inference_iteration=0)


class KillAt(Callback):
    """Save a checkpoint, then fail, at one point of one cycle."""

    def __init__(self, hook, cycle, epoch, batch=None):
        self.hook, self.cycle, self.epoch, self.batch = hook, cycle, epoch, batch

    def _maybe(self, trainer, hook, batch_idx=None):
        loop = trainer.fit_loop
        if (hook, loop.progress.current.ready, trainer.current_epoch, batch_idx) == (
                self.hook, self.cycle, self.epoch, self.batch):
            trainer.save_checkpoint("kill.ckpt")
            raise KeyboardInterrupt

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._maybe(trainer, "on_train_batch_end", batch_idx)

    def on_train_epoch_end(self, trainer, module):
        self._maybe(trainer, "on_train_epoch_end")


@pytest.mark.parametrize("kill", [KillAt("on_train_batch_end", cycle=2, epoch=1, batch=0),
                                  KillAt("on_train_epoch_end", cycle=2, epoch=1)],
                         ids=["mid-epoch", "after-the-cycle's-training"])
def test_resume_in_the_middle_of_the_cycles_continues_exactly(kill):
    def run(**kwargs):
        torch.manual_seed(0)
        return al_run(model=DropoutModel(optimizer="adam"), label_epoch_frequency=2, **kwargs)

    ref_trainer, ref_loop, ref_dm, ref_model = run()
    with pytest.raises(KeyboardInterrupt):
        run(callbacks=[kill])
    trainer, loop, dm, model = run(ckpt_path="kill.ckpt")
    assert torch.equal(dm.labelled_step, ref_dm.labelled_step)
    assert loop.progress.total.completed == 3 and trainer.global_step == ref_trainer.global_step
    for (name, p), q in zip(model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(p, q), name


# ------------------------------------------------------------ Loop API additions
def test_connect_fills_a_declared_child_slot():
    class Wrapper(Loop):
        child_slots = ("inner",)

        def __init__(self):
            super().__init__()
            self.inner = None
            self.progress = Progress()

        done = property(lambda self: True)

        def reset(self): ...
        def advance(self): ...

    wrapper, inner = Wrapper(), ActiveLearningLoop()
    wrapper.connect(inner=inner)
    assert dict(wrapper.children())["inner"] is inner
    with pytest.raises(ValueError, match="unknown child loop `other`; its child loops are: inner"):
        wrapper.connect(other=inner)


def test_fit_loop_reset_epochs_keeps_global_step():
    trainer = Trainer(max_epochs=2, enable_progress_bar=False, logger=False, enable_checkpointing=False)
    from fastloop.testing import random_loader

    class Twice(Callback):
        ran = False

        def on_train_end(self, trainer, module):
            if not self.ran:
                self.ran = True
                trainer.fit_loop.reset_epochs()
                trainer.fit_loop.run()

    trainer.callbacks.append(Twice())
    trainer.fit(BoringModel(), random_loader())
    assert trainer.global_step == 16 and trainer.current_epoch == 2
    assert trainer.fit_loop.epoch_progress.total.completed == 4


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_optimizer_snapshot_restores_a_fresh_optimizer(optimizer):
    def make(model):
        opt = (torch.optim.Adam(model.parameters(), lr=0.1) if optimizer == "adam"
               else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.5))
        return opt, torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)

    def step(model, opt, sched):
        model.zero_grad()
        model.loss((torch.ones(4, 32), torch.zeros(4, dtype=torch.long))).backward()
        opt.step()
        sched.step()

    torch.manual_seed(0)
    model = BoringModel()
    reference = BoringModel()
    reference.load_state_dict(model.state_dict())
    opt, sched = make(model)
    snapshot = OptimizerSnapshot([opt], [type("C", (), {"scheduler": sched})()])
    for _ in range(3):
        step(model, opt, sched)
    model.load_state_dict(reference.state_dict())
    snapshot.restore()
    ref_opt, ref_sched = make(reference)
    for _ in range(2):
        step(model, opt, sched)
        step(reference, ref_opt, ref_sched)
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] == 0.025
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))


# ------------------------------------------------------------------ compiled mode
_GRAPHS = re.compile(r"^  (\S+) .*\[(\d+) graph", re.M)


@pytest.mark.slow  # ~35 s of CPU compiling (a fused Adam step and the MC prediction)
@pytest.mark.usefixtures("no_mode_override")
def test_compiled_cycles_reuse_their_graphs():
    counts, steps = [], []

    class AfterPrediction(Callback):
        def on_predict_end(self, trainer, module):
            counts.append(dict(_GRAPHS.findall(trainer.explain())))
            steps.append(trainer.fit_loop.epoch_loop.batch_loop.optimizer_loop.step_report.step)

    dm = ActiveLearningDataModule(random_dataset(n=40), batch_size=5, initial_labels=5, query_size=5, seed=0)
    trainer = Trainer(max_epochs=3, mode="compiled", enable_progress_bar=False, enable_model_summary=False,
                      logger=False, enable_checkpointing=False, callbacks=[AfterPrediction()])
    loop = ActiveLearningLoop(inference_iteration=3)
    loop.connect(trainer.fit_loop)
    trainer.fit_loop = loop
    trainer.fit(DropoutModel(optimizer="adam"), datamodule=dm)
    assert len(dm.labelled_indices) == 20
    train, predict = "fit_loop.fit_loop.epoch_loop.batch_loop.optimizer_loop", "fit_loop.predict_loop.epoch_loop"
    assert counts[0] == counts[2] and counts[0][train] == "1" and counts[0][predict] == "1"
    assert steps[0] is steps[1] is steps[2]  # never rebuilt
    # Adam's state was zeroed in place: after the first call every training step ran its graph directly
    direct, calls = map(int, re.search(r"(\d+) of (\d+) calls ran", trainer.explain()).groups())
    assert (direct, calls) == (trainer.global_step - 1, trainer.global_step)
