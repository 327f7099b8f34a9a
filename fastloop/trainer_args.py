"""Lightning 1.x ``Trainer`` arguments that fastloop maps onto its own configuration, and the
ones it does not support.

A ported script passes arguments fastloop has no use for (``profiler=None``, ``gpus=0``...).
Those given at Lightning's default value change nothing and are accepted; any other value is
an error that names the argument, never silently ignored. ``without_shuffling`` gives the
in-order loaders ``overfit_batches`` asks for.
"""
from __future__ import annotations

import copy
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

# Lightning 1.9 Trainer arguments fastloop does not implement, with the default value that
# means "feature off" there (so passing it explicitly is harmless).
UNSUPPORTED_WITH_DEFAULT: Dict[str, Any] = {
    "plugins": None,
    "profiler": None,
    "max_time": None,
    "gpus": None,
    "tpu_cores": None,
    "ipus": None,
    "auto_select_gpus": None,
    "auto_lr_find": False,
    "auto_scale_batch_size": False,
    "track_grad_norm": -1,
    "sync_batchnorm": False,
    "replace_sampler_ddp": True,
    "move_metrics_to_cpu": False,
    "multiple_trainloader_mode": "max_size_cycle",
    "inference_mode": True,
    "amp_backend": None,
    "amp_level": None,
    "resume_from_checkpoint": None,
    "process_position": 0,
    "log_gpu_memory": None,
    "weights_save_path": None,
    "flush_logs_every_n_steps": None,
    "checkpoint_callback": None,
    "stochastic_weight_avg": False,
    "terminate_on_nan": None,
    "prepare_data_per_node": None,
    "reload_dataloaders_every_epoch": False,
}
# What to do instead, where there is something to say.
_ADVICE = {
    "gpus": "use accelerator='gpu', devices=1",
    "resume_from_checkpoint": "pass ckpt_path= to trainer.fit()",
    "max_time": "use max_epochs or max_steps, or a callback that sets trainer.should_stop",
    "terminate_on_nan": ("use Trainer(nonfinite='raise') (the default: a non-finite loss or gradient raises "
                         "before the optimizer step), nonfinite='skip' to skip such steps, or 'ignore'"),
    "stochastic_weight_avg": "use torch.optim.swa_utils in your module",
    "reload_dataloaders_every_epoch": "use reload_dataloaders_every_n_epochs=1",
}
_PRECISIONS = {"32": "32", "32-true": "32", "16": "16-mixed", "16-mixed": "16-mixed",
               "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed"}


def check_unsupported(arguments: Dict[str, Any]) -> None:
    """Raise for any argument fastloop does not know, or knows but does not implement."""
    for name, value in arguments.items():
        if name not in UNSUPPORTED_WITH_DEFAULT:
            raise TypeError(f"Trainer() got an unexpected keyword argument {name!r}")
        default = UNSUPPORTED_WITH_DEFAULT[name]
        if value is None or value == default:
            continue
        if name == "gpus" and value in (0, [], "0"):
            continue
        advice = _ADVICE.get(name)
        raise ValueError(
            f"Trainer({name}={value!r}) is not supported by fastloop"
            + (f": {advice}" if advice else f"; leave it at Lightning's default ({default!r})")
        )


def normalize_precision(precision: Union[int, str]) -> str:
    """Lightning 1.x spellings (32, 16, "bf16") to fastloop's ("32", "16-mixed", "bf16-mixed")."""
    key = str(precision)
    if key not in _PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; use 32, 16 / '16-mixed' or 'bf16' / 'bf16-mixed'")
    return _PRECISIONS[key]


@dataclass(frozen=True)
class DeviceRequest:
    """``Trainer(devices=...)`` parsed: processes per node, and which GPUs when listed."""

    count: Optional[int]  # None: "auto" (torchrun's LOCAL_WORLD_SIZE under torchrun, else 1)
    ids: Optional[Tuple[int, ...]] = None  # CUDA device indices given as a list, one per local rank


def parse_devices(devices: Any, accelerator: str) -> DeviceRequest:
    """``None``/``"auto"``, an int or digit string (processes per node: on a CPU, ``devices=2``
    means two processes), ``-1`` (every GPU), or a list of GPU indices (``[0, 1]``, ``"0,1"``)."""
    if devices is None or devices == "auto":
        return DeviceRequest(None)
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    shown = f"Trainer(devices={devices!r})"
    if isinstance(devices, str):
        text = devices.strip()
        if "," in text:
            devices = [int(d) for d in text.split(",") if d.strip().lstrip("-").isdigit()]
        elif text.lstrip("-").isdigit():
            devices = int(text)
        else:
            raise ValueError(f"{shown}: expected 'auto', a number of devices or a list of GPU indices")
    if isinstance(devices, (list, tuple)):
        ids = list(devices)
        if not ids or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in ids) or len(set(ids)) < len(ids):
            raise ValueError(f"{shown}: a list of devices must hold distinct device indices >= 0")
        if gpu:
            missing = [d for d in ids if d >= torch.cuda.device_count()]
            if missing:
                raise ValueError(f"{shown}: there is no CUDA device {missing[0]}")
            return DeviceRequest(len(ids), tuple(ids))
        return DeviceRequest(len(ids))
    if isinstance(devices, bool) or not isinstance(devices, int):
        raise ValueError(f"{shown}: expected 'auto', an int or a list of GPU indices, got {type(devices).__name__}")
    if devices == -1:
        if not gpu or torch.cuda.device_count() == 0:
            raise ValueError(f"{shown} means every GPU, and there is none; on a CPU pass the number of processes")
        return DeviceRequest(torch.cuda.device_count())
    if devices < 1:
        raise ValueError(f"{shown}: the number of devices must be >= 1 (or -1 for every GPU)")
    return DeviceRequest(devices)


@dataclass(frozen=True)
class DebugFlags:
    """``fast_dev_run`` and ``overfit_batches`` resolved to the limits they imply."""

    fast_dev_run: int  # batches per stage, 0 when off
    overfit_batches: Union[int, float]

    @staticmethod
    def parse(fast_dev_run: Union[int, bool], overfit_batches: Union[int, float]) -> "DebugFlags":
        if isinstance(fast_dev_run, bool):
            runs = int(fast_dev_run)
        elif isinstance(fast_dev_run, int) and fast_dev_run >= 0:
            runs = fast_dev_run
        else:
            raise ValueError(f"fast_dev_run must be a bool or an int >= 0, got {fast_dev_run!r}")
        if isinstance(overfit_batches, bool) or not isinstance(overfit_batches, (int, float)) or overfit_batches < 0:
            raise ValueError(f"overfit_batches must be an int >= 0 or a float in [0, 1], got {overfit_batches!r}")
        if isinstance(overfit_batches, float) and overfit_batches > 1.0:
            raise ValueError(f"overfit_batches={overfit_batches} is a fraction above 1.0; pass an int to count batches")
        return DebugFlags(runs, overfit_batches)

    def apply(self, args: Dict[str, Any]) -> Dict[str, Any]:
        """The Trainer arguments changed as Lightning 1.9 changes them for these flags."""
        args = dict(args)
        overfit = self.overfit_batches > 0
        if self.fast_dev_run:
            n = self.fast_dev_run
            if not overfit:
                args["limit_train_batches"] = n
                args["limit_val_batches"] = n
            args["limit_test_batches"] = n
            args["limit_predict_batches"] = n
            args["max_steps"] = n
            args["max_epochs"] = 1
            args["num_sanity_val_steps"] = 0
            args["val_check_interval"] = 1.0
            args["check_val_every_n_epoch"] = 1
        if overfit:
            args["limit_train_batches"] = self.overfit_batches
            args["limit_val_batches"] = self.overfit_batches
        return args


def estimated_stepping_batches(max_epochs: Optional[int], max_steps: int, batches_per_epoch: Union[int, float],
                               accumulate_grad_batches: int) -> Union[int, float]:
    """Optimizer steps a fit will take, as Lightning 1.9 estimates them."""
    if max_epochs in (None, -1):
        return math.inf if max_steps == -1 else max_steps
    if batches_per_epoch == math.inf:
        return max_steps
    steps = math.ceil(batches_per_epoch / accumulate_grad_batches) * max(max_epochs, 1)
    return steps if max_steps == -1 else min(steps, max_steps)


def without_shuffling(loader: Any, stage: str) -> Any:
    """``loader`` reading its data in order, for ``overfit_batches`` (Lightning 1.9 turns shuffling
    off with a warning, so that the same few batches come every epoch).

    A ``DataLoader`` with a ``RandomSampler`` is rebuilt with a ``SequentialSampler`` (the user's
    loader is left as it is); a ``TensorLoader`` (or another loader with a ``shuffle`` flag) is
    copied with ``shuffle=False``. Any other loader is returned unchanged.
    """
    if isinstance(loader, DataLoader):
        if not isinstance(loader.sampler, RandomSampler):
            return loader
        if type(loader) is not DataLoader or loader.batch_size is None:
            # A subclass or a custom batch sampler: rebuilding could lose what it adds.
            warnings.warn(f"overfit_batches: the {stage} dataloader shuffles and cannot be rebuilt without "
                          "shuffling; pass one with shuffle=False", UserWarning, stacklevel=2)
            return loader
        _warn_shuffling_off(stage)
        extra = dict(prefetch_factor=loader.prefetch_factor) if loader.num_workers > 0 else {}
        return DataLoader(
            loader.dataset, batch_size=loader.batch_size, sampler=SequentialSampler(loader.dataset),
            num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
            drop_last=loader.drop_last, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
            persistent_workers=loader.persistent_workers, **extra,
        )
    if getattr(loader, "shuffle", False) is True:
        _warn_shuffling_off(stage)
        unshuffled = copy.copy(loader)
        unshuffled.shuffle = False
        return unshuffled
    return loader


def _warn_shuffling_off(stage: str) -> None:
    warnings.warn(f"You requested to overfit but enabled {stage} dataloader shuffling. "
                  f"We are turning off the {stage} dataloader shuffling for you.", UserWarning, stacklevel=3)


def set_determinism(deterministic: Optional[Union[bool, str]], benchmark: Optional[bool]) -> None:
    """``deterministic``: torch's deterministic algorithms ("warn": warn instead of raising);
    ``benchmark``: cuDNN autotuning (off by default, and always off when deterministic)."""
    if deterministic not in (None, True, False, "warn"):
        raise ValueError(f"deterministic must be None, True, False or 'warn', got {deterministic!r}")
    if deterministic and benchmark:
        raise ValueError("Trainer(deterministic=True, benchmark=True): cuDNN autotuning is not deterministic")
    if deterministic is not None:
        torch.use_deterministic_algorithms(bool(deterministic), warn_only=deterministic == "warn")
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
    torch.backends.cudnn.benchmark = bool(benchmark) if benchmark is not None else False
