"""``ActiveLearningDataModule``: a labelled and an unlabelled pool over one training set.

Pools are kept as one tensor over the dataset, ``labelled_step[i]``: -1 while item ``i`` is
unlabelled, else the query that labelled it (0 for the initial labels, ``k`` for the ``k``-th
call of ``label``). It is the module's ``state_dict``, so checkpoints carry the pools.

Loaders:
* ``train_dataloader``: the labelled pool, less the validation share (``val_split``), shuffled;
* ``val_dataloader``: that share (None without ``val_split`` or labels);
* ``test_dataloader``: ``test_dataset``, or the wrapped DataModule's test loader (None without);
* ``predict_dataloader``: the unlabelled pool in ``unlabelled_indices`` order, not shuffled.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from fastloop.datamodule import DataModule
from fastloop.hooks import is_overridden


class ActiveLearningDataModule(DataModule):
    """Labelled/unlabelled pools over ``dataset_or_datamodule`` (a ``Dataset`` with ``len``, or a
    ``DataModule`` whose ``train_dataloader()`` has a ``.dataset``).

    Args:
        batch_size: of every loader.
        initial_labels: items labelled at random (from ``seed``) before the first cycle.
        query_size: items each query labels (``ActiveLearningLoop`` reads it).
        val_split: fraction of the labelled pool held out for validation (0: no validation).
        seed: seeds the initial labels and the validation split.
        test_dataset: optional test set (a wrapped DataModule's test loader is used otherwise).
    """

    def __init__(self, dataset_or_datamodule: Union[Dataset, DataModule], batch_size: int = 32,
                 initial_labels: int = 0, query_size: int = 1, val_split: float = 0.0, seed: int = 0,
                 test_dataset: Optional[Dataset] = None) -> None:
        super().__init__()
        for name, value, low in (("batch_size", batch_size, 1), ("initial_labels", initial_labels, 0),
                                 ("query_size", query_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"ActiveLearningDataModule({name}={value!r}): expected an int >= {low}")
        if isinstance(val_split, bool) or not isinstance(val_split, (int, float)) or not 0 <= val_split < 1:
            raise ValueError(f"ActiveLearningDataModule(val_split={val_split!r}): expected a fraction in [0, 1)")
        if isinstance(dataset_or_datamodule, DataModule):
            self.source: Optional[DataModule] = dataset_or_datamodule
            self.dataset: Optional[Dataset] = None
        elif hasattr(dataset_or_datamodule, "__getitem__") and hasattr(dataset_or_datamodule, "__len__"):
            self.source, self.dataset = None, dataset_or_datamodule
        else:
            raise TypeError(
                "ActiveLearningDataModule needs a torch Dataset with __len__ or a DataModule, got "
                f"{type(dataset_or_datamodule).__name__}"
            )
        self.batch_size = batch_size
        self.initial_labels = initial_labels
        self.query_size = query_size
        self.val_split = float(val_split)
        self.seed = seed
        self.test_dataset = test_dataset
        self.labelled_step: Optional[torch.Tensor] = None  # int64 [len(dataset)]
        self.queries = 0
        if self.dataset is not None:
            self._init_pools()

    # ----------------------------------------------------------------- set-up
    def prepare_data(self) -> None:
        if self.source is not None:
            self.source.prepare_data()

    def setup(self, stage: str) -> None:
        if self.source is None or self.dataset is not None:
            return
        self.source.trainer = self.trainer
        self.source.setup("fit")
        loader = self.source.train_dataloader()
        dataset = getattr(loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"ActiveLearningDataModule: {type(self.source).__name__}.train_dataloader() returned a "
                f"{type(loader).__name__} without a sized `.dataset`; pass the Dataset itself"
            )
        self.dataset = dataset
        self._init_pools()

    def _init_pools(self) -> None:
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.labelled_step is not None:  # loaded from a checkpoint before setup
            self._check_length(self.labelled_step, n)
            return
        if self.initial_labels > n:
            raise ValueError(f"ActiveLearningDataModule(initial_labels={self.initial_labels}) exceeds the "
                             f"{n} items of the dataset")
        self.labelled_step = torch.full((n,), -1, dtype=torch.int64)
        generator = torch.Generator().manual_seed(self.seed)
        self.labelled_step[torch.randperm(n, generator=generator)[: self.initial_labels]] = 0

    def _pools(self) -> torch.Tensor:
        if self.labelled_step is None:
            raise RuntimeError("ActiveLearningDataModule: the pools exist once setup() has run (trainer.fit does it)")
        return self.labelled_step

    # ------------------------------------------------------------------ pools
    @property
    def labelled_indices(self) -> List[int]:
        """Dataset indices of the labelled pool, ascending."""
        return torch.nonzero(self._pools() >= 0).flatten().tolist()

    @property
    def unlabelled_indices(self) -> List[int]:
        """Dataset indices of the unlabelled pool, ascending (the rows of a prediction)."""
        return torch.nonzero(self._pools() < 0).flatten().tolist()

    @property
    def has_labelled_data(self) -> bool:
        return bool((self._pools() >= 0).any())

    @property
    def has_unlabelled_data(self) -> bool:
        return bool((self._pools() < 0).any())

    @property
    def has_test(self) -> bool:
        return self.test_dataset is not None or (
            self.source is not None and is_overridden("test_dataloader", self.source, DataModule))

    def label(self, indices: Sequence[int]) -> None:
        """Label the items at these dataset indices (one query: they record its number)."""
        pools = self._pools()
        wanted = torch.as_tensor(list(indices), dtype=torch.int64)
        if wanted.numel() == 0:
            return
        bad = wanted[(wanted < 0) | (wanted >= pools.numel())]
        if bad.numel():
            raise IndexError(f"ActiveLearningDataModule.label(): index {int(bad[0])} is outside the dataset "
                             f"(0..{pools.numel() - 1})")
        if wanted.unique().numel() != wanted.numel():
            raise ValueError(f"ActiveLearningDataModule.label(): indices repeat: {wanted.tolist()}")
        again = wanted[pools[wanted] >= 0]
        if again.numel():
            raise ValueError(f"ActiveLearningDataModule.label(): item {int(again[0])} is already labelled "
                             f"(query {int(pools[again[0]])})")
        self.queries += 1
        pools[wanted] = self.queries

    # ---------------------------------------------------------------- loaders
    def _split(self) -> tuple:
        labelled = self.labelled_indices
        n_val = int(len(labelled) * self.val_split)
        order = torch.randperm(len(labelled), generator=torch.Generator().manual_seed(self.seed)).tolist()
        val = sorted(labelled[i] for i in order[:n_val])
        train = sorted(labelled[i] for i in order[n_val:])
        return train, val

    def _loader(self, indices: List[int], shuffle: bool = False) -> DataLoader:
        return DataLoader(Subset(self.dataset, indices), batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> Optional[DataLoader]:
        train, _ = self._split()
        return self._loader(train, shuffle=True) if train else None

    def val_dataloader(self) -> Optional[DataLoader]:
        _, val = self._split()
        return self._loader(val) if val else None

    def test_dataloader(self) -> Any:
        if self.test_dataset is not None:
            return DataLoader(self.test_dataset, batch_size=self.batch_size)
        if self.source is not None and is_overridden("test_dataloader", self.source, DataModule):
            return self.source.test_dataloader()
        return None

    def predict_dataloader(self) -> Optional[DataLoader]:
        pool = self.unlabelled_indices
        return self._loader(pool) if pool else None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        return {"labelled_step": self._pools().clone(), "queries": self.queries}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        steps = state_dict["labelled_step"]
        if self.dataset is not None:
            self._check_length(steps, len(self.dataset))  # type: ignore[arg-type]
        self.labelled_step = steps.clone().to(torch.int64)
        self.queries = int(state_dict["queries"])

    @staticmethod
    def _check_length(steps: torch.Tensor, n: int) -> None:
        if steps.numel() != n:
            raise ValueError(f"ActiveLearningDataModule: the saved pools cover {steps.numel()} items but the "
                             f"dataset has {n}; it is not the dataset of that checkpoint")
