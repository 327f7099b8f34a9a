"""The autoencoder of Lightning's basic examples, ported by changing its imports.

MNIST is replaced by random 28x28 images (``RandomMNIST``) with the same split sizes scaled
down; the ``ImageSampler`` callback (torchvision) is left out.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, random_split

from fastloop import LightningDataModule, LightningModule, Trainer, seed_everything
from fastloop.callbacks import EarlyStopping, ModelCheckpoint


class RandomMNIST(Dataset):
    """``length`` random 1x28x28 images in [0, 1) with digit labels, as MNIST's ToTensor gives."""

    def __init__(self, length: int = 256, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(length, 1, 28, 28, generator=g)
        self.labels = torch.randint(0, 10, (length,), generator=g)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    def __len__(self):
        return len(self.images)


class LitAutoEncoder(LightningModule):
    """
    >>> LitAutoEncoder()  # doctest: +ELLIPSIS +NORMALIZE_WHITESPACE
    LitAutoEncoder(
      (encoder): ...
      (decoder): ...
    )
    """

    def __init__(self, hidden_dim: int = 64, learning_rate=10e-3):
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Sequential(nn.Linear(28 * 28, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 3))
        self.decoder = nn.Sequential(nn.Linear(3, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 28 * 28))

    def forward(self, x):
        z = self.encoder(x)
        x_hat = self.decoder(z)
        return x_hat

    def training_step(self, batch, batch_idx):
        return self._common_step(batch, batch_idx, "train")

    def validation_step(self, batch, batch_idx):
        self._common_step(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx):
        self._common_step(batch, batch_idx, "test")

    def predict_step(self, batch, batch_idx, dataloader_idx=None):
        x = self._prepare_batch(batch)
        return self(x)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate)

    def _prepare_batch(self, batch):
        x, _ = batch
        return x.view(x.size(0), -1)

    def _common_step(self, batch, batch_idx, stage: str):
        x = self._prepare_batch(batch)
        loss = F.mse_loss(x, self(x))
        self.log(f"{stage}_loss", loss, on_step=True)
        return loss


class MyDataModule(LightningDataModule):
    def __init__(self, batch_size: int = 32, length: int = 256, splits: Tuple[int, int] = (224, 32)):
        super().__init__()
        dataset = RandomMNIST(length, seed=0)
        self.mnist_test = RandomMNIST(length // 4, seed=1)
        self.mnist_predict = RandomMNIST(length // 4, seed=2)
        self.mnist_train, self.mnist_val = random_split(
            dataset, list(splits), generator=torch.Generator().manual_seed(42)
        )
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.mnist_train, batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(self.mnist_val, batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.mnist_test, batch_size=self.batch_size)

    def predict_dataloader(self):
        return DataLoader(self.mnist_predict, batch_size=self.batch_size)


def cli_main(max_epochs: int = 3, patience: int = 3, **trainer_kwargs):
    """Fit with early stopping and checkpointing on ``val_loss``, then test and predict."""
    seed_everything(1234)
    model = LitAutoEncoder()
    datamodule = MyDataModule()
    callbacks = [
        EarlyStopping(monitor="val_loss", patience=patience),
        ModelCheckpoint(monitor="val_loss", save_last=True),
    ]
    settings = dict(max_epochs=max_epochs, callbacks=callbacks, enable_model_summary=False)
    settings.update(trainer_kwargs)
    trainer = Trainer(**settings)
    trainer.fit(model, datamodule=datamodule)
    trainer.test(ckpt_path="best", datamodule=datamodule)
    predictions = trainer.predict(ckpt_path="best", datamodule=datamodule)
    print(predictions[0].shape)
    return trainer


if __name__ == "__main__":
    cli_main()
