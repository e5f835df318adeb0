"""The one timer and the one CPU description of the package, shared by the cost model
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


# The CPU flags that decide how fast the decoding forwards' bf16 / int8 matmuls run. One model name
# and one torch capability can hide them: two 2-core VMs both named "Intel(R) Xeon(R) Processor",
# both AVX512 to torch, verified 17 bf16 tokens at 1.06 and 1.80 plain steps; the first had AMX.
MATMUL_FLAGS = (
    "amx_bf16",
    "amx_int8",
    "avx512_bf16",
    "avx512_fp16",
    "avx512_vnni",
    "avx512f",
    "avx2",
    "bf16",  # aarch64 (the "Features" line)
    "i8mm",
    "sve2",
    "sve",
)


def matmul_flags_of(cpuinfo: str) -> tuple[str, ...]:
    """Which of ``MATMUL_FLAGS`` a /proc/cpuinfo text lists (its first flags line: x86's
    "flags", aarch64's "Features")."""
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            have = set(line.split(":", 1)[1].split())
            return tuple(f for f in MATMUL_FLAGS if f in have)
    return ()


@functools.cache
def cpu_matmul_flags() -> tuple[str, ...]:
    """``matmul_flags_of`` this machine's /proc/cpuinfo (empty where it cannot be read)."""
    try:
        return matmul_flags_of(Path("/proc/cpuinfo").read_text())
    except OSError:
        return ()


def cpu_description() -> str:
    """The CPU as results and cost-table keys name it: model, torch's capability, matmul flags."""
    flags = " ".join(cpu_matmul_flags()) or "flags unknown"
    return f"{cpu_name()} ({torch.backends.cpu.get_cpu_capability()}; {flags})"


def _timed(fn, device: torch.device) -> float:
    """Seconds of one call of ``fn``, synchronizing a CUDA device around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def median_time(
    fn, device: torch.device, repeats: int, warmup: int = 0, cheap_s: float = math.inf
) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones, synchronizing a
    CUDA device around each call; the faster of the first two when the first takes more than
    ``cheap_s`` (an expensive measurement, where repeating costs most)."""
    for _ in range(warmup):  # first-call allocations and kernel selection
        fn()
    times = []
    for _ in range(repeats):
        times.append(_timed(fn, device))
        if len(times) == 2 and times[0] > cheap_s:
            return min(times)
    return statistics.median(times)


def interleaved_times(
    fns: dict, device: torch.device, counts, warmup: int = 1, rotation: int = 0
) -> dict:
    """Seconds of each call of ``fns`` (name -> function): ``counts`` timed calls of each (an int,
    or name -> int), in rounds that call every function still short of its count once, in an
    order rotating from round to round, after ``warmup`` untimed rounds of all. A shared machine
    whose speed drifts within the measurement moves them all together, so their ratios hold
    where separate ``median_time`` runs would each catch a different speed. ``rotation``: the
    first round's (to go on from an earlier call's rounds)."""
    names = list(fns)
    want = dict.fromkeys(names, counts) if isinstance(counts, int) else dict(counts)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict = {name: [] for name in names}
    for r in range(rotation, rotation + max(want.values(), default=0)):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if len(times[name]) < want[name]:
                times[name].append(_timed(fns[name], device))
    return times


def median_times(fns: dict, device: torch.device, repeats: int, warmup: int = 1) -> dict:
    """Median seconds of each of ``fns`` (name -> function) over ``repeats`` interleaved calls
    (``interleaved_times``)."""
    times = interleaved_times(fns, device, repeats, warmup)
    return {name: statistics.median(ts) for name, ts in times.items()}
