"""fastloop.loggers: run-directory versioning, the exact metrics.csv / hparams.yaml files (the same
bytes Lightning 1.9.5 writes for plain values), flushing, atomic rewrites, rank-0-only writing and
TensorBoard scalars read back from the event file."""
import argparse
import csv
import enum
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from fastloop.loggers import CSVLogger, Logger, TensorBoardLogger
from fastloop.loggers._rank import DummyExperiment


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def listing(directory):
    return sorted(os.listdir(directory))


# --- versions and directories --------------------------------------------------------------


def test_next_free_version_in_one_dir():
    first = CSVLogger("logs")
    first.save()  # creates version_0
    second = CSVLogger("logs")
    assert (first.version, second.version) == (0, 1)
    assert first.log_dir == os.path.join("logs", "lightning_logs", "version_0")
    assert second.log_dir == os.path.join("logs", "lightning_logs", "version_1")
    assert (second.root_dir, second.save_dir, second.name) == (os.path.join("logs", "lightning_logs"), "logs",
                                                               "lightning_logs")


def test_explicit_int_and_str_versions():
    os.makedirs("logs/exp/version_abc")  # not a numbered version: ignored by the scan
    os.makedirs("logs/exp/version_3")
    with open("logs/exp/version_9", "w"):  # a file, not a directory: ignored
        pass
    assert CSVLogger("logs", name="exp").version == 4
    assert CSVLogger("logs", name="exp", version=12).log_dir == os.path.join("logs", "exp", "version_12")
    named = CSVLogger("logs", name="exp", version="run_a")
    assert named.version == "run_a"
    assert named.log_dir == os.path.join("logs", "exp", "run_a")


def test_empty_name_puts_versions_under_save_dir():
    logger = CSVLogger("logs", name=None)
    logger.save()
    assert logger.name == ""
    assert logger.log_dir == os.path.join("logs", "version_0")
    assert listing("logs/version_0") == ["hparams.yaml"]


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="version"):
        CSVLogger("logs", version=1.5)
    with pytest.raises(ValueError, match="flush_logs_every_n_steps"):
        CSVLogger("logs", flush_logs_every_n_steps=0)
    with pytest.raises(TypeError, match="list"):
        CSVLogger("logs").log_hyperparams(["lr", 0.1])


# --- metrics.csv -----------------------------------------------------------------------------


def test_metrics_csv_rows_with_differing_keys():
    # Header: keys in order of first appearance, `step` after the first row's own keys; a missing
    # key is an empty cell; \r\n line ends (csv module). Byte-identical to Lightning 1.9.5's file.
    logger = CSVLogger("logs")
    logger.log_metrics({"loss": 0.5, "acc": torch.tensor(0.25)}, step=0)
    logger.log_metrics({"val_loss": 1 / 3}, step=1)
    logger.log_metrics({"loss": torch.tensor(1e-8, dtype=torch.float64), "epoch": 0}, step=2)
    logger.log_metrics({"acc": 2, "new": float("nan")}, step=3)
    logger.log_metrics({"loss": float("inf")})  # no step: the row's index
    logger.finalize("success")
    assert read_bytes(os.path.join(logger.log_dir, "metrics.csv")) == (
        b"loss,acc,step,val_loss,epoch,new\r\n"
        b"0.5,0.25,0,,,\r\n"
        b",,1,0.3333333333333333,,\r\n"
        b"1e-08,,2,,0,\r\n"
        b",2,3,,,nan\r\n"
        b"inf,,4,,,\r\n"
    )
    assert logger.experiment.metrics_file_path == os.path.join(logger.log_dir, "metrics.csv")


def test_prefix_is_joined_with_a_dash():
    logger = CSVLogger("logs", prefix="train")
    logger.log_metrics({"x": 1}, step=5)
    logger.log_metrics({"y": 2})
    logger.save()
    assert read_bytes(os.path.join(logger.log_dir, "metrics.csv")) == b"train-x,step,train-y\r\n1,5,\r\n,1,2\r\n"


def test_flush_every_n_steps_and_on_save():
    logger = CSVLogger("logs", flush_logs_every_n_steps=3)
    path = os.path.join(logger.log_dir, "metrics.csv")
    logger.log_metrics({"a": 1.0}, step=0)
    logger.log_metrics({"a": 2.0}, step=1)
    assert not os.path.exists(path)
    logger.log_metrics({"a": 3.0}, step=2)  # (step + 1) % 3 == 0
    assert read_bytes(path) == b"a,step\r\n1.0,0\r\n2.0,1\r\n3.0,2\r\n"
    logger.log_metrics({"a": 4.0}, step=3)
    assert read_bytes(path) == b"a,step\r\n1.0,0\r\n2.0,1\r\n3.0,2\r\n"
    logger.save()
    assert read_bytes(path).endswith(b"3.0,2\r\n4.0,3\r\n")


def test_flush_counts_calls_without_step():
    logger = CSVLogger("logs", flush_logs_every_n_steps=2)
    path = os.path.join(logger.log_dir, "metrics.csv")
    logger.log_metrics({"a": 1})
    assert not os.path.exists(path)
    logger.log_metrics({"a": 2})
    assert read_bytes(path) == b"a,step\r\n1,0\r\n2,1\r\n"


def test_save_leaves_unchanged_files_alone():
    logger = CSVLogger("logs")
    logger.log_hyperparams({"lr": 0.1})
    logger.log_metrics({"a": 1}, step=0)
    logger.save()
    csv_path, yaml_path = (os.path.join(logger.log_dir, n) for n in ("metrics.csv", "hparams.yaml"))
    inodes = os.stat(csv_path).st_ino, os.stat(yaml_path).st_ino  # os.replace gives a new inode
    logger.save()
    assert (os.stat(csv_path).st_ino, os.stat(yaml_path).st_ino) == inodes
    logger.log_metrics({"a": 2}, step=1)
    logger.save()
    assert os.stat(csv_path).st_ino != inodes[0] and os.stat(yaml_path).st_ino == inodes[1]
    logger.log_hyperparams({"lr": 0.2})
    logger.save()
    assert os.stat(yaml_path).st_ino != inodes[1]
    assert read_bytes(yaml_path) == b"lr: 0.2\n"


def test_finalize_without_logging_writes_nothing():
    logger = CSVLogger("logs")
    logger.finalize("success")
    assert not os.path.exists("logs")


def test_files_get_the_usual_permissions():
    logger = CSVLogger("logs")
    logger.log_metrics({"a": 1}, step=0)
    logger.save()
    with open("plain", "w"):
        pass
    expected = stat.S_IMODE(os.stat("plain").st_mode)
    for name in ("metrics.csv", "hparams.yaml"):
        assert stat.S_IMODE(os.stat(os.path.join(logger.log_dir, name)).st_mode) == expected


def test_interrupted_metrics_write_keeps_previous_file(monkeypatch):
    logger = CSVLogger("logs")
    logger.log_metrics({"a": 1}, step=0)
    logger.save()
    path = os.path.join(logger.log_dir, "metrics.csv")
    before = read_bytes(path)
    logger.log_metrics({"a": 2, "b": 3}, step=1)

    def write_one_row_then_crash(self, rows):
        self.writerow(rows[0])
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(csv.DictWriter, "writerows", write_one_row_then_crash)
        with pytest.raises(OSError, match="disk full"):
            logger.save()
    assert read_bytes(path) == before
    assert listing(logger.log_dir) == ["hparams.yaml", "metrics.csv"]  # no temporary file left
    logger.save()
    assert read_bytes(path) == b"a,step,b\r\n1,0,\r\n2,1,3\r\n"


def test_interrupted_hparams_write_keeps_previous_file(monkeypatch):
    logger = CSVLogger("logs")
    logger.log_hyperparams({"lr": 0.1})
    logger.save()
    path = os.path.join(logger.log_dir, "hparams.yaml")
    logger.log_hyperparams({"batch_size": 32})

    def half_dump(data, stream):
        stream.write("batch_size: 3")
        raise KeyboardInterrupt

    monkeypatch.setattr(yaml, "safe_dump", half_dump)
    with pytest.raises(KeyboardInterrupt):
        logger.save()
    assert read_bytes(path) == b"lr: 0.1\n"
    assert listing(logger.log_dir) == ["hparams.yaml"]


# --- hparams.yaml ------------------------------------------------------------------------------


class Color(enum.Enum):
    RED = 1


class AttributeDict(dict):
    """Stands in for fastloop's AttributeDict (a dict subclass)."""


def test_hparams_yaml_bytes_for_plain_values():
    # The same bytes Lightning 1.9.5 writes for these values (PyYAML block style, sorted keys).
    logger = CSVLogger("logs")
    logger.log_hyperparams({"lr": 0.001, "layers": [64, 32], "nested": {"b": 2, "a": "x"}, "flag": True,
                            "none": None, "color": Color.RED, "s": "a: b", "e": "", "big": 1e-10})
    logger.log_hyperparams(argparse.Namespace(extra=3.5))
    logger.save()
    assert read_bytes(os.path.join(logger.log_dir, "hparams.yaml")) == (
        b"big: 1.0e-10\ncolor: RED\ne: ''\nextra: 3.5\nflag: true\nlayers:\n- 64\n- 32\nlr: 0.001\n"
        b"nested:\n  a: x\n  b: 2\nnone: null\ns: 'a: b'\n"
    )


def test_hparams_yaml_round_trips_with_safe_load():
    class Opaque:
        def __repr__(self):
            return "Opaque()"

    params = AttributeDict(lr=0.1, betas=(0.9, 0.99), inner=AttributeDict(k=1), ns=argparse.Namespace(d=2),
                           n32=np.float32(0.5), i64=np.int64(7), obj=Opaque(), layer=torch.nn.ReLU,
                           keys={1: "one"})
    logger = CSVLogger("logs")
    logger.log_hyperparams(params)
    logger.save()
    with open(os.path.join(logger.log_dir, "hparams.yaml")) as f:
        loaded = yaml.safe_load(f)
    assert loaded == {"lr": 0.1, "betas": [0.9, 0.99], "inner": {"k": 1}, "ns": {"d": 2}, "n32": 0.5, "i64": 7,
                      "obj": "Opaque()", "layer": repr(torch.nn.ReLU), "keys": {1: "one"}}


def test_empty_hparams_file_on_save():
    logger = CSVLogger("logs")
    logger.save()
    assert listing(logger.log_dir) == ["hparams.yaml"]
    assert read_bytes(os.path.join(logger.log_dir, "hparams.yaml")) == b"{}\n"


# --- rank ----------------------------------------------------------------------------------------


def test_rank_other_than_zero_writes_nothing(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    logger = CSVLogger("logs", flush_logs_every_n_steps=1)
    assert isinstance(logger.experiment, DummyExperiment)
    logger.log_hyperparams({"lr": 0.1})
    logger.log_metrics({"a": 1.0}, step=0)
    logger.save()
    logger.finalize("success")
    assert not os.path.exists("logs")
    monkeypatch.setenv("RANK", "0")
    logger.log_metrics({"a": 2.0}, step=0)  # rank 0 again: writes
    assert read_bytes(os.path.join(logger.log_dir, "metrics.csv")) == b"a,step\r\n2.0,0\r\n"


def test_non_integer_rank_is_named(monkeypatch):
    monkeypatch.setenv("RANK", "zero")
    with pytest.raises(ValueError, match="RANK"):
        CSVLogger("logs").save()


# --- base class ----------------------------------------------------------------------------------


def test_base_logger_defaults():
    calls = []

    class ListLogger(Logger):
        name = "list"
        version = 0

        def log_metrics(self, metrics, step=None):
            calls.append(("metrics", metrics, step))

        def log_hyperparams(self, params, *args, **kwargs):
            calls.append(("hparams", params))

        def save(self):
            calls.append("save")

    with pytest.raises(TypeError):
        Logger()
    logger = ListLogger()
    assert (logger.root_dir, logger.log_dir, logger.save_dir, logger.experiment) == (None, None, None, None)
    assert logger.group_separator == "/"
    logger.log_graph(torch.nn.Linear(1, 1))
    logger.after_save_checkpoint(object())
    logger.finalize("success")
    assert calls == ["save"]


# --- TensorBoard ---------------------------------------------------------------------------------


def test_import_does_not_need_tensorboard():
    code = (
        "import sys; sys.modules['tensorboard'] = None\n"  # makes `import tensorboard` fail
        "import fastloop.loggers as L\n"
        "L.CSVLogger('logs').save()\n"
        "try:\n    L.TensorBoardLogger('tb')\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install tensorboard" in out


def scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event_file,) = [f for f in os.listdir(log_dir) if f.startswith("events.out.tfevents")]
    acc = EventAccumulator(os.path.join(log_dir, event_file))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_and_hparams():
    pytest.importorskip("tensorboard")
    logger = TensorBoardLogger("tb", prefix="p", sub_dir="sub", flush_secs=3600)
    assert logger.log_dir == os.path.join("tb", "lightning_logs", "version_0", "sub")
    logger.log_hyperparams({"lr": 0.1, "opt": {"name": "adam"}})
    logger.log_metrics({"loss": torch.tensor(0.5), "acc": 0.25}, step=3)
    logger.log_metrics({"loss": 0.125}, step=7)
    logger.finalize("success")
    assert scalars(logger.log_dir) == {"p-hp_metric": [(0, -1.0)], "p-loss": [(3, 0.5), (7, 0.125)],
                                       "p-acc": [(3, 0.25)]}
    with open(os.path.join(logger.log_dir, "hparams.yaml")) as f:
        assert yaml.safe_load(f) == {"lr": 0.1, "opt": {"name": "adam"}}
    assert TensorBoardLogger("tb").version == 1


def test_tensorboard_without_default_hp_metric_and_explicit_version():
    pytest.importorskip("tensorboard")
    logger = TensorBoardLogger("tb", name="exp", version="run", default_hp_metric=False)
    assert logger.log_dir == os.path.join("tb", "exp", "run")
    logger.log_hyperparams({"lr": 0.1})
    logger.log_hyperparams({"lr": 0.2}, metrics=0.75)  # a bare value is named hp_metric
    logger.log_metrics({"a": 1.0}, step=0)
    logger.finalize("failed")  # not "success": no hparams.yaml, as Lightning
    assert scalars(logger.log_dir) == {"hp_metric": [(0, 0.75)], "a": [(0, 1.0)]}
    assert not os.path.exists(os.path.join(logger.log_dir, "hparams.yaml"))


def test_tensorboard_missing_package_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        TensorBoardLogger("tb")


def test_tensorboard_rank_other_than_zero_writes_nothing(monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("RANK", "1")
    logger = TensorBoardLogger("tb")
    logger.log_hyperparams({"lr": 0.1})
    logger.log_metrics({"a": 1.0}, step=0)
    logger.finalize("success")
    assert isinstance(logger.experiment, DummyExperiment)
    assert not os.path.exists("tb")
