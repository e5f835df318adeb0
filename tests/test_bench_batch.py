"""The batched benchmark's bookkeeping (bench/bench_batch.py): model.generate's prefill timed
inside its own call, each row's new tokens cut at its EOS, and the table's ratios."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
from decoding_models import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_batch  # noqa: E402


@torch.no_grad()
def test_run_ar_times_the_prefill_inside_generate(monkeypatch):
    model = tiny_model("llama")
    rows = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    # a slow prefill and fast steps: the time to generate's first scores is the prefill's
    real = model.forward
    calls = []

    def forward(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        calls.append(ids.shape[1])
        if ids.shape[1] > 1:
            time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    t = time.perf_counter()
    outs, prefill = bench_batch.run_ar(model, rows, 4, pad=0, eos={2})
    total = time.perf_counter() - t
    assert calls[0] == 6 and all(c == 1 for c in calls[1:])  # one padded prefill, then steps
    assert 1.0 <= prefill < total
    assert total - prefill < 1.0  # the decoding steps alone, without the prefill's sleep
    ids, mask = bench_batch.left_pad(rows, 0)
    want = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=4)
    for out, w in zip(outs, want[:, ids.shape[1] :].tolist(), strict=True):
        assert out == bench_batch.new_tokens(w, {2}, 0, 4)


def test_new_tokens_stop_after_eos():
    assert bench_batch.new_tokens([5, 2, 0, 0], {2}, 0, 4) == [5, 2]
    assert bench_batch.new_tokens([5, 6, 7, 8], {2}, 0, 3) == [5, 6, 7]


def test_report_ratios_with_and_without_prefill():
    def rec(method, time_s, prefill, tokens):
        stats = dict(time_prefill=prefill)
        return dict(B=2, method=method, time=time_s, outputs=[[1] * tokens], stats=stats, checks=[])

    meta = dict(
        cpu="x", cpu_capability="y", torch_threads=2, torch="t", transformers="v", model="m",
        dtype="bf16", max_new_tokens=8, command="c",
    )  # fmt: skip
    table = bench_batch.report([rec("ar", 10.0, 6.0, 40), rec("clasp", 5.0, 3.0, 40)], None, meta)
    line = next(x for x in table.splitlines() if "| clasp |" in x)
    cells = [c.strip() for c in line.split("|")]
    assert cells[6] == "2.00x"  # 40 / 5 against 40 / 10
    assert cells[9] == "2.00x"  # 40 / (5 - 3) against 40 / (10 - 6)
    assert pytest.approx(float(cells[8])) == 20.0
