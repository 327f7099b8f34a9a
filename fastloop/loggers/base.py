"""The Logger base class, and the small pieces the file-writing loggers share: run-directory
versioning, argument checks, atomic text writes and the ``hparams.yaml`` format."""
from __future__ import annotations

import logging
import os
import uuid
from abc import ABC, abstractmethod
from argparse import Namespace
from enum import Enum
from typing import IO, Any, Callable, Dict, Mapping, Optional, Union

import numpy as np
import torch
import yaml

log = logging.getLogger(__name__)

HPARAMS_FILE = "hparams.yaml"


class Logger(ABC):
    """Base class of experiment loggers, with Lightning 1.x's interface.

    The trainer calls ``log_hyperparams`` once at the start of a run, ``log_metrics(metrics, step)``
    at each logging point, ``save()`` to persist what was logged and ``finalize(status)`` at the end.
    Subclasses write only on global rank 0 (see ``fastloop.loggers._rank``).
    """

    @property
    @abstractmethod
    def name(self) -> Optional[str]:
        """The experiment name."""

    @property
    @abstractmethod
    def version(self) -> Optional[Union[int, str]]:
        """The experiment version."""

    @property
    def root_dir(self) -> Optional[str]:
        """Directory holding every version of the experiment, or None for loggers that write no files."""
        return None

    @property
    def log_dir(self) -> Optional[str]:
        """Directory of this run's version, or None for loggers that write no files."""
        return None

    @property
    def save_dir(self) -> Optional[str]:
        """The directory the logger was told to save under, or None for loggers that write no files."""
        return None

    @property
    def experiment(self) -> Any:
        """The object doing the writing (a SummaryWriter, a CSV writer...); None by default."""
        return getattr(self, "_experiment", None)

    @experiment.setter
    def experiment(self, value: Any) -> None:  # lets a subclass assign ``self.experiment = ...``
        self._experiment = value

    @property
    def group_separator(self) -> str:
        """Separator a logger may use to group metric names into sections."""
        return "/"

    @abstractmethod
    def log_metrics(self, metrics: Dict[str, float], step: Optional[int] = None) -> None:
        """Record ``metrics`` (name -> number) at ``step``."""

    @abstractmethod
    def log_hyperparams(self, params: Union[Dict[str, Any], Namespace], *args: Any, **kwargs: Any) -> None:
        """Record hyperparameters (a dict, an ``argparse.Namespace`` or an AttributeDict)."""

    def log_graph(self, model: torch.nn.Module, input_array: Optional[torch.Tensor] = None) -> None:
        """Record the model's graph; loggers that cannot draw one ignore the call."""

    def save(self) -> None:
        """Persist what has been logged so far."""

    def finalize(self, status: str) -> None:
        """End the run (``status``: "success", "failed", ...): by default, save."""
        self.save()

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        """Called after a ModelCheckpoint callback saved a checkpoint."""


# ---------------------------------------------------------------------------------------------
# Helpers shared by CSVLogger and TensorBoardLogger



class VersionedLogger(Logger):
    """A logger writing under ``<save_dir>/<name>/<version>/``: the directory rules shared by
    ``CSVLogger`` and ``TensorBoardLogger``."""

    def _init_version_dirs(self, save_dir: Union[str, "os.PathLike[str]"], name: Optional[str],
                           version: Optional[Union[int, str]]) -> None:
        self._save_dir = os.fspath(save_dir)
        self._name = name or ""
        self._version = check_version(version)

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> Union[int, str]:
        """The version given, else the next free one under ``root_dir`` (decided on first use)."""
        if self._version is None:
            self._version = next_version(self.root_dir)
        return self._version

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def root_dir(self) -> str:
        """``<save_dir>/<name>``: the parent of every version's directory."""
        return os.path.join(self.save_dir, self.name)


def convert_params(params: Any) -> Dict[str, Any]:
    """Hyperparameters as a plain dict: a Namespace's attributes, a mapping's items, None -> {}."""
    if params is None:
        return {}
    if isinstance(params, Namespace):
        return dict(vars(params))
    if isinstance(params, Mapping):
        return dict(params)
    raise TypeError(
        f"hyperparameters must be a dict, an argparse.Namespace or an AttributeDict, got {type(params).__name__}"
    )


def add_prefix(metrics: Mapping[str, Any], prefix: str, separator: str) -> Mapping[str, Any]:
    """``{k: v}`` -> ``{f"{prefix}{separator}{k}": v}`` when a prefix is set."""
    if not prefix:
        return metrics
    return {f"{prefix}{separator}{k}": v for k, v in metrics.items()}


def check_version(version: Any) -> Optional[Union[int, str]]:
    """A logger's ``version`` argument: None (next free), an int (``version_<int>``) or a str (the dir name)."""
    if version is None or isinstance(version, str) or (isinstance(version, int) and not isinstance(version, bool)):
        return version
    raise TypeError(f"logger `version` must be None, an int or a str, got {version!r} ({type(version).__name__})")


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    return value


def version_dir_name(version: Union[int, str]) -> str:
    """The run directory name: a str version is used as is, an int N becomes ``version_N``."""
    return version if isinstance(version, str) else f"version_{version}"


def next_version(directory: str) -> int:
    """One more than the highest ``version_<N>`` sub-directory of ``directory`` (0 when there is none)."""
    if not os.path.isdir(directory):
        log.debug("Missing logger folder: %s", directory)
        return 0
    versions = []
    for entry in os.listdir(directory):
        number = entry[len("version_"):]
        if entry.startswith("version_") and number.isdigit() and os.path.isdir(os.path.join(directory, entry)):
            versions.append(int(number))
    return max(versions) + 1 if versions else 0


def atomic_write_text(path: str, write: Callable[[IO[str]], None]) -> None:
    """Write a text file so that ``path`` is always either the previous file or the complete new one.

    ``write(f)`` fills a temporary file in the same directory (opened with ``newline=""``: no line
    ending translation), which is then ``os.replace``d over ``path``. The directory must exist. On
    any error the temporary file is removed and ``path`` is left untouched.

    No fsync: a killed process cannot leave a partial file (the rename is atomic and the data is
    in the page cache); only a power loss could lose the latest rows. An fsync cost ~2.4 ms here,
    which at one CSV flush per 100 steps was ~7 % of a 340 us compiled step (checkpoints, which
    must survive a power loss, are fsynced by ``fastloop.checkpoint.atomic_save``).
    """
    directory, base = os.path.split(os.path.abspath(path))
    # open(..., "x") rather than mkstemp: the file gets the usual umask permissions, not 0600
    tmp = os.path.join(directory, f".{base}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8", newline="") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _yaml_key(key: Any) -> Any:
    return key if isinstance(key, (bool, int, float, str)) or key is None else str(key)


def yaml_plain(value: Any) -> Any:
    """``value`` made of YAML's plain types only, so that ``yaml.safe_load`` reads the file back.

    Enums become their name (as Lightning writes them), numpy scalars their Python value, tuples
    lists, Namespaces and mappings dicts; any other object its ``repr`` string.
    """
    if isinstance(value, Enum):
        return value.name
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, np.generic) and value.ndim == 0:  # numpy scalars: np.float32(0.5) -> 0.5
        return value.item()
    for plain in (bool, int, float, str):  # other subclasses of the plain types
        if isinstance(value, plain):
            return plain(value)
    if isinstance(value, Namespace):
        value = vars(value)
    if isinstance(value, Mapping):
        return {_yaml_key(k): yaml_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [yaml_plain(v) for v in value]
    return repr(value)


def save_hparams_to_yaml(path: str, hparams: Any) -> None:
    """Write ``hparams`` to ``path`` (atomically) as Lightning 1.9.5 writes plain values: PyYAML's
    block style with sorted keys; values YAML has no plain form for are written as their repr."""
    data = yaml_plain(convert_params(hparams))
    atomic_write_text(path, lambda f: yaml.safe_dump(data, f))
