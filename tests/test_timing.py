"""The package's one timer (clasp_ext/timing.py): what median_time and median_times return and
in which order median_times calls its functions; the CPU description that names a machine in
results and cost-table keys."""

from __future__ import annotations

import torch

from clasp_ext import timing


def test_median_times_interleaves_and_takes_medians(monkeypatch):
    calls = []
    clock = {"t": 0.0}  # each call "takes" as many seconds as its name is long, on a fake clock
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["t"])

    def fn(name):
        def run():
            calls.append(name)
            clock["t"] += len(name)

        return run

    fns = {name: fn(name) for name in ("a", "bb", "ccc")}
    got = timing.median_times(fns, torch.device("cpu"), repeats=3, warmup=1)
    assert got == {"a": 1.0, "bb": 2.0, "ccc": 3.0}
    # one untimed round, then rounds whose order rotates: a drift hits every function alike
    assert calls == ["a", "bb", "ccc", "a", "bb", "ccc", "bb", "ccc", "a", "ccc", "a", "bb"]


def test_median_time_stops_early_when_expensive(monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["t"])
    n = {"calls": 0}

    def slow():
        n["calls"] += 1
        clock["t"] += 5.0 if n["calls"] == 1 else 4.0

    assert timing.median_time(slow, torch.device("cpu"), repeats=7, cheap_s=1.0) == 4.0
    assert n["calls"] == 2  # the faster of the first two, no more calls


XEON = "model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx2 avx512f avx512_bf16"
AMX_XEON, PLAIN_XEON = XEON + " amx_bf16 amx_tile\n", XEON + "\n"
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd sve i8mm bf16\n"


def test_matmul_flags_tell_apart_cpus_of_one_name():
    assert timing.matmul_flags_of(AMX_XEON) == ("amx_bf16", "avx512_bf16", "avx512f", "avx2")
    assert timing.matmul_flags_of(PLAIN_XEON) == ("avx512_bf16", "avx512f", "avx2")
    assert timing.matmul_flags_of(GRAVITON) == ("bf16", "i8mm", "sve")
    assert timing.matmul_flags_of("model name\t: something\n") == ()


def test_cost_table_key_names_the_matmul_flags(monkeypatch):
    """Two machines of one CPU name and torch capability (the AMX Xeon and the one without AMX
    of bench/results) must not share a cached cost table: their verify costs differ 1.7x."""
    from clasp_ext.decoding import cost_model

    names = set()
    for text in (AMX_XEON, PLAIN_XEON):
        monkeypatch.setattr(timing, "cpu_matmul_flags", lambda t=text: timing.matmul_flags_of(t))
        name = cost_model.device_name(torch.device("cpu"))
        assert name.startswith(timing.cpu_name())
        names.add(name)
    assert len(names) == 2
