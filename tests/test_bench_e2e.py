"""The end-to-end benchmark's bookkeeping (bench/e2e_report.py, bench/bench_e2e.py's prompt
sampling and method specs) on synthetic records: the numbers in the README come from here."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_e2e  # noqa: E402
import e2e_methods  # noqa: E402
import e2e_report  # noqa: E402


def rec(qid, group, method, wall, tokens=10, rounds=None, drafted=None, accepted=None, eq=True):
    r = dict(
        prompt_key=str(qid),
        group=group,
        method=method,
        wall_s=wall,
        num_new_tokens=tokens,
        equal_to_ar=eq,
        divergence=None if eq else dict(near_tie=True, gap=0.0),
        rounds=rounds,
        drafted=drafted,
        accepted=accepted,
        round_tokens=None if rounds is None else tokens - 1,
        dp_runs=None,
        times={},
    )
    if rounds is not None:
        r["dp_runs"] = 2
        r["times"] = dict(prefill=0.1, draft=0.5 * wall, verify=0.3 * wall, dp=0.1, total=wall)
    return r


def test_speedup_is_per_new_token_where_a_near_tie_changed_the_length():
    """Equal outputs: the wall-time ratio. A method that passed ar's EOS at a near-tie and wrote
    twice the tokens in the same time is twice as fast per token, not level."""
    ar = rec(1, "qa", "ar", 2.0, tokens=10)
    assert e2e_report.speedup(ar, rec(1, "qa", "clasp", 1.0, tokens=10)) == pytest.approx(2.0)
    longer = rec(1, "qa", "clasp", 2.0, tokens=20, eq=False)
    assert e2e_report.speedup(ar, longer) == pytest.approx(2.0)
    rows = e2e_report.summarize([ar, longer], ["ar", "clasp"], ["qa"])
    assert {(r["group"], r["method"]): r["speedup"] for r in rows}[("qa", "clasp")] == 2.0


def test_speedup_of_a_different_length_uses_ars_time_to_as_many_tokens():
    """With ar's per-token timestamps, an output a near-tie ended early is compared with ar's time
    to the same number of tokens (the prefill charged to both alike); one that ran past ar's last
    token, with ar's mean decode step added for each extra token."""
    # ar: 4 s prefill, then 1 s per token: token k (1-based) at 4 + k seconds; 10 tokens, 14 s
    ar = rec(1, "summ", "ar", 14.0, tokens=10)
    ar["token_times"] = [4.0 + k for k in range(1, 11)]
    shorter = rec(1, "summ", "clasp", 3.0, tokens=5, eq=False)  # 5 tokens in 3 s; ar needs 9 s
    assert e2e_report.speedup(ar, shorter) == pytest.approx(9.0 / 3.0)
    longer = rec(1, "summ", "clasp", 8.0, tokens=12, eq=False)  # ar would need 14 + 2 s
    assert e2e_report.speedup(ar, longer) == pytest.approx(16.0 / 8.0)
    same = rec(1, "summ", "clasp", 7.0, tokens=10)
    assert e2e_report.speedup(ar, same) == pytest.approx(2.0)
    # per new token instead, the shorter output would read 2.8 / 1.4 / ... : prefill on 5 tokens
    del ar["token_times"]
    assert e2e_report.speedup(ar, shorter) == pytest.approx((14.0 / 10) / (3.0 / 5))


def test_ar_records_when_each_new_token_arrived():
    clock = e2e_methods._TokenClock()
    clock.put(torch.zeros(1, 7))  # the prompt
    clock.put(torch.zeros(1))
    clock.put(torch.zeros(1))
    assert len(clock.times) == 2 and 0 <= clock.times[0] <= clock.times[1]


def test_summary_speedup_is_the_geometric_mean_of_per_prompt_ratios():
    records = [
        rec(1, "qa", "ar", 2.0),
        rec(1, "qa", "clasp", 1.0, rounds=3, drafted=12, accepted=6),
        rec(2, "rag", "ar", 3.0),
        rec(2, "rag", "clasp", 4.0, rounds=3, drafted=9, accepted=6, eq=False),
    ]
    rows = e2e_report.summarize(records, ["ar", "clasp"], ["qa", "rag"])
    cell = {(r["group"], r["method"]): r for r in rows}
    assert cell[("qa", "clasp")]["speedup"] == pytest.approx(2.0)
    assert cell[("rag", "clasp")]["speedup"] == pytest.approx(0.75)
    overall = cell[("overall", "clasp")]
    assert overall["speedup"] == pytest.approx(math.sqrt(2.0 * 0.75))
    assert overall["speedup_min"] == pytest.approx(0.75)
    assert overall["tokens_per_s"] == pytest.approx(20 / 5.0)
    assert overall["tau"] == pytest.approx(18 / 6)  # round tokens over rounds, summed
    assert overall["acceptance"] == pytest.approx(12 / 21)
    assert overall["identical"] == 1 and overall["near_ties"] == 1
    assert overall["draft_share"] == pytest.approx(0.5)
    assert cell[("overall", "ar")]["speedup"] == pytest.approx(1.0)
    text = e2e_report.markdown(rows, ["ar", "clasp"], ["qa", "rag"], "# t")
    assert "| clasp | 1.22x |" in text
    assert "| clasp | 2.00x (3.0) | 0.75x (3.0) | 1.22x (3.0) |" in text


def test_prompt_sampling_spans_mt_bench_categories(tmp_path):
    rows = [
        dict(question_id=i, category=c, turns=[f"q{i}"])
        for i, c in enumerate(["writing"] * 3 + ["coding"] * 3 + ["math"] * 3 + ["qa"] * 5)
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    got = bench_e2e.load_prompts(path, 3, seed=0)
    mt = [p for p in got if p["group"] == "mt_bench"]
    assert sorted(p["category"] for p in mt) == ["coding", "math", "writing"]
    assert sum(p["group"] == "qa" for p in got) == 3
    assert got == bench_e2e.load_prompts(path, 3, seed=0)  # fixed seed, same sample
    assert len(bench_e2e.load_prompts(path, None, seed=0)) == len(rows)


def test_method_specs():
    label, fn, ov = e2e_methods.parse_method("clasp:num_skip_layers=10,draft_exit_threshold=0.6")
    assert label == "clasp:num_skip_layers=10,draft_exit_threshold=0.6"
    assert ov == dict(num_skip_layers=10, draft_exit_threshold=0.6)
    assert e2e_methods.parse_method("clasp-static")[2] == dict(skip_strategy="static")
    label, fn, ov = e2e_methods.parse_method("clasp-mlpskip:num_skip_layers=16")
    assert fn is e2e_methods._run_clasp  # run_method passes overrides to the library's runs only
    assert ov["skip_unit"] == "mlp" and ov["num_skip_layers"] == 16
    with pytest.raises(SystemExit, match="unknown method"):
        e2e_methods.parse_method("medusa")
    with pytest.raises(SystemExit, match="only clasp methods"):
        e2e_methods.parse_method("pld:max_draft=3")
    with pytest.raises(TypeError, match="unknown ClaspConfig field"):
        e2e_methods.parse_method("clasp:nonsense=1")


def test_first_difference():
    assert bench_e2e.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert bench_e2e.first_difference([1, 5, 3], [1, 2, 3]) == 1
    assert bench_e2e.first_difference([1, 2], [1, 2, 3]) == 2


def test_step_costs_script_runs_and_projects(tmp_path, monkeypatch):
    import bench_step_costs

    from clasp_ext.decoding import low_bit

    # tiny-llama's layers are below the size draft_weights="auto" measures: measure them anyway
    monkeypatch.setattr(low_bit, "AUTO_MIN_LAYER_BYTES", 0)

    records = dict(
        summary=[dict(group="overall", method="clasp", tau=3.0, speedup=1.1)],
        records=[dict(method="clasp", rounds=4, drafted=10, dp_runs=1)],
    )
    rec_path = tmp_path / "e2e" / "records.json"
    rec_path.parent.mkdir()
    rec_path.write_text(json.dumps(records))
    out = tmp_path / "steps"
    argv = ["--random-shape", "tiny-llama", "--dtype", "float32", "--context", "16"]
    argv += ["--repeats", "3", "--threads", "1", "--records", str(rec_path), "--out", str(out)]
    bench_step_costs.main(argv)
    data = json.loads((out / "step_costs.json").read_text())
    costs = data["costs"]
    assert set(costs["draft"]) == {"0", "2", "3", "4"}  # 0, 25%, 37.5%, 50% of 8 layers
    assert set(costs["dp"]) == {"2", "3", "4"}
    assert all(t > 0 for t in costs["verify"].values())
    # the low-bit draft steps run wherever this torch has the kernel (check_supported)
    assert all(t > 0 for t in costs["draft_low_bit"].values())
    assert "None" in costs["low_bit_linears"]  # the model's own weights, and each kind it has
    assert set(costs["low_bit_linears"]) <= {"None", "int8", "int4"}
    assert all(t > 0 for t in costs["low_bit_linears"].values())
    assert "One token through the linears" in (out / "step_costs.md").read_text()
    (p,) = data["projections"]
    assert p["drafted_per_round"] == pytest.approx(2.5) and p["dp_runs_per_round"] == 0.25
    k_draft = costs["draft"]["2"]
    verify = costs["verify"]["5"]  # the shortest measured verify of at least k + 1 = 3.5 tokens
    want = 3.0 * costs["ar"]["hf_step_s"] / (2.5 * k_draft + verify + 0.25 * costs["dp"]["2"])
    assert p["projected_speedup"] == pytest.approx(want)
    assert p["draft_steps_per_round"] == 2.5 and not p["draft_steps_counted"]  # an old record
    assert "Projected speedup" in (out / "step_costs.md").read_text()
    # a record that counts its draft forwards (lookup drafts run none) is charged those only
    records["records"][0]["draft_steps"] = 6
    rec_path.write_text(json.dumps(records))
    bench_step_costs.main(argv[:-1] + [str(tmp_path / "steps2")])
    data = json.loads((tmp_path / "steps2" / "step_costs.json").read_text())
    costs, (p,) = data["costs"], data["projections"]
    want = (
        3.0
        * costs["ar"]["hf_step_s"]
        / (1.5 * costs["draft"]["2"] + costs["verify"]["5"] + 0.25 * costs["dp"]["2"])
    )
    assert p["draft_steps_counted"] and p["projected_speedup"] == pytest.approx(want)


def test_cuda_graphs_script_runs(tmp_path):
    """bench_cuda_graphs.py (gpu_check's CUDA-graph step) on the CPU: both modes decode, the
    static-buffer rows equal the eager ones and model.generate's, and the table is written."""
    import bench_cuda_graphs

    out = tmp_path / "graphs"
    argv = ["--random-shape", "tiny-llama", "--dtype", "float32", "--device", "cpu"]
    argv += ["--batch-sizes", "1", "2", "--new-tokens", "8", "--repeats", "1", "--threads", "1"]
    bench_cuda_graphs.main(argv + ["--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["batch"] for r in data["results"]] == [1, 2]
    for r in data["results"]:
        assert r["rows_identical"] == r["batch"]
        assert r["graph_replays"] > 0 and r["graphs_captured"] == 0  # no capture on the CPU
        assert r["eager"]["tokens_per_s"] > 0 and r["graphs"]["tokens_per_s"] > 0
        # fp32: the loop's rows are model.generate's rows on the same padded batch
        assert r["rows_equal_generate"] == r["batch"] and r["generate"]["tokens_per_s"] > 0
    assert data["environment"]["capture"] is False
    assert "| 2 |" in out.with_suffix(".md").read_text()
    # the default policy (gpu_check's second run): rows still equal model.generate's
    argv[argv.index("--batch-sizes") : argv.index("--batch-sizes") + 3] = ["--batch-sizes", "1"]
    bench_cuda_graphs.main(argv + ["--policy", "cost", "--out", str(out) + "-cost"])
    data = json.loads((tmp_path / "graphs-cost.json").read_text())
    assert data["environment"]["policy"] == "cost"
    assert [r["rows_equal_generate"] for r in data["results"]] == [1]


def test_attention_script_runs(tmp_path):
    """bench_attention.py (gpu_check's attention step) on the CPU: every shape timed with both
    attention functions, the table written."""
    import bench_attention

    out = tmp_path / "attention"
    argv = ["--random-shape", "tiny-llama", "--dtype", "float32", "--batch-sizes", "1", "3"]
    argv += ["--tokens", "1", "3", "--contexts", "16", "--repeats", "2", "--threads", "1"]
    bench_attention.main(argv + ["--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    shapes = [(r["batch"], r["tokens"], r["context"]) for r in data["results"]]
    assert shapes == [(1, 1, 16), (1, 3, 16), (3, 1, 16), (3, 3, 16)]
    assert all(r["packed_s"] > 0 and r["sdpa_s"] > 0 for r in data["results"])
    assert data["environment"]["model"] == "random tiny-llama"
    assert "| 3 | 3 | 16 |" in out.with_suffix(".md").read_text()


def test_median_run_is_the_middle_wall_time():
    runs = [
        e2e_methods.MethodResult(new_tokens=[i], wall_s=w) for i, w in enumerate([3.0, 1.0, 2.0])
    ]
    assert e2e_methods.median_run(runs).new_tokens == [2]  # 2.0 s: the middle of three
    assert e2e_methods.median_run(runs[:2]).wall_s == 1.0  # of two, the faster
    assert e2e_methods.median_run(runs[:1]) is runs[0]
    with pytest.raises(ValueError):
        e2e_methods.median_run([])


def test_repeats_is_a_positive_count():
    assert bench_e2e.parse_args(["--out", "x"]).repeats == 1
    assert bench_e2e.parse_args(["--out", "x", "--repeats", "3"]).repeats == 3
    with pytest.raises(SystemExit):  # argparse's error: "must be at least 1"
        bench_e2e.parse_args(["--out", "x", "--repeats", "0"])
