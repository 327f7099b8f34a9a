"""Does a second live thread that has run ATen ops slow this thread's small training steps?

Times a raw tiny-MLP loop (32->64->10, batch 64, Adam) on the main thread (a), then while a
thread that ran a few matmuls (so it owns an OpenMP team) is blocked (b), then after that thread
has exited (c); medians of 7 blocks of 300 steps each, ratio b / mean(a, c) so that a drift of
the machine does not read as an effect. See benchmarks/RESULTS.md for the figures: the reason
the bench harness runs every contender on one thread.
Run: ``python benchmarks/thread_interference.py``.
"""
from __future__ import annotations

import statistics
import threading
import time

import torch
import torch.nn.functional as F
from torch import nn


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = [(torch.randn(64, 32), torch.randint(0, 10, (64,))) for _ in range(64)]

    def block(steps: int = 300) -> float:
        start = time.perf_counter()
        for i in range(steps):
            x, y = batches[i % len(batches)]
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return (time.perf_counter() - start) / steps * 1e6

    alone = statistics.median(block() for _ in range(7))
    release, started = threading.Event(), threading.Event()

    def other() -> None:
        a = torch.randn(256, 256)
        for _ in range(50):
            a @ a
        started.set()
        release.wait()

    thread = threading.Thread(target=other, daemon=True)
    thread.start()
    started.wait()
    with_thread = statistics.median(block() for _ in range(7))
    release.set()
    thread.join()
    after = statistics.median(block() for _ in range(7))
    print(f"threads {torch.get_num_threads()}: alone {alone:.0f} us/step, with a blocked ATen thread alive "
          f"{with_thread:.0f}, after it exited {after:.0f} ({2 * with_thread / (alone + after):.2f}x)")


if __name__ == "__main__":
    main()
