"""The one timer and the one CPU-name reader of the package, shared by the cost model
(``clasp_ext.decoding.cost_model``) and the benchmarks in bench/. Needs torch only."""

from __future__ import annotations

import functools
import math
import platform
import statistics
import time
from pathlib import Path

import torch


@functools.cache
def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (else what the platform module knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_time(
    fn, device: torch.device, repeats: int, warmup: int = 0, cheap_s: float = math.inf
) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones, synchronizing a
    CUDA device around each call; the faster of the first two when the first takes more than
    ``cheap_s`` (an expensive measurement, where repeating costs most)."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):  # first-call allocations and kernel selection
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
        if len(times) == 2 and times[0] > cheap_s:
            return min(times)
    return statistics.median(times)
