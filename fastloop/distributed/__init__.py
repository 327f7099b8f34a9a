"""Distributed training on ``torch.distributed``, launched by torchrun (or by fastloop through
torch's launcher API): the process group and coordinates (``env``), the strategies
(``strategy``: ``DDPStrategy``), the DDP training-step wrapper (``wrapper``), the launcher for
``python train.py`` with ``devices > 1`` (``launcher``) and rank-tagged errors (``errors``).
"""
from fastloop.distributed.env import ClusterEnv, launched_by_torchrun
from fastloop.distributed.strategy import DDPStrategy, SingleDeviceStrategy, Strategy

__all__ = ["ClusterEnv", "DDPStrategy", "SingleDeviceStrategy", "Strategy", "launched_by_torchrun"]
