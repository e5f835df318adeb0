"""The package's one timer (clasp_ext/timing.py): what median_time and median_times return and
in which order median_times calls its functions."""

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
