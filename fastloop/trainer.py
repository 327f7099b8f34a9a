"""``Trainer``: the facade. It owns the four top-level loops, configures a run, and saves and
restores checkpoints; the loops do the work.

``fit/validate/test/predict`` each run whatever loop is assigned to ``fit_loop``,
``validate_loop``, ``test_loop`` or ``predict_loop``.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch.optim import Optimizer

from fastloop import __version__
from fastloop.callback import Callback
from fastloop.checkpoint import load_checkpoint
from fastloop.checkpoint_connector import LOOP_KEYS as _LOOP_KEYS
from fastloop.checkpoint_connector import CheckpointConnector, has_own_state
from fastloop.config import (
    CompileConfig, Limits, OptimizationConfig, RunConfig, ValidationSchedule, resolve_mode,
)
from fastloop.data.connector import DataConnector, StageData, device_of
from fastloop.step.precision import make_grad_scaler
from fastloop.datamodule import DataModule
from fastloop.hooks import HookDispatcher
from fastloop.loops import EvaluationLoop, FitLoop, Loop, PredictionLoop, TrainingEpochLoop
from fastloop.module import Module
from fastloop.optim import LoopOptimizer, SchedulerConfig, active_optimizer_indices, parse_optimizers
from fastloop.logger_connector import LoggerArg, LoggerConnector, configure_loggers
from fastloop.results import MetricLogger
from fastloop.seed import restore_rng_states
from fastloop.state import TrainerState
from fastloop.callbacks.defaults import as_callback_list, with_default_callbacks
from fastloop.distributed.errors import tag_exception
from fastloop.distributed.strategy import Strategy, select_strategy, sync_logger_versions
from fastloop.trainer_args import DebugFlags, check_unsupported, normalize_precision, parse_devices, set_determinism
from fastloop.trainer_attributes import TrainerAttributes


def iter_loops(loop: Loop, prefix: str) -> Iterator[Tuple[str, Loop]]:
    """``loop`` and every loop below it, parents first, with dotted paths."""
    yield prefix, loop
    for name, child in loop.children():
        yield from iter_loops(child, f"{prefix}.{name}")


def _only_datamodule(given: Optional[DataModule], positional: DataModule, fn: str) -> DataModule:
    if given is not None:
        raise ValueError(f"trainer.{fn}() got a DataModule both as a dataloader and as datamodule=; pass one")
    return positional


class Trainer(TrainerAttributes):
    """Runs a ``Module`` through fit/validate/test/predict loops."""

    def __init__(
        self,
        *,
        logger: LoggerArg = True,
        enable_checkpointing: bool = True,
        callbacks: Optional[Union[Callback, Sequence[Callback]]] = None,
        default_root_dir: Optional[str] = None,
        gradient_clip_val: Optional[float] = None,
        gradient_clip_algorithm: Optional[str] = None,
        devices: Any = None,
        accelerator: Optional[str] = "auto",
        enable_progress_bar: bool = True,
        overfit_batches: Union[int, float] = 0.0,
        check_val_every_n_epoch: Optional[int] = 1,
        fast_dev_run: Union[int, bool] = False,
        accumulate_grad_batches: Optional[int] = None,
        max_epochs: Optional[int] = None,
        min_epochs: Optional[int] = None,
        max_steps: int = -1,
        min_steps: Optional[int] = None,
        limit_train_batches: Optional[Union[int, float]] = None,
        limit_val_batches: Optional[Union[int, float]] = None,
        limit_test_batches: Optional[Union[int, float]] = None,
        limit_predict_batches: Optional[Union[int, float]] = None,
        val_check_interval: Optional[Union[int, float]] = None,
        log_every_n_steps: int = 50,
        precision: Union[int, str] = 32,
        enable_model_summary: bool = True,
        num_sanity_val_steps: int = 2,
        deterministic: Optional[Union[bool, str]] = None,
        benchmark: Optional[bool] = None,
        reload_dataloaders_every_n_epochs: int = 0,
        detect_anomaly: bool = False,
        mode: str = "auto",
        compile_config: Optional[CompileConfig] = None,
        nonfinite: str = "raise",  # "raise" | "skip" | "ignore": see fastloop/step/nonfinite.py
        use_distributed_sampler: bool = True,  # see fastloop/distributed/sampler.py
        strategy: Union[str, Strategy, None] = None,
        num_nodes: int = 1,
        **lightning_only: Any,
    ) -> None:
        from fastloop.distributed.sampler import resolve_use_distributed_sampler

        # Also takes Lightning 1.x's replace_sampler_ddp out of lightning_only.
        self.use_distributed_sampler = resolve_use_distributed_sampler(use_distributed_sampler, lightning_only)
        check_unsupported(lightning_only)
        accelerator = accelerator or "auto"
        # Joins torchrun's process group; outside torchrun, devices > 1 re-runs this program in
        # that many workers and exits here (fastloop/distributed/launcher.py).
        self.strategy: Strategy = select_strategy(strategy, device_of(accelerator), parse_devices(devices, accelerator),
                                                  num_nodes, devices)
        self.strategy.connect(self)
        self.debug = DebugFlags.parse(fast_dev_run, overfit_batches)
        args = self.debug.apply(dict(
            max_epochs=max_epochs, max_steps=max_steps,
            limit_train_batches=1.0 if limit_train_batches is None else limit_train_batches,
            limit_val_batches=1.0 if limit_val_batches is None else limit_val_batches,
            limit_test_batches=1.0 if limit_test_batches is None else limit_test_batches,
            limit_predict_batches=1.0 if limit_predict_batches is None else limit_predict_batches,
            val_check_interval=1.0 if val_check_interval is None else val_check_interval,
            check_val_every_n_epoch=check_val_every_n_epoch, num_sanity_val_steps=num_sanity_val_steps,
        ))
        if not isinstance(reload_dataloaders_every_n_epochs, int) or reload_dataloaders_every_n_epochs < 0:
            raise ValueError(
                f"reload_dataloaders_every_n_epochs must be an int >= 0, got {reload_dataloaders_every_n_epochs!r}"
            )
        self.config = RunConfig(
            limits=Limits(args["max_epochs"], min_epochs, args["max_steps"], min_steps, args["limit_train_batches"],
                          args["limit_val_batches"], args["limit_test_batches"], args["limit_predict_batches"]),
            validation=ValidationSchedule(args["val_check_interval"], args["check_val_every_n_epoch"],
                                          args["num_sanity_val_steps"]),
            optimization=OptimizationConfig(1 if accumulate_grad_batches is None else accumulate_grad_batches, gradient_clip_val,
                                            gradient_clip_algorithm or "norm"),
            compile=compile_config or CompileConfig(),
            mode=mode, accelerator=accelerator, precision=normalize_precision(precision),
            default_root_dir=default_root_dir, enable_progress_bar=enable_progress_bar, nonfinite=nonfinite,
        )
        self.mode = resolve_mode(mode)
        self.device = self.strategy.root_device
        self.detect_anomaly = bool(detect_anomaly)
        self.reload_dataloaders_every_n_epochs = reload_dataloaders_every_n_epochs
        self.deterministic = deterministic
        set_determinism(deterministic, benchmark)
        # fp16 ("16-mixed") on the eager path: torch's GradScaler (the fused step keeps its own
        # scale on the device, see fastloop.step.precision).
        self.grad_scaler = make_grad_scaler(self.device.type, self.config.precision)
        self.default_root_dir = os.fspath(default_root_dir) if default_root_dir else os.getcwd()
        # fast_dev_run suppresses logging and checkpointing, as in Lightning.
        self.loggers = [] if self.fast_dev_run else configure_loggers(logger, self.default_root_dir)
        self.callbacks: List[Callback] = with_default_callbacks(
            as_callback_list(callbacks), enable_checkpointing, enable_progress_bar, enable_model_summary,
        )
        self.state = TrainerState()
        self.metrics = MetricLogger(self)
        self.logger_connector = LoggerConnector(self, log_every_n_steps)
        self.checkpoint_connector = CheckpointConnector(self)
        self.data = DataConnector(self)
        self.should_stop = False
        self.module: Optional[Module] = None
        self.hooks: HookDispatcher = HookDispatcher(self, Module(), self.callbacks)
        self.optimizers: List[Optimizer] = []
        self.optimizer_wrappers: List[LoopOptimizer] = []
        self.lr_scheduler_configs: List[SchedulerConfig] = []
        self.optimizer_frequencies: List[int] = []
        self.train_data: Optional[StageData] = None
        self.val_check_batch: Union[int, float] = math.inf
        self._running_fit_loop: Optional[FitLoop] = None
        self._sanity_done = False
        self._loops_ready = False
        self._validation_enabled = None
        self._checkpoint_loader_state: Optional[Dict[str, Any]] = None
        self._restored_from: Optional[str] = None

        # Loops built without limits take the Trainer's (config.limits) when they run.
        fit_loop = FitLoop()
        fit_loop.connect(epoch_loop=TrainingEpochLoop())
        self.fit_loop = fit_loop
        self.validate_loop = EvaluationLoop()
        self.test_loop = EvaluationLoop()
        self.predict_loop = PredictionLoop()

    # ------------------------------------------------------------- top-level loops
    def _loop_property(name: str) -> property:  # type: ignore[misc]
        def getter(self: "Trainer") -> Loop:
            return getattr(self, "_" + name)

        def setter(self: "Trainer", loop: Loop) -> None:
            if not isinstance(loop, Loop):
                raise TypeError(f"trainer.{name} must be a Loop, got {type(loop).__name__}")
            loop.trainer = self
            setattr(self, "_" + name, loop)

        return property(getter, setter, doc=f"The loop that ``trainer.{name.split('_')[0]}`` runs.")

    fit_loop = _loop_property("fit_loop")
    validate_loop = _loop_property("validate_loop")
    test_loop = _loop_property("test_loop")
    predict_loop = _loop_property("predict_loop")
    del _loop_property

    # ----------------------------------------------------------------- entry points
    def fit(self, model: Module, train_dataloaders: Any = None, val_dataloaders: Any = None,
            datamodule: Optional[DataModule] = None, ckpt_path: Optional[str] = None) -> None:
        """Train. ``train_dataloaders`` may be a ``DataModule``, as Lightning accepts.
        ``ckpt_path``: a file, ``"last"`` or ``"best"`` (through the ModelCheckpoint callbacks)."""
        if isinstance(train_dataloaders, DataModule):
            train_dataloaders, datamodule = None, _only_datamodule(datamodule, train_dataloaders, "fit")
        self._run("fit", model, datamodule, ckpt_path, train=train_dataloaders, val=val_dataloaders)

    def finetune(self, model: Module, train_dataloaders: Any = None, val_dataloaders: Any = None,
                 datamodule: Optional[DataModule] = None, strategy: Any = "no_freeze",
                 ckpt_path: Optional[str] = None) -> None:
        """``fit`` with a finetuning strategy for the module's ``backbone``: "no_freeze", "freeze",
        ("freeze_unfreeze", epoch) or a ``BackboneFinetuning`` callback (fastloop.callbacks.finetuning)."""
        from fastloop.callbacks.finetuning import finetune

        finetune(self, model, train_dataloaders, val_dataloaders, datamodule, strategy, ckpt_path)

    def validate(self, model: Optional[Module] = None, dataloaders: Any = None, ckpt_path: Optional[str] = None,
                 verbose: bool = True, datamodule: Optional[DataModule] = None) -> List[Dict[str, float]]:
        if isinstance(dataloaders, DataModule):
            dataloaders, datamodule = None, _only_datamodule(datamodule, dataloaders, "validate")
        self.validate_loop.verbose = verbose
        return self._run("validate", model, datamodule, ckpt_path, val=dataloaders)

    def test(self, model: Optional[Module] = None, dataloaders: Any = None, ckpt_path: Optional[str] = None,
             verbose: bool = True, datamodule: Optional[DataModule] = None) -> List[Dict[str, float]]:
        if isinstance(dataloaders, DataModule):
            dataloaders, datamodule = None, _only_datamodule(datamodule, dataloaders, "test")
        self.test_loop.verbose = verbose
        return self._run("test", model, datamodule, ckpt_path, test=dataloaders)

    def predict(self, model: Optional[Module] = None, dataloaders: Any = None, datamodule: Optional[DataModule] = None,
                return_predictions: Optional[bool] = None, ckpt_path: Optional[str] = None) -> Any:
        if isinstance(dataloaders, DataModule):
            dataloaders, datamodule = None, _only_datamodule(datamodule, dataloaders, "predict")
        if return_predictions is False:
            raise ValueError("predict(return_predictions=False) is not supported: fastloop returns the predictions")
        return self._run("predict", model, datamodule, ckpt_path, predict=dataloaders)

    def _run(self, fn: str, model: Optional[Module], datamodule: Optional[DataModule], ckpt_path: Optional[str],
             **loaders: Any) -> Any:
        ckpt_path = self.checkpoint_connector.default_ckpt_path(fn, ckpt_path, model_given=model is not None)
        if model is None:
            if self.module is None:
                raise TypeError(f"trainer.{fn}() needs a model: none was given and none was fitted before")
            model = self.module
        if not isinstance(model, Module):
            raise TypeError(f"trainer.{fn}() needs a fastloop.Module, got {type(model).__name__}")
        if datamodule is not None and any(v is not None for v in loaders.values()):
            raise ValueError(f"trainer.{fn}() got both dataloaders and a datamodule; pass one of them")
        # A path is read (and checked) before anything runs; "last"/"best" once callbacks are set up.
        checkpoint = load_checkpoint(ckpt_path) if ckpt_path not in (None, "last", "best") else None
        stage = {"validate": "validate", "test": "test", "predict": "predict"}.get(fn)
        self.module = model
        model._trainer = self
        if datamodule is not None:
            datamodule.trainer = self
        self.should_stop = False
        self._sanity_done = False
        self._loops_ready = False
        self._validation_enabled: Optional[bool] = None
        self._checkpoint_loader_state = None
        self.train_data = None
        self.metrics = MetricLogger(self)  # callback/logged metrics start empty at each entry point
        self.logger_connector.reset_evaluation_steps()
        self.hooks = HookDispatcher(self, model, self.callbacks + list(model.configure_callbacks() or []))
        self.data.attach(datamodule, **loaders)
        loop: Loop = getattr(self, _LOOP_KEYS[fn])
        with self.state.running(fn):
            try:
                checkpoint = self._prepare(fn, model, datamodule, checkpoint, ckpt_path)
                self._setup_loops(loop, _LOOP_KEYS[fn])
                if fn == "fit":
                    self.hooks.call("on_fit_start")
                if checkpoint is not None:  # after on_fit_start, as Lightning restores its training state
                    self.checkpoint_connector.restore_run_state(checkpoint, fn, loop)
                self.logger_connector.log_hyperparams()
                if checkpoint is not None and "rng_states" in checkpoint and fn == "fit":
                    restore_rng_states(checkpoint["rng_states"])
                with torch.autograd.set_detect_anomaly(self.detect_anomaly):
                    if stage is None:
                        result = loop.run()
                    else:
                        with self.state.stage_as(stage):
                            result = loop.run()
                if fn == "fit":
                    self.hooks.call("on_fit_end")
                self._teardown(fn, datamodule)
                self.logger_connector.finalize("success")
            except BaseException as exc:
                if self.strategy.is_distributed:
                    tag_exception(exc, self.global_rank, self.world_size)
                self.strategy.teardown()
                self.hooks.call_callbacks("on_exception", exc)
                loop.teardown()
                self.logger_connector.finalize("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
                raise
        return result

    def _prepare(self, fn: str, model: Module, datamodule: Optional[DataModule],
                 checkpoint: Optional[Dict[str, Any]], ckpt_path: Optional[str]) -> Optional[Dict[str, Any]]:
        if self.strategy.is_local_zero:  # once per node, as Lightning's prepare_data_per_node
            if datamodule is not None:
                datamodule.prepare_data()
            self.hooks.call_module("prepare_data")
        self.strategy.barrier("prepare_data")
        sync_logger_versions(self.strategy, self.loggers)
        self.hooks.call_callbacks("setup", fn)
        if datamodule is not None:
            datamodule.setup(fn)
        self.hooks.call_module("setup", fn)
        model.to(self.device)
        self._restored_from = ckpt_path if checkpoint is not None else None
        if ckpt_path in ("last", "best"):
            resolved = self.checkpoint_connector.resolve(ckpt_path, fn)
            checkpoint = load_checkpoint(resolved) if resolved is not None else None
            self._restored_from = resolved
        if checkpoint is not None:
            self._checkpoint_loader_state = checkpoint.get("train_loader")
            self.checkpoint_connector.restore_model(checkpoint, fn)
        if fn == "fit":
            self.strategy.setup_fit(model)
            self.setup_optimizers()
        return checkpoint

    def _teardown(self, fn: str, datamodule: Optional[DataModule]) -> None:
        self.strategy.teardown()
        self.hooks.call_callbacks("teardown", fn)
        if datamodule is not None:
            datamodule.teardown(fn)
        self.hooks.call_module("teardown", fn)

    def _setup_loops(self, loop: Loop, name: str) -> None:
        loop.trainer = self
        for _, child in iter_loops(loop, name):
            child.setup()
        self._loops_ready = True

    def setup_optimizers(self) -> None:
        """Call ``configure_optimizers`` and wrap the optimizers (again, for outer loops that
        restart training, such as cross-validation folds)."""
        parsed = parse_optimizers(self.hooks.call_module("configure_optimizers"))
        self.optimizers = parsed.optimizers
        self.lr_scheduler_configs = parsed.schedulers
        self.optimizer_frequencies = parsed.frequencies
        self.optimizer_wrappers = [LoopOptimizer(opt, i, self) for i, opt in enumerate(self.optimizers)]
        if self.state.fitting and self._loops_ready:
            # Steps are built for specific optimizers: rebuild them for the new ones.
            self._setup_loops(self.fit_loop, "fit_loop")

    # --------------------------------------------------------------- fit-time data
    def prepare_training_data(self) -> None:
        """Request the training loader (``train_dataloader``) and derive batch counts."""
        data = self.data.stage_data("train", self.config.limits.limit_train_batches)
        if not data.loaders:
            raise ValueError(
                "no training data: pass `train_dataloaders` to fit(), a datamodule, or define "
                "`train_dataloader()` on the module"
            )
        self.train_data = data
        loader = data.loaders[0]
        if self._checkpoint_loader_state is not None and has_own_state(loader):
            # The checkpoint's loader state (seed, epoch) wins over the new loader's own.
            loader.load_state_dict(self._checkpoint_loader_state)
            self._checkpoint_loader_state = None
        n = data.max_batches[0]
        interval = self.config.validation.val_check_interval
        if isinstance(interval, float):
            if n == math.inf:
                if interval != 1.0:
                    raise ValueError("val_check_interval as a fraction below 1.0 needs a training loader with len()")
                self.val_check_batch = math.inf
            else:
                self.val_check_batch = max(1, int(n * interval))
        else:
            if interval > n and self.config.validation.check_val_every_n_epoch is not None:
                raise ValueError(
                    f"val_check_interval={interval} is more than the {n} training batches per epoch; "
                    "set check_val_every_n_epoch=None to count batches across epochs"
                )
            self.val_check_batch = interval

    def reload_dataloaders(self) -> None:
        """Ask the data sources for fresh loaders at their next use (outer loops changing data)."""
        self.data.clear_cache()
        self.logger_connector.reset_evaluation_steps()

    @property
    def num_training_batches(self) -> Union[int, float]:
        return self.train_data.max_batches[0] if self.train_data is not None else math.inf

    def eval_data(self) -> StageData:
        """Loaders of the running evaluation (validation or test), with the stage's limits."""
        limits = self.config.limits
        if self.state.testing:
            return self.data.stage_data("test", limits.limit_test_batches)
        data = self.data.stage_data("val", limits.limit_val_batches)
        if self.state.sanity_checking:
            steps = self.config.validation.num_sanity_val_steps
            if steps != -1:
                return StageData(data.loaders, [min(m, steps) for m in data.max_batches])
        return data

    def predict_data(self) -> StageData:
        return self.data.stage_data("predict", self.config.limits.limit_predict_batches)

    @property
    def validation_enabled(self) -> bool:
        """Whether fit validates: a ``validation_step``, a val source, and a non-zero limit.
        Decided once per entry-point call (it is read after every batch)."""
        if self._validation_enabled is None:
            self._validation_enabled = bool(
                self.module is not None and self.hooks.module_overrides("validation_step")
                and self.data.has_source("val") and self.config.limits.limit_val_batches != 0
            )
        return self._validation_enabled

    def _sanity_check_due(self) -> bool:
        due = not self._sanity_done and self.validation_enabled and self.config.validation.num_sanity_val_steps != 0
        self._sanity_done = True
        return due

    def _resume_loader_position(self, loader: Any, next_batch: int) -> bool:
        """Let a loader with its own state (``TensorLoader``) resume at ``next_batch``."""
        if not has_own_state(loader):
            return False
        state = dict(loader.state_dict())
        if "next_batch" not in state:
            return False
        state["next_batch"] = next_batch
        loader.load_state_dict(state)
        return True

    # -------------------------------------------------------------- step plumbing
    @property
    def accumulate_grad_batches(self) -> int:
        return self.config.optimization.accumulate_grad_batches

    @property
    def gradient_clip_val(self) -> Optional[float]:
        return self.config.optimization.gradient_clip_val

    @property
    def gradient_clip_algorithm(self) -> str:
        return self.config.optimization.gradient_clip_algorithm

    def active_optimizer_indices(self, batch_idx: int) -> List[int]:
        return active_optimizer_indices(len(self.optimizers), self.optimizer_frequencies, batch_idx)

    def active_optimizers(self, batch_idx: int) -> Tuple[Tuple[int, Optimizer], ...]:
        """``(optimizer_idx, optimizer)`` for each optimizer that runs on batch ``batch_idx``."""
        optimizers = self.optimizers
        if self.optimizer_frequencies:
            return tuple((i, optimizers[i]) for i in self.active_optimizer_indices(batch_idx))
        return tuple(enumerate(optimizers))  # every optimizer: the common case, read once per batch

    @property
    def should_accumulate(self) -> bool:
        """Whether the running batch only accumulates gradients (no optimizer step)."""
        fit_loop = self._counting_fit_loop()
        return fit_loop is not None and fit_loop.epoch_loop._should_accumulate()

    def _run_backward(self, loss: torch.Tensor, optimizer: Optional[Optimizer], opt_idx: Optional[int],
                      *args: Any, **kwargs: Any) -> None:
        self.hooks.call("on_before_backward", loss)
        self.strategy.pre_backward(loss)
        self.hooks.call_module("backward", loss, optimizer, opt_idx, *args, **kwargs)
        self.hooks.call("on_after_backward")

    def _after_closure(self, optimizer: Optimizer, opt_idx: int) -> None:
        """Between the closure (backward) and the torch optimizer step."""
        self.hooks.call("on_before_optimizer_step", optimizer, opt_idx)
        clipping = self.gradient_clip_val or self.hooks.module_overrides("configure_gradient_clipping")
        if clipping and self.module is not None and self.module.automatic_optimization:
            self.hooks.call_module(
                "configure_gradient_clipping", optimizer, opt_idx, self.gradient_clip_val, self.gradient_clip_algorithm,
            )

    # ------------------------------------------------------------------ counters
    def _register_fit_loop(self, loop: FitLoop) -> None:
        self._running_fit_loop = loop

    def _counting_fit_loop(self) -> Optional[FitLoop]:
        """The fit loop whose counters are the trainer's: the running one, else the first in the tree."""
        if self._running_fit_loop is not None:
            return self._running_fit_loop
        for _, loop in iter_loops(self.fit_loop, "fit_loop"):
            if isinstance(loop, FitLoop):
                return loop
        return None

    @property
    def global_step(self) -> int:
        """Optimizer steps taken (all optimizers), as in Lightning 1.6+."""
        loop = self._counting_fit_loop()
        return loop.epoch_loop.global_step if loop is not None else 0

    @property
    def current_epoch(self) -> int:
        """Completed training epochs."""
        loop = self._counting_fit_loop()
        return loop.epoch_progress.current.completed if loop is not None else 0

    @property
    def is_last_batch(self) -> bool:
        loop = self._counting_fit_loop()
        return loop is not None and loop.epoch_loop.batch_progress.is_last_batch

    @property
    def max_epochs(self) -> Optional[int]:
        loop = self._counting_fit_loop()
        return loop.max_epochs if loop is not None else None

    @property
    def max_steps(self) -> int:
        loop = self._counting_fit_loop()
        return loop.max_steps if loop is not None else -1

    def explain(self) -> str:
        """For each loop that runs steps: the mode used and, for every fallback, why."""
        lines = [f"fastloop {__version__}: mode requested {self.mode!r}, device {self.device}"]
        for key in _LOOP_KEYS.values():
            for path, loop in iter_loops(getattr(self, key), key):
                report = getattr(loop, "step_report", None)
                if report is not None:
                    lines.append(f"  {path} ({type(loop).__name__}): {report.describe()}")
        if len(lines) == 1:
            lines.append("  no step has been built yet: call fit/validate/test/predict first")
        return "\n".join(lines)

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, filepath: str, weights_only: bool = False) -> None:
        """Write a checkpoint atomically: a reader sees the old file or the whole new one."""
        self.checkpoint_connector.save(filepath, weights_only)

    def dump_checkpoint(self, weights_only: bool = False) -> Dict[str, Any]:
        return self.checkpoint_connector.dump(weights_only)

    @property
    def ckpt_path(self) -> Optional[str]:
        """The checkpoint file the last entry point restored from (None: it started fresh)."""
        return self._restored_from
