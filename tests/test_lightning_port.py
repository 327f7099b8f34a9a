"""Lightning 1.x's published examples, ported by changing their imports (examples/lightning_port/),
fitted eagerly and compiled.

Expected names, steps and files are what Lightning 1.9.5 writes for the same runs
(``scripts/lightning_oracle.py`` runs an example under both and prints them side by side).
"""
import csv
import os
import pathlib
import sys
from argparse import Namespace

import pytest
import yaml
import torch
from torch.utils.data import DataLoader

from fastloop import Callback, Trainer, seed_everything
from fastloop.callbacks import EarlyStopping, ModelCheckpoint

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the examples import each other as examples.lightning_port.*

from examples.lightning_port import autoencoder as ae  # noqa: E402
from examples.lightning_port import bug_report_model as br  # noqa: E402
from examples.lightning_port import generative_adversarial_net as gan  # noqa: E402
from examples.lightning_port import yielding_training_step as yielding  # noqa: E402

QUIET = dict(enable_progress_bar=False, enable_model_summary=False)
GAN_ARGS = Namespace(lr=0.0002, b1=0.5, b2=0.999, latent_dim=16)
LOG_DIR = pathlib.Path("lightning_logs") / "version_0"


# ------------------------------------------------------------------------ helpers
def read_metrics():
    """``metrics.csv``'s header, and each row as (step, epoch, names with a value)."""
    with open(LOG_DIR / "metrics.csv", newline="") as f:
        header, *body = list(csv.reader(f))
    rows = [dict(zip(header, cells)) for cells in body]
    shape = [(int(r["step"]), int(r["epoch"]) if r["epoch"] else None,
              tuple(k for k in header if k not in ("step", "epoch") and r[k] != "")) for r in rows]
    return header, shape, rows


def assert_same_tensors(state, module):
    """Every tensor of ``module`` equals ``state``'s (a state_dict or a module), bit for bit."""
    expected = state.state_dict() if isinstance(state, torch.nn.Module) else state
    actual = module.state_dict()
    assert list(actual) == list(expected)
    for name, tensor in actual.items():
        assert torch.equal(tensor, expected[name]), name


def assert_compiled_or_explained(trainer, known_reasons):
    """The training step ran compiled, or ``explain()`` gives one of the ``known_reasons`` (none:
    it must run compiled)."""
    report = trainer.explain()
    step_line = next(line for line in report.splitlines() if "optimizer_loop" in line)
    if "): compiled [" in step_line:
        return
    assert "eager (requested compiled)" in step_line, report
    assert any(reason in report for reason in known_reasons), report


class StartCounters(Callback):
    """Remembers the counters a fit starts from."""

    def on_train_start(self, trainer, pl_module):
        self.global_step, self.current_epoch = trainer.global_step, trainer.current_epoch


# ----------------------------------------------------------------- bug-report model
def boring_loaders():
    return [DataLoader(br.RandomDataset(32, 64), batch_size=2) for _ in range(3)]


def test_bug_report_model_fit_test_and_reload():
    train, val, test = boring_loaders()
    model = br.BoringModel()
    trainer = Trainer(default_root_dir=os.getcwd(), max_epochs=2, limit_train_batches=4, limit_val_batches=2,
                      limit_test_batches=1, num_sanity_val_steps=0, log_every_n_steps=1, **QUIET)
    trainer.fit(model, train_dataloaders=train, val_dataloaders=val)
    assert (trainer.global_step, trainer.current_epoch) == (2 * 4 * 1, 2)
    assert sorted(trainer.callback_metrics) == sorted(trainer.logged_metrics) == ["train_loss", "valid_loss"]
    results = trainer.test(model, dataloaders=test)
    assert sorted(trainer.callback_metrics) == ["test_loss"]

    header, shape, rows = read_metrics()
    assert header == ["train_loss", "epoch", "step", "valid_loss", "test_loss"]
    train, valid = ("train_loss",), ("valid_loss",)
    assert shape == [(0, 0, train), (1, 0, train), (2, 0, train), (3, 0, train), (3, 0, valid),
                     (4, 1, train), (5, 1, train), (6, 1, train), (7, 1, train), (7, 1, valid),
                     (8, 2, ("test_loss",))]
    assert float(rows[-1]["test_loss"]) == results[0]["test_loss"]
    assert (LOG_DIR / "hparams.yaml").read_text() == "{}\n"

    best = trainer.checkpoint_callback.best_model_path
    assert pathlib.Path(best).name == "epoch=1-step=8.ckpt"
    assert_same_tensors(model, br.BoringModel.load_from_checkpoint(best))


@pytest.mark.compile
def test_bug_report_model_compiled(no_mode_override):
    train, val, _ = boring_loaders()
    model = br.BoringModel()
    trainer = Trainer(mode="compiled", max_epochs=1, limit_train_batches=3, limit_val_batches=1,
                      num_sanity_val_steps=0, log_every_n_steps=1, **QUIET)
    trainer.fit(model, train_dataloaders=train, val_dataloaders=val)
    assert "optimizer_loop (OptimizerLoop): compiled [1 graph(s)" in trainer.explain()
    assert trainer.global_step == 1 * 3 * 1
    assert sorted(trainer.callback_metrics) == ["train_loss", "valid_loss"]
    header, shape, _ = read_metrics()
    assert header == ["train_loss", "epoch", "step", "valid_loss"]
    assert shape == [(0, 0, ("train_loss",)), (1, 0, ("train_loss",)), (2, 0, ("train_loss",)),
                     (2, 0, ("valid_loss",))]
    assert_same_tensors(model, br.BoringModel.load_from_checkpoint(trainer.checkpoint_callback.best_model_path))


# ------------------------------------------------------------------- autoencoder
def fit_autoencoder(max_epochs=2, callbacks=(), **trainer_kwargs):
    model = ae.LitAutoEncoder(hidden_dim=16, learning_rate=0.005)
    trainer = Trainer(max_epochs=max_epochs, limit_train_batches=3, callbacks=list(callbacks), **QUIET,
                      **trainer_kwargs)
    trainer.fit(model, datamodule=ae.MyDataModule())
    return model, trainer


def test_autoencoder_hparams_and_checkpoints():
    model, trainer = fit_autoencoder(callbacks=[ModelCheckpoint(monitor="val_loss", save_last=True)])
    assert (trainer.global_step, trainer.current_epoch) == (2 * 3 * 1, 2)
    assert (LOG_DIR / "hparams.yaml").read_text() == "hidden_dim: 16\nlearning_rate: 0.005\n"
    callback = trainer.checkpoint_callback
    assert sorted(os.listdir(LOG_DIR / "checkpoints")) == ["epoch=1-step=6.ckpt", "last.ckpt"]
    for path in (callback.best_model_path, callback.last_model_path):
        loaded = ae.LitAutoEncoder.load_from_checkpoint(path)
        assert loaded.hparams == {"hidden_dim": 16, "learning_rate": 0.005}
        assert loaded.encoder[0].out_features == 16
        assert_same_tensors(model, loaded)


def test_autoencoder_logged_names_and_rows():
    _, trainer = fit_autoencoder(log_every_n_steps=2)
    # Lightning: an evaluation value logged on step and epoch reaches callback_metrics under its
    # name and `_epoch` name only (the `_step` one goes to loggers).
    assert sorted(trainer.callback_metrics) == ["train_loss", "val_loss", "val_loss_epoch"]
    assert sorted(trainer.logged_metrics) == ["train_loss", "val_loss_epoch", "val_loss_step"]
    header, shape, _ = read_metrics()
    assert header == ["train_loss", "epoch", "step", "val_loss_step", "val_loss_epoch"]
    # Training rows every 2 stepped batches; validation step rows at the validation batch count
    # (no epoch); validation epoch rows at the last training step.
    train, val_step, val_epoch = ("train_loss",), ("val_loss_step",), ("val_loss_epoch",)
    assert shape == [(1, 0, train), (0, None, val_step), (2, 0, val_epoch),
                     (3, 1, train), (5, 1, train), (1, None, val_step), (5, 1, val_epoch)]


def test_autoencoder_resumes_from_last_like_an_uninterrupted_run(tmp_path):
    def fit(workdir, max_epochs, ckpt_path=None):
        os.makedirs(workdir, exist_ok=True)
        os.chdir(workdir)
        seed_everything(7)
        start = StartCounters()
        model = ae.LitAutoEncoder(hidden_dim=16, learning_rate=0.005)
        trainer = Trainer(max_epochs=max_epochs, limit_train_batches=3, logger=False, **QUIET,
                          callbacks=[ModelCheckpoint(dirpath="ckpts", save_last=True), start])
        trainer.fit(model, datamodule=ae.MyDataModule(), ckpt_path=ckpt_path)
        return model, trainer, start

    fit(tmp_path / "resumed", max_epochs=1)
    resumed, trainer, start = fit(tmp_path / "resumed", max_epochs=3, ckpt_path="last")
    assert (start.global_step, start.current_epoch) == (1 * 3, 1)
    assert (trainer.global_step, trainer.current_epoch) == (3 * 3, 3)
    uninterrupted, reference, _ = fit(tmp_path / "uninterrupted", max_epochs=3)
    assert reference.global_step == trainer.global_step
    assert_same_tensors(uninterrupted, resumed)
    for mine, theirs in zip(trainer.optimizers[0].state.values(), reference.optimizers[0].state.values()):
        assert all(torch.equal(mine[key], theirs[key]) for key in ("exp_avg", "exp_avg_sq", "step"))


class ScriptedAutoEncoder(ae.LitAutoEncoder):
    """The autoencoder with a validation loss read from a script, one value per epoch."""

    script = [1.0, 0.5, 0.6, 0.7, 0.8, 0.9]

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.tensor(self.script[self.current_epoch]))


def test_early_stopping_stops_at_the_epoch_the_script_implies():
    stopper = EarlyStopping(monitor="val_loss", patience=2)
    model = ScriptedAutoEncoder()
    trainer = Trainer(max_epochs=6, limit_train_batches=1, log_every_n_steps=1, **QUIET,
                      callbacks=[stopper, ModelCheckpoint(monitor="val_loss")])
    trainer.fit(model, datamodule=ae.MyDataModule())
    # Best 0.5 at epoch 1; epochs 2 and 3 do not improve: patience 2 runs out at epoch 3.
    assert (stopper.stopped_epoch, stopper.wait_count, float(stopper.best_score)) == (3, 2, 0.5)
    assert (trainer.current_epoch, trainer.global_step, trainer.should_stop) == (4, 4, True)
    assert torch.equal(trainer.callback_metrics["val_loss"], torch.tensor(0.7))

    best = trainer.checkpoint_callback.best_model_path
    assert pathlib.Path(best).name == "epoch=1-step=2.ckpt"
    loaded = ScriptedAutoEncoder.load_from_checkpoint(best)
    assert loaded.hparams == {"hidden_dim": 64, "learning_rate": 0.01}
    assert_same_tensors(torch.load(best, weights_only=False)["state_dict"], loaded)

    header, shape, rows = read_metrics()
    assert header == ["train_loss", "epoch", "step", "val_loss"]
    # One batch per epoch: a training row, then a validation row, both at step == epoch.
    assert shape == [row for epoch in range(4)
                     for row in ((epoch, epoch, ("train_loss",)), (epoch, epoch, ("val_loss",)))]
    assert [float(r["val_loss"]) for r in rows if r["val_loss"]] == [float(torch.tensor(v)) for v in model.script[:4]]


@pytest.mark.slow  # a second compiled port; test_bug_report_model_compiled stays in the default suite
@pytest.mark.compile
def test_autoencoder_compiled(no_mode_override):
    model, trainer = fit_autoencoder(max_epochs=1, mode="compiled", log_every_n_steps=1)
    # `_common_step(batch, batch_idx, stage)` hands batch_idx on: the step may stay eager for it.
    assert_compiled_or_explained(trainer, ["training_step reads batch_idx"])
    assert trainer.global_step == 1 * 3 * 1
    compiled_csv = read_metrics()[:2]
    # The same fit run eagerly logs the same names and writes the same rows.
    os.makedirs("eager")
    os.chdir("eager")
    _, eager = fit_autoencoder(max_epochs=1, mode="eager", log_every_n_steps=1)
    assert sorted(trainer.callback_metrics) == sorted(eager.callback_metrics)
    assert sorted(trainer.logged_metrics) == sorted(eager.logged_metrics)
    assert read_metrics()[:2] == compiled_csv
    assert_same_tensors(model, ae.LitAutoEncoder.load_from_checkpoint(trainer.checkpoint_callback.best_model_path))


# --------------------------------------------------------------------------- GAN
def test_gan_two_optimizers():
    trainer = gan.main(GAN_ARGS, max_epochs=2, limit_train_batches=3, log_every_n_steps=2, **QUIET)
    model = trainer.lightning_module
    assert (trainer.global_step, trainer.current_epoch) == (2 * 3 * 2, 2)
    assert sorted(trainer.callback_metrics) == sorted(trainer.progress_bar_metrics) == ["d_loss", "g_loss"]
    header, shape, _ = read_metrics()
    assert header == ["g_loss", "d_loss", "epoch", "step"]
    assert shape == [(1, 0, ("g_loss", "d_loss")), (3, 1, ("g_loss", "d_loss")), (5, 1, ("g_loss", "d_loss"))]

    best = trainer.checkpoint_callback.best_model_path
    assert pathlib.Path(best).name == "epoch=1-step=12.ckpt"
    loaded = gan.GAN.load_from_checkpoint(best)
    assert loaded.hparams == {"img_shape": (1, 8, 8), "lr": 0.0002, "b1": 0.5, "b2": 0.999, "latent_dim": 16}
    assert type(loaded.hparams.img_shape) is tuple
    assert_same_tensors(model, loaded)  # BatchNorm running statistics included


def test_gan_hparams_yaml_is_safe_loadable():
    # A deliberate difference (README, "Coming from Lightning"): Lightning 1.9.5 writes the tuple as
    # `!!python/tuple`, which yaml.safe_load rejects; fastloop writes a plain list.
    gan.main(GAN_ARGS, max_epochs=1, limit_train_batches=1, logger=True, enable_checkpointing=False, **QUIET)
    text = (LOG_DIR / "hparams.yaml").read_text()
    assert text == "b1: 0.5\nb2: 0.999\nimg_shape:\n- 1\n- 8\n- 8\nlatent_dim: 16\nlr: 0.0002\n"
    assert yaml.safe_load(text)["img_shape"] == [1, 8, 8]


@pytest.mark.compile
@pytest.mark.slow  # two fused graphs (one per optimizer): ~75 s of cold compile on a busy 2-core CPU
def test_gan_compiled(no_mode_override):
    trainer = gan.main(GAN_ARGS, max_epochs=1, limit_train_batches=2, mode="compiled", log_every_n_steps=1, **QUIET)
    assert_compiled_or_explained(trainer, known_reasons=[])  # both optimizers' steps compile today
    assert trainer.global_step == 1 * 2 * 2
    assert sorted(trainer.callback_metrics) == ["d_loss", "g_loss"]
    header, shape, _ = read_metrics()
    assert shape == [(0, 0, ("g_loss", "d_loss")), (1, 0, ("g_loss", "d_loss"))]
    loaded = gan.GAN.load_from_checkpoint(trainer.checkpoint_callback.best_model_path)
    assert_same_tensors(trainer.lightning_module, loaded)


# ------------------------------------------------------------------ yielding GAN
def test_yielding_gan_computes_the_generator_once_per_batch():
    model = yielding.GAN(lr=GAN_ARGS.lr, b1=GAN_ARGS.b1, b2=GAN_ARGS.b2, latent_dim=GAN_ARGS.latent_dim)
    generator_calls = []
    model.generator.register_forward_hook(lambda *_: generator_calls.append(1))
    trainer = Trainer(max_epochs=2, limit_train_batches=3, log_every_n_steps=2, **QUIET)
    trainer.fit_loop.epoch_loop.batch_loop.connect(optimizer_loop=yielding.YieldLoop())
    trainer.fit(model, gan.RandomImages())
    assert (trainer.global_step, trainer.current_epoch) == (2 * 3 * 2, 2)
    assert len(generator_calls) == 2 * 3  # the template GAN calls it twice per batch
    assert sorted(trainer.callback_metrics) == ["d_loss", "g_loss"]
    header, shape, _ = read_metrics()
    assert header == ["g_loss", "d_loss", "epoch", "step"]
    assert shape == [(1, 0, ("g_loss", "d_loss")), (3, 1, ("g_loss", "d_loss")), (5, 1, ("g_loss", "d_loss"))]
    assert_same_tensors(model, yielding.GAN.load_from_checkpoint(trainer.checkpoint_callback.best_model_path))


def test_yielding_example_main_runs():
    trainer = yielding.main(GAN_ARGS, max_epochs=1, limit_train_batches=2, logger=False, **QUIET)
    assert type(trainer.fit_loop.epoch_loop.batch_loop.optimizer_loop) is yielding.YieldLoop
    assert trainer.global_step == 1 * 2 * 2
