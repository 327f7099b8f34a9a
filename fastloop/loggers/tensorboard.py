"""TensorBoardLogger: scalars and hyperparameters in TensorBoard event files, laid out as
Lightning 1.9.5 lays them out (``<save_dir>/<name>/version_<N>[/<sub_dir>]``).

Needs the ``tensorboard`` package (``pip install tensorboard``), imported only when a logger is
built or its writer created, so ``import fastloop.loggers`` works without it.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from argparse import Namespace
from typing import Any, Dict, Mapping, MutableMapping, Optional, Union

import numpy as np
import torch

from fastloop.loggers._rank import rank_zero_experiment, rank_zero_only
from fastloop.loggers.base import (
    HPARAMS_FILE,
    VersionedLogger,
    add_prefix,
    convert_params,
    save_hparams_to_yaml,
    version_dir_name,
)


def _flatten(params: Mapping[Any, Any], parent: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}`` (Namespaces are flattened like dicts)."""
    flat: Dict[str, Any] = {}
    for key, value in params.items():
        name = f"{parent}/{key}" if parent else str(key)
        if isinstance(value, Namespace):
            value = vars(value)
        if isinstance(value, MutableMapping):
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


def _hparam_value(value: Any) -> Any:
    """A value TensorBoard's hparams plugin accepts: numpy scalars unwrapped, tensors of more than
    one dimension and any non-primitive as their ``str``."""
    if isinstance(value, (np.bool_, np.integer, np.floating)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return str(value) if value.ndim > 1 else value
    return value if type(value) in (bool, int, float, str) else str(value)


class TensorBoardLogger(VersionedLogger):
    """Log to TensorBoard event files in ``<save_dir>/<name>/<version>[/<sub_dir>]``.

    Args:
        save_dir: directory holding the experiments.
        name: experiment name; None or "" writes versions directly under ``save_dir``.
        version: None picks the next free ``version_<N>``; an int N gives ``version_N``; a str is
            the directory name itself.
        log_graph: let ``log_graph(model)`` draw the model (needs ``model.example_input_array``
            or an ``input_array``).
        default_hp_metric: ``log_hyperparams`` without metrics logs ``hp_metric = -1`` at step 0,
            which makes TensorBoard's HPARAMS tab show the run.
        prefix: put before every metric name, joined with ``-``.
        sub_dir: an extra directory level under the version's.
        **kwargs: passed to ``torch.utils.tensorboard.SummaryWriter`` (``max_queue``, ``flush_secs``...).
    """

    NAME_HPARAMS_FILE = HPARAMS_FILE
    LOGGER_JOIN_CHAR = "-"

    def __init__(
        self,
        save_dir: Union[str, "os.PathLike[str]"],
        name: Optional[str] = "lightning_logs",
        version: Optional[Union[int, str]] = None,
        log_graph: bool = False,
        default_hp_metric: bool = True,
        prefix: str = "",
        sub_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
        **kwargs: Any,
    ) -> None:
        if importlib.util.find_spec("tensorboard") is None:
            raise ImportError("TensorBoardLogger needs the `tensorboard` package: `pip install tensorboard`")
        super().__init__()
        self._init_version_dirs(save_dir, name, version)
        self._log_graph = log_graph
        self._default_hp_metric = default_hp_metric
        self._prefix = prefix
        self._sub_dir = None if sub_dir is None else os.fspath(sub_dir)
        self._kwargs = kwargs
        self._experiment: Any = None
        self.hparams: Dict[str, Any] = {}


    @property
    def sub_dir(self) -> Optional[str]:
        return self._sub_dir

    @property
    def log_dir(self) -> str:
        """``<root_dir>/<version dir>[/<sub_dir>]``, with ``~`` and environment variables expanded."""
        log_dir = os.path.join(self.root_dir, version_dir_name(self.version))
        if self._sub_dir is not None:
            log_dir = os.path.join(log_dir, self._sub_dir)
        return os.path.expanduser(os.path.expandvars(log_dir))

    @property  # type: ignore[override]
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The ``torch.utils.tensorboard.SummaryWriter``, created in ``log_dir`` on first use;
        a no-op object on ranks != 0."""
        if self._experiment is None:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = SummaryWriter(log_dir=self.log_dir, **self._kwargs)
        return self._experiment

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        for key, value in add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR).items():
            if isinstance(value, torch.Tensor):
                value = value.item()  # host sync: a logging point
            if isinstance(value, dict):
                self.experiment.add_scalars(key, value, step)
                continue
            try:
                self.experiment.add_scalar(key, value, step)
            except Exception as exc:
                raise ValueError(
                    f"TensorBoardLogger cannot log metric {key!r} = {value!r}: log a number, a 0-dim tensor "
                    "or a dict of numbers"
                ) from exc

    @rank_zero_only
    def log_hyperparams(
        self, params: Union[Dict[str, Any], Namespace], metrics: Optional[Any] = None, *args: Any, **kwargs: Any
    ) -> None:
        """Keep ``params`` for ``hparams.yaml`` and write them to TensorBoard's HPARAMS tab, with
        ``metrics`` (a dict, or one value named ``hp_metric``; by default ``hp_metric = -1``)."""
        params = convert_params(params)
        self.hparams.update(params)
        flat = {k: _hparam_value(v) for k, v in _flatten(params).items()}
        if metrics is None:
            metrics = {"hp_metric": -1} if self._default_hp_metric else None
        elif not isinstance(metrics, dict):
            metrics = {"hp_metric": metrics}
        if not metrics:
            return
        self.log_metrics(metrics, 0)
        from torch.utils.tensorboard.summary import hparams

        writer = self.experiment._get_file_writer()
        for summary in hparams(flat, metrics):
            writer.add_summary(summary)

    @rank_zero_only
    def log_graph(self, model: torch.nn.Module, input_array: Optional[Any] = None) -> None:
        if not self._log_graph:
            return
        if input_array is None:
            input_array = getattr(model, "example_input_array", None)
        if input_array is None:
            warnings.warn(
                "Could not log the computational graph to TensorBoard: `model.example_input_array` is not set "
                "and no `input_array` was given."
            )
            return
        if not isinstance(input_array, (torch.Tensor, tuple)):
            warnings.warn(
                f"Could not log the computational graph to TensorBoard: the input has type "
                f"{type(input_array).__name__}; give a tensor, or a tuple of `forward()`'s positional arguments."
            )
            return
        transfer = getattr(model, "transfer_batch_to_device", None)
        device = getattr(model, "device", None)
        if callable(transfer) and isinstance(device, torch.device):
            input_array = transfer(input_array, device, 0)
        self.experiment.add_graph(model, input_array)

    @rank_zero_only
    def save(self) -> None:
        """Flush the event file; write ``hparams.yaml`` once (if it does not exist yet)."""
        self.experiment.flush()
        hparams_file = os.path.join(self.log_dir, self.NAME_HPARAMS_FILE)
        if os.path.isdir(self.log_dir) and not os.path.isfile(hparams_file):
            save_hparams_to_yaml(hparams_file, self.hparams)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Close the event file; on "success" also write ``hparams.yaml`` (as Lightning does)."""
        if self._experiment is not None:
            self._experiment.flush()
            self._experiment.close()
        if status == "success":
            self.save()

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state["_experiment"] = None  # a SummaryWriter holds threads and open files
        return state
