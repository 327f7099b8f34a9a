"""One process of the distributed-data tests (``tests/test_ddp_data_torchrun.py``).

Run as ``python -m torch.distributed.run --nproc-per-node=2 --master-port=P
tests/ddp_data_worker.py OUT_DIR SCENARIO[,SCENARIO...]``. Each scenario runs in this process,
one after the other (importing torch costs seconds), and writes what it saw to
``OUT_DIR/<scenario>_rank<r>.json``; the test compares the ranks' files. Scenarios:

- ``sampler``: DistributedSampler injection for fit (2 epochs, shuffled), validation, predict
  (unrepeated), ``use_distributed_sampler=False``, ``replace_sampler_ddp=False``, a user's own
  DistributedSampler, and the error for a custom sampler;
- ``tensorloader``: a TensorLoader built before the process group exists shards by rank;
- ``sync``: ``self.log(..., sync_dist=True)`` in training and validation, mean/max/sum and a
  weighted mean, next to per-rank values;
- ``sync_compiled``: a sync_dist value logged from the compiled step;
- ``resume``: fit interrupted by a checkpoint mid-epoch (rank 0 writes it, both read it), then
  resumed, for a shuffled DataLoader and a shuffled TensorLoader.

The script sets the gloo process group up itself; the Trainer joins it.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Dict, List

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler, TensorDataset

import fastloop
from fastloop.callback import Callback
from fastloop.data import TensorLoader

# Built before the process group exists: its rank and world size must still come from it.
EARLY_TENSOR_LOADER = TensorLoader(torch.arange(43.0).unsqueeze(1), torch.arange(43), batch_size=5,
                                   shuffle=True, seed=3)

dist = torch.distributed


def rank() -> int:
    return dist.get_rank()


def quiet_trainer(**kwargs: Any) -> fastloop.Trainer:
    args: Dict[str, Any] = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, num_sanity_val_steps=0)
    args.update(kwargs)
    return fastloop.Trainer(**args)


def dataset(n: int) -> TensorDataset:
    """Sample ``i`` is ``(tensor([i.]), i)``: the second item names the sample."""
    return TensorDataset(torch.arange(float(n)).unsqueeze(1), torch.arange(n))


class Recorder(fastloop.Module):
    """Records the sample ids of every batch, per stage, with the epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(1, 1)
        self.seen: List[Any] = []
        self.val_seen: List[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, ids = batch
        self.seen.append([self.current_epoch, ids.tolist()])
        return self.layer(x).pow(2).mean()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.val_seen.extend(batch[1].tolist())

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        return batch[1]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def ids_collate(items: List[Any]) -> Any:
    return torch.stack([x for x, _ in items]), torch.tensor([int(i) for _, i in items])


class EveryOtherSampler(Sampler[int]):
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> Any:
        return iter(range(0, self.n, 2))

    def __len__(self) -> int:
        return (self.n + 1) // 2


def scenario_sampler() -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    model = Recorder()
    trainer = quiet_trainer(max_epochs=2)
    train = DataLoader(dataset(40), batch_size=4, shuffle=True, collate_fn=ids_collate)
    trainer.fit(model, train, DataLoader(dataset(10), batch_size=3))
    rebuilt = trainer.train_data.loaders[0]
    out["train"] = model.seen
    out["val"] = model.val_seen
    out["train_sampler"] = [type(rebuilt.sampler).__name__, rebuilt.sampler.shuffle, rebuilt.sampler.seed]
    out["kept_arguments"] = [rebuilt.batch_size, rebuilt.collate_fn is ids_collate, train.sampler is not rebuilt.sampler]

    predictions = quiet_trainer().predict(Recorder(), DataLoader(dataset(41), batch_size=4))
    out["predict"] = torch.cat(predictions).tolist()

    for name, flag in (("off", dict(use_distributed_sampler=False)), ("legacy_off", dict(replace_sampler_ddp=False))):
        model = Recorder()
        quiet_trainer(max_epochs=1, **flag).fit(model, DataLoader(dataset(12), batch_size=4))
        out[name] = model.seen

    own = DistributedSampler(dataset(12), shuffle=False)
    loader = DataLoader(dataset(12), batch_size=2, sampler=own)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(Recorder(), loader)
    out["own_sampler_kept"] = trainer.train_data.loaders[0] is loader

    try:
        quiet_trainer(max_epochs=1).fit(Recorder(), DataLoader(dataset(12), batch_size=2, sampler=EveryOtherSampler(12)))
        out["custom_sampler_error"] = None
    except ValueError as exc:
        out["custom_sampler_error"] = str(exc)
    return out


def scenario_tensorloader() -> Dict[str, Any]:
    model = Recorder()
    loader = EARLY_TENSOR_LOADER
    quiet_trainer(max_epochs=2).fit(model, loader)
    return {"train": model.seen, "len": len(loader), "rank": loader.rank, "world_size": loader.world_size}


class SyncLogger(Recorder):
    """Logs values whose reduction over ranks and batches is known in advance."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        r = float(rank())
        self.log("mean_metric", 2 * r + batch_idx, sync_dist=True, on_step=True, on_epoch=True)
        self.log("max_metric", 10 * r + batch_idx, sync_dist=True, reduce_fx="max", on_epoch=True)
        self.log("sum_metric", 1.0, sync_dist=True, reduce_fx="sum", on_step=False, on_epoch=True)
        self.log("weighted", r, sync_dist=True, on_step=False, on_epoch=True, batch_size=rank() + 1)
        self.log("local_metric", r, on_step=False, on_epoch=True)
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_metric", float(rank()), sync_dist=True)


def metrics_of(trainer: fastloop.Trainer) -> Dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def scenario_sync() -> Dict[str, Any]:
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(SyncLogger(), DataLoader(dataset(24), batch_size=4), DataLoader(dataset(8), batch_size=2))
    return {"metrics": metrics_of(trainer)}


class CompiledSyncLogger(fastloop.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(1, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("rank_metric", loss.detach() * 0 + float(rank()), sync_dist=True, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def scenario_sync_compiled() -> Dict[str, Any]:
    os.environ.pop("FASTLOOP_MODE", None)
    trainer = quiet_trainer(max_epochs=1, mode="compiled")
    trainer.fit(CompiledSyncLogger(), DataLoader(dataset(16), batch_size=4))
    return {"metrics": metrics_of(trainer), "explain": trainer.explain()}


class SaveAt(Callback):
    """Writes a checkpoint after global batch ``at`` (rank 0 writes it; every rank waits for it)."""

    def __init__(self, path: str, at: int) -> None:
        self.path, self.at, self.count = path, at, 0

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.count += 1
        if self.count != self.at:
            return
        trainer.save_checkpoint(self.path)  # every rank calls it; rank 0 writes, the others wait


def scenario_resume() -> Dict[str, Any]:
    out_dir = sys.argv[1]
    out: Dict[str, Any] = {}
    loaders: Dict[str, Callable[[], Any]] = {
        "dataloader": lambda: DataLoader(dataset(20), batch_size=2, shuffle=True),
        "tensorloader": lambda: TensorLoader(torch.arange(20.0).unsqueeze(1), torch.arange(20), batch_size=2,
                                             shuffle=True, seed=5),
    }
    for name, make_loader in loaders.items():
        path = os.path.join(out_dir, f"{name}.ckpt")
        fastloop.seed_everything(7)
        reference = Recorder()
        quiet_trainer(max_epochs=2, callbacks=[SaveAt(path, 7)]).fit(reference, make_loader())
        fastloop.seed_everything(7)
        resumed = Recorder()
        quiet_trainer(max_epochs=2).fit(resumed, make_loader(), ckpt_path=path)
        out[name] = {"reference": reference.seen, "resumed": resumed.seen}
    return out


SCENARIOS = {"sampler": scenario_sampler, "tensorloader": scenario_tensorloader, "sync": scenario_sync,
             "sync_compiled": scenario_sync_compiled, "resume": scenario_resume}


def main() -> None:
    out_dir, names = sys.argv[1], sys.argv[2].split(",")
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    try:
        for name in names:
            result = SCENARIOS[name]()
            path = os.path.join(out_dir, f"{name}_rank{rank()}.json")
            with open(path + ".tmp", "w") as f:
                json.dump(result, f)
            os.replace(path + ".tmp", path)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
