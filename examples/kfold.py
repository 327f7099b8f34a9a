"""K-fold cross-validation as a loop written from scratch on ``Loop``, wrapping ``FitLoop``.

Each fold restores the initial weights, re-creates the optimizers, trains with the wrapped fit
loop on the other folds and validates on the held-out one. Run: ``python examples/kfold.py``.
"""
import copy
from typing import List

import torch
from torch.utils.data import DataLoader, Subset

from fastloop import DataModule, Trainer
from fastloop.loops import FitLoop, Loop, Progress
from fastloop.testing import BoringModel, random_dataset


class KFoldDataModule(DataModule):
    def __init__(self, dataset, num_folds: int, batch_size: int = 16) -> None:
        self.dataset, self.num_folds, self.batch_size = dataset, num_folds, batch_size
        self.fold = 0

    def _indices(self, held_out: bool) -> List[int]:
        return [i for i in range(len(self.dataset)) if (i % self.num_folds == self.fold) == held_out]

    def train_dataloader(self):
        return DataLoader(Subset(self.dataset, self._indices(False)), batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(Subset(self.dataset, self._indices(True)), batch_size=self.batch_size)


class KFoldLoop(Loop):
    def __init__(self, num_folds: int, fit_loop: FitLoop) -> None:
        super().__init__()
        self.num_folds = num_folds
        self.fit_loop = fit_loop
        self.fold_progress = Progress()
        self.fold_metrics: List[float] = []

    @property
    def done(self) -> bool:
        return self.fold_progress.current.completed >= self.num_folds

    def reset(self) -> None:
        if not self.restarting:
            self.fold_progress.reset_on_run()

    def on_run_start(self) -> None:
        self._initial_weights = copy.deepcopy(self.trainer.module.state_dict())

    def advance(self) -> None:
        trainer = self.trainer
        self.fold_progress.increment_ready()
        trainer.datamodule.fold = self.fold_progress.current.ready - 1
        trainer.reload_dataloaders()  # this fold's loaders
        self.fit_loop.run()
        self.fold_metrics.append(float(trainer.callback_metrics["val_loss"]))
        self.fold_progress.increment_completed()

    def on_advance_end(self) -> None:
        # The next fold starts from the same weights, fresh optimizers and epoch 0.
        self.trainer.module.load_state_dict(self._initial_weights)
        self.trainer.setup_optimizers()
        self.fit_loop.reset_progress()

    def on_run_end(self) -> List[float]:
        return self.fold_metrics


def main() -> None:
    torch.manual_seed(0)
    trainer = Trainer(max_epochs=2, enable_progress_bar=False, num_sanity_val_steps=0)
    loop = KFoldLoop(3, trainer.fit_loop)
    trainer.fit_loop = loop
    trainer.fit(BoringModel(), datamodule=KFoldDataModule(random_dataset(n=96), num_folds=3))
    print("validation loss per fold:", [round(v, 4) for v in loop.fold_metrics])


if __name__ == "__main__":
    main()
