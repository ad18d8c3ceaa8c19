"""What every benchmark shares: a resource sampler, the training loop's batch order, the results table, the machine."""

from __future__ import annotations

import os
import platform
import random
import threading
import time


class ResourceSampler:
    """Peak resident memory of this process between start and stop (sampled), its
    increase over the start, and the CPU share: CPU time over wall time × threads,
    well below 1 when neighbours took the cores."""

    def __init__(self, interval_s: float = 0.05, threads: int = 1):
        import psutil

        self.process = psutil.Process()
        self.interval_s = interval_s
        self.threads = threads
        self.start = self.peak = self.process.memory_info().rss
        self.cpu_start, self.wall_start = sum(self.process.cpu_times()[:2]), time.perf_counter()
        self.cpu_share = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "ResourceSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        cpu = sum(self.process.cpu_times()[:2]) - self.cpu_start
        self.cpu_share = cpu / ((time.perf_counter() - self.wall_start) * self.threads)

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20

    @property
    def increase_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def batches(examples, steps: int, batch_size: int, seed: int):
    """The example order of `trainer._loop`: reshuffled passes drawn from random.Random(seed)."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        yield [examples[i] for i in order[:batch_size]]
        order = order[batch_size:]


def mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def print_rows(title: str, rows: list[tuple]) -> None:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    print("\n" + title + "\n" + "-" * len(title))
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def machine(**versions: str | None) -> dict:
    import psutil

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), **versions}
