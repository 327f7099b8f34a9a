"""``trainer.strategy``: how the processes of a run cooperate.

``Strategy`` is one process (its collectives return their input); ``DDPStrategy`` is data
parallel training on ``torch.distributed``: it joins the process group torchrun set up (gloo on
a CPU, NCCL on CUDA, one device per process), wraps the module in ``DistributedDataParallel``
for eager training steps (``fastloop/distributed/wrapper.py``) and offers ``barrier``,
``broadcast`` and ``reduce``. ``select_strategy`` turns the Trainer's ``strategy``, ``devices``
and ``num_nodes`` into one, checking them against torchrun's ``WORLD_SIZE``.
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ContextManager, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from fastloop.distributed.env import ClusterEnv, detect, group_initialized, launched_by_torchrun
from fastloop.distributed.errors import report_uncaught_errors

if TYPE_CHECKING:
    from fastloop.trainer import Trainer
    from fastloop.trainer_args import DeviceRequest

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM,
               "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "product": dist.ReduceOp.PRODUCT}
DDP_NAMES = {"ddp": False, "ddp_find_unused_parameters_false": False, "ddp_find_unused_parameters_true": True}


class Strategy:
    """A single process: no process group, collectives are identities."""

    is_distributed = False

    def __init__(self) -> None:
        self.env = ClusterEnv()
        self.root_device = torch.device("cpu")
        self.trainer: Optional["Trainer"] = None
        self.model: Optional[nn.Module] = None  # the DDP-wrapped training step, while fitting
        self.manual_step_active = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank {self.global_rank} of {self.world_size}, device {self.root_device})"

    # ------------------------------------------------------------ coordinates
    @property
    def global_rank(self) -> int:
        return self.env.global_rank

    @property
    def local_rank(self) -> int:
        return self.env.local_rank

    @property
    def node_rank(self) -> int:
        return self.env.node_rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def num_nodes(self) -> int:
        return self.env.num_nodes

    @property
    def num_processes(self) -> int:
        """Processes per node (``trainer.num_devices``)."""
        return self.env.local_world_size

    @property
    def is_global_zero(self) -> bool:
        return self.env.global_rank == 0

    @property
    def is_local_zero(self) -> bool:
        return self.env.local_rank == 0

    # ---------------------------------------------------------- trainer hooks
    def connect(self, trainer: "Trainer") -> None:
        self.trainer = trainer

    def setup_fit(self, module: nn.Module) -> None:
        """Before a fit's first step (the module is on its device, a checkpoint's weights loaded)."""

    def teardown(self) -> None:
        self.model = None

    def training_step(self, *args: Any) -> Any:
        """Run the module's ``training_step`` (through DDP when distributed)."""
        return self.trainer.hooks.call_module("training_step", *args)

    def block_backward_sync(self) -> ContextManager[Any]:
        """Around an accumulating micro-batch: no gradient all-reduce in its backward."""
        return contextlib.nullcontext()

    def pre_backward(self, loss: torch.Tensor) -> None:
        """Right before a backward run by the trainer (``manual_backward`` included)."""

    # ------------------------------------------------------------ collectives
    def barrier(self, name: Optional[str] = None) -> None:
        """Wait until every process got here."""

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``obj`` as process ``src`` has it (any picklable object)."""
        return obj

    def reduce(self, tensor: torch.Tensor, op: Union[str, Any] = "mean") -> torch.Tensor:
        """A new tensor: ``tensor`` reduced over every process (``"mean"``, ``"sum"``, ``"max"``,
        ``"min"``, ``"product"`` or a ``torch.distributed.ReduceOp``)."""
        _reduce_op(op)
        return tensor


def _reduce_op(op: Union[str, Any]) -> Any:
    if isinstance(op, str):
        if op.lower() not in _REDUCE_OPS:
            raise ValueError(f"reduce op {op!r} is not one of {', '.join(sorted(_REDUCE_OPS))} or a ReduceOp")
        return _REDUCE_OPS[op.lower()]
    return op


class SingleDeviceStrategy(Strategy):
    """One process on one device (what a run without ``devices > 1`` or torchrun gets)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.root_device = device


class DDPStrategy(Strategy):
    """Data parallel training with ``torch.nn.parallel.DistributedDataParallel``.

    Args:
        find_unused_parameters: DDP's option (off by default, as in Lightning): needed when a
            step leaves some trainable parameters without a gradient (several optimizers,
            branches not taken), at the cost of a graph traversal per step.
        process_group_backend: ``"gloo"``/``"nccl"``; default NCCL on CUDA, gloo on a CPU.
        timeout: of the process group's collectives.
        **ddp_kwargs: passed on to ``DistributedDataParallel`` (``bucket_cap_mb``,
            ``gradient_as_bucket_view``, ``static_graph``...).
    """

    is_distributed = True

    def __init__(self, find_unused_parameters: bool = False, process_group_backend: Optional[str] = None,
                 timeout: timedelta = timedelta(minutes=30), **ddp_kwargs: Any) -> None:
        super().__init__()
        self.find_unused_parameters = bool(find_unused_parameters)
        self.process_group_backend = process_group_backend
        self.timeout = timeout
        self.ddp_kwargs = ddp_kwargs
        self.owns_process_group = False

    def configure(self, env: ClusterEnv, device: torch.device) -> None:
        """Join the process group (unless one is initialized already) as the process ``env`` describes."""
        self.env = env
        self.root_device = device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not group_initialized():
            backend = self.process_group_backend or ("nccl" if device.type == "cuda" else "gloo")
            if "TORCHELASTIC_RESTART_COUNT" in os.environ:
                dist.init_process_group(backend, store=attempt_store(env, self.timeout), rank=env.global_rank,
                                        world_size=env.world_size, timeout=self.timeout)
            else:
                dist.init_process_group(backend, timeout=self.timeout)  # env://: the launcher's variables
            self.owns_process_group = True
        if launched_by_torchrun():  # the elastic agent reads the error file it gave this worker
            report_uncaught_errors(env.global_rank, env.world_size)

    def setup_fit(self, module: nn.Module) -> None:
        """Wrap ``module`` for eager steps; DDP broadcasts rank 0's parameters and buffers here."""
        from torch.nn.parallel import DistributedDataParallel

        from fastloop.distributed.wrapper import TrainingStepWrapper

        device_ids = [self.root_device.index] if self.root_device.type == "cuda" else None
        self.model = DistributedDataParallel(
            TrainingStepWrapper(module, self), device_ids=device_ids,
            find_unused_parameters=self.find_unused_parameters, **self.ddp_kwargs,
        )

    def training_step(self, *args: Any) -> Any:
        model = self.model
        if model is None:  # not fitting
            return super().training_step(*args)
        manual = not self.trainer.module.automatic_optimization
        self.manual_step_active = manual
        try:
            return model(*args)
        finally:
            if manual:
                self.manual_step_active = False
                model.require_backward_grad_sync = True

    def block_backward_sync(self) -> ContextManager[Any]:
        return self.model.no_sync() if self.model is not None else contextlib.nullcontext()

    def pre_backward(self, loss: torch.Tensor) -> None:
        if self.manual_step_active and self.model is not None:
            from fastloop.distributed.wrapper import prepare_manual_backward

            prepare_manual_backward(self.model, loss, self.find_unused_parameters)

    def _device_ids(self) -> Optional[list]:
        return [self.root_device.index] if dist.get_backend() == "nccl" else None

    def barrier(self, name: Optional[str] = None) -> None:
        ids = self._device_ids()
        dist.barrier(device_ids=ids) if ids else dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        holder = [obj]
        dist.broadcast_object_list(holder, src=src)
        return holder[0]

    def reduce(self, tensor: torch.Tensor, op: Union[str, Any] = "mean") -> torch.Tensor:
        reduce_op = _reduce_op(op)
        out = tensor.detach().clone()
        dist.all_reduce(out, op=reduce_op)
        if isinstance(op, str) and op.lower() in ("mean", "avg"):
            out = out / self.world_size
        return out


def attempt_store(env: ClusterEnv, timeout: timedelta) -> dist.Store:
    """The store torch's ``env://`` init would use under the elastic agent, with keys of this
    restart attempt only. The agent keeps its store across ``--max-restarts`` rounds, and the
    workers' plain keys (each rank's gloo address...) with it: without the prefix a restarted
    worker can read the address of a worker of the previous round and fail to connect."""
    use_agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size,
        is_master=not use_agent_store and env.global_rank == 0, timeout=timeout, multi_tenant=not use_agent_store,
    )
    return dist.PrefixStore(f"fastloop/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


def _strategy_object(strategy: Any) -> Optional[Strategy]:
    """The strategy the argument names; None for "auto"."""
    if strategy is None or strategy == "auto":
        return None
    if isinstance(strategy, Strategy):
        return strategy
    if isinstance(strategy, str) and strategy in DDP_NAMES:
        return DDPStrategy(find_unused_parameters=DDP_NAMES[strategy])
    if strategy == "single_device":
        return SingleDeviceStrategy(torch.device("cpu"))
    raise ValueError(
        f"Trainer(strategy={strategy!r}) is not supported by fastloop: use 'auto', 'ddp' (DistributedDataParallel, "
        "one process per device, launched by torchrun or by fastloop), 'ddp_find_unused_parameters_true', "
        "'single_device' or a fastloop.distributed.DDPStrategy(...)"
    )


def _local_device(device: torch.device, request: "DeviceRequest", local_rank: int) -> torch.device:
    if device.type != "cuda":
        return device
    ids = request.ids
    if ids is not None:
        if local_rank >= len(ids):
            raise ValueError(f"devices={list(ids)!r} lists {len(ids)} GPUs but this is local rank {local_rank}")
        return torch.device("cuda", ids[local_rank])
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}")
    return torch.device("cuda", local_rank)


def select_strategy(strategy: Any, device: torch.device, request: "DeviceRequest", num_nodes: Any,
                    devices_arg: Any = None) -> Strategy:
    """The strategy for these Trainer arguments, joined to its process group.

    Outside torchrun (and without a process group), ``devices * num_nodes > 1`` re-runs the
    program in that many workers and exits (``fastloop/distributed/launcher.py``).
    """
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"Trainer(num_nodes={num_nodes!r}) must be an int >= 1")
    chosen = _strategy_object(strategy)
    shown = f"Trainer(devices={devices_arg!r}, num_nodes={num_nodes})"
    env = detect()
    if env is None:
        world = (request.count or 1) * num_nodes
        if world > 1:
            if isinstance(chosen, SingleDeviceStrategy):
                raise ValueError(f"{shown} asks for {world} processes but strategy='single_device' runs one")
            if num_nodes > 1:
                raise ValueError(f"Trainer(num_nodes={num_nodes}) needs torchrun on every node (for example "
                                 f"`torchrun --nnodes={num_nodes} --nproc-per-node={request.count or 1} "
                                 "--rdzv-backend=c10d --rdzv-endpoint=HOST:PORT train.py`)")
            from fastloop.distributed.launcher import relaunch_in_workers

            relaunch_in_workers(world, f"Trainer(devices={devices_arg!r})")
        return SingleDeviceStrategy(_local_device(device, request, 0))
    per_node = request.count if request.count is not None else env.local_world_size
    if per_node * num_nodes != env.world_size:
        where = "torchrun started" if launched_by_torchrun() else "the process group has"
        raise ValueError(
            f"{shown} asks for {per_node} x {num_nodes} = {per_node * num_nodes} processes, but {where} "
            f"WORLD_SIZE={env.world_size} ({env.local_world_size} per node): pass num_nodes equal to torchrun's "
            "--nnodes and devices equal to its --nproc-per-node (or devices='auto')"
        )
    if isinstance(chosen, SingleDeviceStrategy) or (chosen is None and env.world_size == 1):
        if env.world_size > 1:
            raise ValueError(f"strategy='single_device' runs one process but WORLD_SIZE={env.world_size}")
        return SingleDeviceStrategy(_local_device(device, request, env.local_rank))
    ddp = chosen if isinstance(chosen, DDPStrategy) else DDPStrategy()
    ddp.configure(env, _local_device(device, request, env.local_rank))
    return ddp


def sync_logger_versions(strategy: Strategy, loggers: Any) -> None:
    """Give every rank rank 0's logger versions. A file logger picks the next free
    ``version_<N>`` on first use; a rank looking after rank 0 created its directory would pick
    another one (and its ModelCheckpoint another directory)."""
    if not strategy.is_distributed:
        return
    # Every rank takes part (the same loggers everywhere), whether or not its versions are decided.
    file_loggers = [lg for lg in loggers if hasattr(lg, "_version")]
    if not file_loggers:
        return
    versions = strategy.broadcast([lg.version for lg in file_loggers] if strategy.is_global_zero else None)
    for logger, version in zip(file_loggers, versions):
        logger._version = version
