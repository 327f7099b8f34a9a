"""CSVLogger: metrics to ``metrics.csv`` and hyperparameters to ``hparams.yaml``, in the files and
layout Lightning 1.9.5's CSVLogger writes (``<save_dir>/<name>/version_<N>/``)."""
from __future__ import annotations

import csv
import os
import warnings
from argparse import Namespace
from typing import Any, Dict, List, Optional, Union

import torch

from fastloop.loggers._rank import rank_zero_experiment, rank_zero_only
from fastloop.loggers.base import (
    HPARAMS_FILE,
    VersionedLogger,
    add_prefix,
    atomic_write_text,
    check_positive_int,
    convert_params,
    save_hparams_to_yaml,
    version_dir_name,
    yaml_plain,
)


class ExperimentWriter:
    """Keeps every logged row in memory and rewrites ``metrics.csv`` and ``hparams.yaml`` on ``save()``.

    The CSV header is the union of all rows' keys in order of first appearance (each row's own keys,
    then ``step``); a row lacking a key has an empty cell there. Lines end with ``\\r\\n`` (the csv
    module's default, as Lightning's file).
    """

    NAME_METRICS_FILE = "metrics.csv"
    NAME_HPARAMS_FILE = HPARAMS_FILE

    def __init__(self, log_dir: str) -> None:
        self.hparams: Dict[str, Any] = {}
        self.metrics: List[Dict[str, Any]] = []
        self.log_dir = log_dir
        if os.path.isdir(log_dir) and os.listdir(log_dir):
            warnings.warn(
                f"Experiment logs directory {log_dir} exists and is not empty. Previous log files in this "
                "directory will be deleted when the new ones are saved!"
            )
        os.makedirs(log_dir, exist_ok=True)
        self.metrics_file_path = os.path.join(log_dir, self.NAME_METRICS_FILE)
        self._hparams_on_disk: Optional[Dict[str, Any]] = None  # what the files hold now
        self._rows_on_disk = 0

    def log_hparams(self, params: Dict[str, Any]) -> None:
        """Merge ``params`` into the hyperparameters written on the next ``save()``."""
        self.hparams.update(params)

    def log_metrics(self, metrics_dict: Dict[str, Any], step: Optional[int] = None) -> None:
        """Append one row; ``step`` defaults to the row's index."""
        if step is None:
            step = len(self.metrics)
        # host sync: a tensor value is read here, at a logging point (the trainer passes floats)
        row = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in metrics_dict.items()}
        row["step"] = step
        self.metrics.append(row)

    def save(self) -> None:
        """Rewrite ``hparams.yaml`` and (once a row was logged) ``metrics.csv``, each atomically.

        A file whose content would not change is left alone (the trainer saves after every
        logging point, and each rewrite costs an fsync).
        """
        hparams = yaml_plain(self.hparams)
        if hparams != self._hparams_on_disk:
            save_hparams_to_yaml(os.path.join(self.log_dir, self.NAME_HPARAMS_FILE), hparams)
            self._hparams_on_disk = hparams
        if not self.metrics or len(self.metrics) == self._rows_on_disk:
            return
        columns = list({key: None for row in self.metrics for key in row})
        rows = self.metrics

        def write(f: Any) -> None:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

        atomic_write_text(self.metrics_file_path, write)
        self._rows_on_disk = len(rows)


class CSVLogger(VersionedLogger):
    """Log to ``<save_dir>/<name>/<version>/`` as ``metrics.csv`` and ``hparams.yaml``.

    Args:
        save_dir: directory holding the experiments.
        name: experiment name (sub-directory of ``save_dir``); None or "" writes versions
            directly under ``save_dir``.
        version: None picks the next free ``version_<N>``; an int N gives ``version_N``; a str is
            the directory name itself.
        prefix: put before every metric name, joined with ``-``.
        flush_logs_every_n_steps: ``metrics.csv`` is rewritten when ``(step + 1)`` is a multiple of
            this (for a call without a step: the row count), besides on ``save()``/``finalize()``.
    """

    LOGGER_JOIN_CHAR = "-"

    def __init__(
        self,
        save_dir: Union[str, "os.PathLike[str]"],
        name: Optional[str] = "lightning_logs",
        version: Optional[Union[int, str]] = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
    ) -> None:
        super().__init__()
        self._init_version_dirs(save_dir, name, version)
        self._prefix = prefix
        self._flush_logs_every_n_steps = check_positive_int("flush_logs_every_n_steps", flush_logs_every_n_steps)
        self._experiment: Optional[ExperimentWriter] = None


    @property
    def log_dir(self) -> str:
        """``<root_dir>/version_<N>``, or ``<root_dir>/<version>`` for a str version."""
        return os.path.join(self.root_dir, version_dir_name(self.version))

    @property  # type: ignore[override]
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        """The ExperimentWriter, created (with its directory) on first use; a no-op object on ranks != 0."""
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ExperimentWriter(self.log_dir)
        return self._experiment

    @rank_zero_only
    def log_hyperparams(self, params: Union[Dict[str, Any], Namespace], *args: Any, **kwargs: Any) -> None:
        self.experiment.log_hparams(convert_params(params))

    @rank_zero_only
    def log_metrics(self, metrics: Dict[str, Any], step: Optional[int] = None) -> None:
        writer = self.experiment
        writer.log_metrics(add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR), step)
        if (writer.metrics[-1]["step"] + 1) % self._flush_logs_every_n_steps == 0:
            writer.save()

    @rank_zero_only
    def save(self) -> None:
        self.experiment.save()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._experiment is not None:  # nothing was logged: write nothing
            self.save()
