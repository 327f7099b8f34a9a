"""Hyperparameters: ``save_hyperparameters``, their place in checkpoints, ``load_from_checkpoint``.

Semantics follow Lightning 1.9:

- ``save_hyperparameters()`` with no argument records every argument of the ``__init__`` calls
  of the object that are on the stack (a subclass's values win over its parents'), minus
  ``self`` and the ``*args``/``**kwargs`` names, plus the contents of ``**kwargs``; names as
  strings pick some of them; a single dict, ``Namespace`` or mapping is taken as the whole set.
- A checkpoint stores them as a plain dict under ``hyper_parameters`` (``datamodule_...`` for a
  DataModule) with the ``__init__`` argument name they came from under ``hparams_name``.
- ``load_from_checkpoint`` builds ``cls(**{**saved, **overrides})`` and loads the weights; like
  Lightning 1.9 it leaves the module in training mode.
"""
from __future__ import annotations

import copy
import inspect
import os
import types
import warnings
from argparse import Namespace
from collections import OrderedDict
from dataclasses import fields, is_dataclass
from typing import Any, Dict, List, MutableMapping, Optional, Sequence, Type, TypeVar, Union

import torch
from torch import nn

from fastloop.checkpoint import load_checkpoint

T = TypeVar("T")


class AttributeDict(dict):
    """A dict whose keys are also attributes: ``hp.lr`` is ``hp["lr"]``."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError as exc:
            raise AttributeError(f'Missing attribute "{key}"') from exc

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def __delattr__(self, key: str) -> None:
        try:
            del self[key]
        except KeyError as exc:
            raise AttributeError(f'Missing attribute "{key}"') from exc

    def __repr__(self) -> str:  # one aligned `"key": value` row per key, sorted, as Lightning prints it
        if not self:
            return ""
        labels = {k: f'"{k}":' for k in sorted(self.keys())}
        width = max(len(label) for label in labels.values())
        return "\n".join(f"{label:{width}s} {self[k]}" for k, label in labels.items())


class HyperparametersMixin:
    """Gives ``save_hyperparameters``, ``hparams`` and ``hparams_initial`` to a class."""

    CHECKPOINT_HYPER_PARAMS_KEY = "hyper_parameters"
    CHECKPOINT_HYPER_PARAMS_NAME = "hparams_name"
    _log_hyperparams = False  # set by save_hyperparameters(logger=...); the trainer reads it

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._log_hyperparams = False

    def save_hyperparameters(
        self,
        *args: Any,
        ignore: Optional[Union[Sequence[str], str]] = None,
        frame: Optional[types.FrameType] = None,
        logger: bool = True,
    ) -> None:
        """Record ``__init__`` arguments (all, or those named in ``args``) or one config object.

        ``ignore``: argument name(s) to leave out; ``frame``: where to start looking for the
        ``__init__`` calls (default: the caller); ``logger``: whether loggers receive them.
        """
        self._log_hyperparams = logger
        if len(args) == 1 and not isinstance(args[0], torch.Tensor) and not args[0]:
            return  # an empty container: nothing to record
        if frame is None:
            frame = inspect.currentframe().f_back  # type: ignore[union-attr]
        if is_dataclass(self):
            init_args = {f.name: getattr(self, f.name) for f in fields(self)}
        else:
            init_args = _collect_init_args(self, frame)
        del frame  # frames reference their locals: do not keep them alive

        ignored = {ignore} if isinstance(ignore, str) else {name for name in (ignore or ()) if isinstance(name, str)}
        init_args = {k: v for k, v in init_args.items() if k not in ignored}

        objects = [arg for arg in args if not isinstance(arg, str)]
        if not args:
            hp: Any = init_args
            self._hparams_name = "kwargs" if hp else None
        elif len(objects) == 1:
            hp = objects[0]
            names = [k for k, v in init_args.items() if _same(v, hp)]
            self._hparams_name = names[0] if names else None
        else:
            hp = {}
            for name in (arg for arg in args if isinstance(arg, str)):
                if name not in init_args:
                    raise ValueError(
                        f"save_hyperparameters({name!r}): {name!r} is not an argument of "
                        f"{type(self).__name__}.__init__ (found: {sorted(init_args)}) or it is in `ignore`"
                    )
                hp[name] = init_args[name]
            self._hparams_name = "kwargs"

        self._set_hparams(hp)
        self._hparams_initial = copy.deepcopy(self._hparams)

    def _set_hparams(self, hp: Any) -> None:
        if isinstance(hp, Namespace):
            hp = vars(hp)
        if isinstance(hp, dict):
            hp = AttributeDict(hp)
        elif isinstance(hp, (bool, int, float, str)):
            raise ValueError(f"save_hyperparameters({hp!r}): a single value is not a set of hyperparameters; "
                             "pass a dict, a Namespace, or argument names as strings")
        elif not isinstance(hp, MutableMapping):
            raise ValueError(f"save_hyperparameters(): unsupported config type {type(hp).__name__}; "
                             "pass a dict, a Namespace or a mutable mapping")
        if isinstance(hp, dict) and isinstance(self.hparams, dict):
            self.hparams.update(hp)  # a second call adds to the first
        else:
            self._hparams = hp

    @property
    def hparams(self) -> Union[AttributeDict, MutableMapping]:
        """The saved hyperparameters; mutable (``hparams_initial`` keeps the values as saved)."""
        if "_hparams" not in self.__dict__:
            self._hparams = AttributeDict()
        return self._hparams

    @property
    def hparams_initial(self) -> AttributeDict:
        """A copy of the hyperparameters as they were when ``save_hyperparameters`` ran."""
        if "_hparams_initial" not in self.__dict__:
            return AttributeDict()
        return copy.deepcopy(self._hparams_initial)


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # e.g. tensors of several elements
        return False


def _init_codes(obj: Any) -> Dict[types.CodeType, Any]:
    """The code object of every ``__init__`` defined along the class chain of ``obj``."""
    codes = {}
    for klass in type(obj).__mro__:
        init = klass.__dict__.get("__init__")
        code = getattr(inspect.unwrap(init), "__code__", None) if init is not None else None
        if code is not None:
            codes[code] = inspect.unwrap(init)
    return codes


def _collect_init_args(obj: Any, frame: Optional[types.FrameType]) -> Dict[str, Any]:
    """Arguments of the consecutive ``obj.__init__`` frames from ``frame`` outwards, outer winning."""
    codes = _init_codes(obj)
    collected: List[Dict[str, Any]] = []
    while frame is not None:
        init = codes.get(frame.f_code)
        if init is not None and frame.f_code.co_argcount and frame.f_locals.get(frame.f_code.co_varnames[0]) is obj:
            collected.append(_frame_args(init, frame.f_locals))
        elif collected:
            break  # past the outermost __init__ of this object
        frame = frame.f_back
    merged: Dict[str, Any] = {}
    for args in collected:
        merged.update(args)
    return merged


def _frame_args(init: Any, local_vars: Dict[str, Any]) -> Dict[str, Any]:
    """Current values of ``init``'s parameters in its frame: named ones, then ``**kwargs``' items."""
    params = list(inspect.signature(init).parameters.values())[1:]  # drop self
    args: Dict[str, Any] = {}
    extra: Dict[str, Any] = {}
    for p in params:
        if p.kind is inspect.Parameter.VAR_POSITIONAL or p.name not in local_vars:
            continue
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            extra = dict(local_vars[p.name])
        else:
            args[p.name] = local_vars[p.name]
    args.update(extra)
    return args


# ---------------------------------------------------------------------------------- checkpoints
_LOADABLE_LEAVES = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.Size, torch.device,
                    torch.dtype, torch.Tensor, nn.Parameter)


def _check_loadable(value: Any, where: str, top_key: str, owner: str) -> None:
    """Raise when ``torch.load(weights_only=True)`` could not read ``value`` back."""
    kind = type(value)
    if kind in (dict, OrderedDict):
        for k, v in value.items():
            _check_loadable(k, f"{where} key {k!r}", top_key, owner)
            _check_loadable(v, f"{where}[{k!r}]", top_key, owner)
    elif kind in (list, tuple, set):
        for i, v in enumerate(value):
            _check_loadable(v, f"{where}[{i}]", top_key, owner)
    elif kind not in _LOADABLE_LEAVES and kind not in torch.serialization.get_safe_globals():
        raise TypeError(
            f"hyperparameter {where} of {owner} is a {kind.__module__}.{kind.__qualname__}, which a checkpoint "
            "read with torch.load(weights_only=True) cannot hold (it holds tensors, numbers, str, bool, None and "
            f"lists/tuples/dicts of them); leave it out with save_hyperparameters(ignore=[{top_key!r}]) "
            "or save a value of one of those types"
        )


def _entries_for(obj: Any, name_key: str, key: str) -> Dict[str, Any]:
    hparams = getattr(obj, "hparams", None)
    if not hparams:
        return {}
    plain = dict(hparams)
    owner = type(obj).__name__
    for k, v in plain.items():
        _check_loadable(v, repr(k), str(k), owner)
    entries: Dict[str, Any] = {key: plain}
    if "_hparams_name" in getattr(obj, "__dict__", {}):
        entries = {name_key: obj._hparams_name, **entries}
    return entries


def checkpoint_entries(module: Any, datamodule: Any = None) -> Dict[str, Any]:
    """What a checkpoint stores about the hyperparameters of ``module`` and ``datamodule``.

    Keys as in Lightning 1.9: ``hparams_name``/``hyper_parameters`` and
    ``datamodule_hparams_name``/``datamodule_hyper_parameters``; absent when there are none.
    Raises ``TypeError`` naming a hyperparameter that ``weights_only`` loading could not read.
    """
    entries: Dict[str, Any] = {}
    if module is not None:
        entries.update(_entries_for(module, "hparams_name", "hyper_parameters"))
    if datamodule is not None:
        entries.update(_entries_for(datamodule, "datamodule_hparams_name", "datamodule_hyper_parameters"))
    return entries


def hyperparameters_to_log(module: Any, datamodule: Any = None) -> Optional[Dict[str, Any]]:
    """The hyperparameters loggers receive at the start of a run (None: nothing to log).

    The module's and the datamodule's ``hparams_initial`` when each asked for logging; a key both
    hold with different values is an error, as in Lightning 1.9.
    """
    log_module = bool(getattr(module, "_log_hyperparams", False))
    log_data = datamodule is not None and bool(getattr(datamodule, "_log_hyperparams", False))
    if log_module and log_data:
        ours, theirs = module.hparams_initial, datamodule.hparams_initial
        clashes = [k for k in ours.keys() & theirs.keys() if not _consistent(ours[k], theirs[k])]
        if clashes:
            raise ValueError(f"hyperparameters {sorted(clashes)} are in both the module's and the datamodule's "
                             "hparams with different values")
        return {**ours, **theirs}
    if log_module:
        return module.hparams_initial
    if log_data:
        return datamodule.hparams_initial
    return None


def _consistent(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a is b
    return _same(a, b)


def _named_device(map_location: Any) -> Optional[torch.device]:
    if isinstance(map_location, torch.device):
        return map_location
    if isinstance(map_location, (str, int)) and not isinstance(map_location, bool):
        return torch.device(map_location)
    return None  # a dict or a function remaps storages but names no single device


def load_from_checkpoint(
    cls: Type[T],
    checkpoint_path: Union[str, os.PathLike],
    map_location: Any = None,
    hparams_file: Optional[Union[str, os.PathLike]] = None,
    strict: bool = True,
    **kwargs: Any,
) -> T:
    """Build ``cls`` from the hyperparameters in a checkpoint (``kwargs`` win) and load its state.

    A module gets ``on_load_checkpoint(checkpoint)`` then ``load_state_dict(checkpoint["state_dict"],
    strict)`` and is moved to ``map_location`` when that names a device; a DataModule gets its
    ``load_state_dict`` from the trainer's ``datamodule`` entry when there is one.
    """
    if hparams_file is not None:
        raise NotImplementedError(
            f"load_from_checkpoint(hparams_file={os.fspath(hparams_file)!r}): reading hyperparameters from a "
            "separate file is not supported; they are read from the checkpoint (pass overrides as keyword arguments)"
        )
    path = os.fspath(checkpoint_path)
    device = _named_device(map_location)
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"load_from_checkpoint({path!r}, map_location={map_location!r}): CUDA is not available")
    checkpoint = load_checkpoint(path, map_location=map_location)
    key = getattr(cls, "CHECKPOINT_HYPER_PARAMS_KEY", "hyper_parameters")
    name_key = getattr(cls, "CHECKPOINT_HYPER_PARAMS_NAME", "hparams_name")
    saved = checkpoint.get(key) or {}
    checkpoint[key] = {**saved, **kwargs}  # on_load_checkpoint sees the values the object was built with

    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # type: ignore[misc]
    takes_any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    names = [p.name for p in params
             if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    loaded: Dict[str, Any] = dict(checkpoint[key])
    args_name = checkpoint.get(name_key)
    if args_name and args_name in names:  # saved from one config argument: pass it back whole
        loaded = {args_name: loaded}
    init_kwargs = {**loaded, **kwargs}
    if not takes_any_keyword:
        init_kwargs = {k: v for k, v in init_kwargs.items() if k in names}

    missing = [p.name for p in params if p.default is inspect.Parameter.empty and p.name not in init_kwargs
               and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    if missing:
        where = f"{cls.__name__}.load_from_checkpoint({path!r})"
        if not saved:
            raise TypeError(f"{where}: {cls.__name__}.__init__ needs {missing} but the checkpoint holds no "
                            "hyperparameters; call save_hyperparameters() in __init__ "
                            "or pass them as keyword arguments")
        raise TypeError(f"{where}: {cls.__name__}.__init__ needs {missing}, which neither the checkpoint's "
                        f"hyperparameters {list(saved)} nor the keyword arguments give; "
                        "pass them as keyword arguments")

    obj = cls(**init_kwargs)
    if not isinstance(obj, nn.Module):  # a DataModule
        for key in (type(obj).__qualname__, "datamodule"):  # Lightning's key, then fastloop's old one
            if key in checkpoint:
                obj.load_state_dict(checkpoint[key])  # type: ignore[attr-defined]
                break
        return obj

    obj.on_load_checkpoint(checkpoint)  # type: ignore[attr-defined]
    try:
        keys = obj.load_state_dict(checkpoint["state_dict"], strict=strict)
    except RuntimeError as exc:
        raise RuntimeError(f"{path}: the checkpoint's weights do not fit {cls.__name__} ({exc}); "
                           "pass strict=False to load the matching ones") from exc
    if not strict and keys.missing_keys:
        warnings.warn(f"{path}: {cls.__name__} has weights the checkpoint lacks: {keys.missing_keys}")
    if not strict and keys.unexpected_keys:
        warnings.warn(f"{path}: the checkpoint has weights {cls.__name__} lacks: {keys.unexpected_keys}")
    if device is not None:
        obj.to(device)
    return obj
