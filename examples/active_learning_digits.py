"""Active learning on scikit-learn's bundled digits (8x8 images, no download): BALD against random.

A small CNN with dropout is trained from scratch each cycle on the labelled pool; the pool is
scored with MC dropout and the most informative samples are labelled. Both heuristics get the
same label budget and seeds; accuracy on a held-out test set is printed per cycle, averaged over
seeds, and plotted against the number of labelled samples.

Needs scikit-learn and matplotlib (not fastloop dependencies)::

    .venv/bin/python -m pip install scikit-learn matplotlib
    .venv/bin/python examples/active_learning_digits.py [--seeds 3] [--cycles 6] [--png digits_al.png]

Runs eagerly by default (a few seconds per configuration on a 2-core CPU; compiling would cost
more than it saves at this size); ``--mode compiled`` compiles the steps.
"""
import argparse
import os
import tempfile
import time
from typing import Dict, List, Tuple

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fastloop import Callback, Module, Trainer
from fastloop.active_learning import ActiveLearningDataModule, ActiveLearningLoop


class DigitsCNN(Module):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self(batch[0])  # logits; the loop turns them into probabilities

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def digits() -> Tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    test, pool = order[:500], order[500:]
    return TensorDataset(x[pool], y[pool]), TensorDataset(x[test], y[test])


class AccuracyPerCycle(Callback):
    def __init__(self) -> None:
        self.points: List[Tuple[int, float]] = []

    def on_test_end(self, trainer, module) -> None:
        labelled = len(trainer.datamodule.labelled_indices)
        self.points.append((labelled, float(trainer.callback_metrics["test_acc"])))


def run(heuristic: str, seed: int, cycles: int, initial: int, query: int, epochs: int, iterations: int,
        mode: str, batch_size: int) -> List[Tuple[int, float]]:
    torch.manual_seed(seed)
    pool, test = digits()
    dm = ActiveLearningDataModule(pool, batch_size=batch_size, initial_labels=initial, query_size=query, seed=seed,
                                  test_dataset=test)
    record = AccuracyPerCycle()
    trainer = Trainer(max_epochs=cycles, mode=mode, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[record])
    loop = ActiveLearningLoop(label_epoch_frequency=epochs, inference_iteration=iterations, heuristic=heuristic)
    loop.connect(trainer.fit_loop)
    trainer.fit_loop = loop
    trainer.fit(DigitsCNN(), datamodule=dm)
    return record.points


def plot(curves: Dict[str, List[Tuple[int, float]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        ax.plot([n for n, _ in points], [a for _, a in points], marker="o", label=name)
    ax.set_xlabel("labelled samples")
    ax.set_ylabel("test accuracy (mean over seeds)")
    ax.set_title("Active learning on digits: BALD vs random")
    ax.grid(alpha=0.3)
    ax.legend()
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)  # a reader sees the old plot or the whole new one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--cycles", type=int, default=6)
    parser.add_argument("--initial", type=int, default=20)
    parser.add_argument("--query", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=25, help="training epochs per cycle")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=10, help="MC-dropout passes")
    parser.add_argument("--mode", default="eager")
    parser.add_argument("--png", default="active_learning_digits.png")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: a model this small only loses to thread start-up and contention)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    curves: Dict[str, List[Tuple[int, float]]] = {}
    for heuristic in ("bald", "random"):
        runs = [run(heuristic, seed, args.cycles, args.initial, args.query, args.epochs, args.iterations, args.mode,
                    args.batch_size)
                for seed in range(args.seeds)]
        curves[heuristic] = [(runs[0][i][0], sum(r[i][1] for r in runs) / len(runs)) for i in range(len(runs[0]))]
    print(f"test accuracy, mean of {args.seeds} seeds")
    print("labelled  " + "  ".join(f"{name:>7}" for name in curves))
    for i, (labelled, _) in enumerate(curves["bald"]):
        print(f"{labelled:8d}  " + "  ".join(f"{curves[name][i][1]:7.4f}" for name in curves))
    plot(curves, args.png)
    print(f"plot: {args.png}; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
