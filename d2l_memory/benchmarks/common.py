"""Small helpers the benchmarks share: timing, peak memory, tables."""

from __future__ import annotations

import os
import platform
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime

import psutil


@contextmanager
def peak_rss() -> Iterator[dict[str, int]]:
    """Sample this process's resident memory every 5 ms; yields a dict filled with `peak` and `start`."""
    proc, result, stop = psutil.Process(), {"start": psutil.Process().memory_info().rss, "peak": 0}, threading.Event()

    def watch() -> None:
        while not stop.is_set():
            result["peak"] = max(result["peak"], proc.memory_info().rss)
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak"] = max(result["peak"], proc.memory_info().rss)


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Fastest wall time of `repeats` calls (seconds): the least disturbed run on a shared machine."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def environment() -> str:
    """One line naming the date, machine and commit a result was measured on."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip() or "uncommitted"
    except OSError:
        commit = "unknown"
    return (f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} CPUs, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, commit {commit}")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (what docs/benchmarks.md holds)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
