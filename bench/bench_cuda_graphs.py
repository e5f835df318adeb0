"""The batched loop replayed from CUDA graphs (``ClaspConfig(cuda_graphs=True)``) against the same
loop launching its kernels eagerly and against ``model.generate`` on the same left-padded batch,
on one model and one set of requests.

Each batch size B decodes B random prompts (lengths 32..128) with policy="fixed" (every round
drafts and verifies, so both graphed steps run; ``--policy cost``: the default policy, what users
get), once per mode and repetition, interleaved with model.generate, on one
BatchDecoder per mode (graphs captured in its first run are replayed by the later ones). Reports
per B and mode the median generated tokens per second, the first run's extra seconds (the
captures), the rounds, and how many rows came out identical to the eager ones (random bf16
weights give near-flat logits, so a near-tie may split a row: tests/test_decoding_cuda.py checks
exactness in fp32). Writes JSON and a markdown table.

    python bench/bench_cuda_graphs.py --random-shape llama3.2-1b --device cuda --out $OUT/graphs

Without a GPU (``--device cpu``) the graphed mode runs the same static buffers without capture
(what the CPU can check; its time says nothing about graphs).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_e2e import machine_description  # noqa: E402
from bench_step_costs import add_model_arguments, load_model  # noqa: E402

from clasp_ext.decoding import BatchDecoder  # noqa: E402
from clasp_ext.timing import median_time  # noqa: E402

MODES = ("eager", "graphs")
# model.generate on the same prompts as one left-padded batch, greedy, exactly as many new tokens
# per row: the baseline issue 10's targets are stated against
BASELINE = "generate"


def decoder(model, mode: str, B: int, args) -> BatchDecoder:
    on_gpu = model.device.type == "cuda"
    dec = BatchDecoder(
        model,
        max_batch=B,
        max_cache_len=128 + args.new_tokens + 32,
        max_draft=args.max_draft,
        # fixed: every round drafts and verifies, so both graphed steps run; cost: the default
        # policy, which drafts only where its measured costs say it pays (the speed users get)
        **(dict(policy="fixed", draft_exit_threshold=0.0) if args.policy == "fixed" else {}),
        eos_token_id=[],
        cuda_graphs=mode == "graphs" and on_gpu,
    )
    if mode == "graphs" and not on_gpu:  # the static buffers, without capture
        dec.graphs = dec.graphed_steps(capture=False)
    return dec


def run_once(dec: BatchDecoder, prompts: list[list[int]], new_tokens: int):
    ids = [dec.add(p, max_new_tokens=new_tokens) for p in prompts]  # lists: any device
    rounds = dec.stats.rounds
    done = {f.request_id: f for f in dec.run()}
    return [done[i].tokens for i in ids], dec.stats.rounds - rounds


def run_generate(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """model.generate on ``prompts`` left-padded into one batch; each row's prompt + new tokens."""
    T = max(map(len, prompts))
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(p)
        mask[i, T - len(p) :] = 1
    out = model.generate(
        ids.to(model.device),
        attention_mask=mask.to(model.device),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # no EOS stop: every row decodes new_tokens, as the loop does
        pad_token_id=0,
    )
    return [p + out[i, T:].tolist() for i, p in enumerate(prompts)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--max-draft", type=int, default=6)
    p.add_argument("--policy", choices=["fixed", "cost"], default="fixed")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, required=True, help="output prefix (.json, .md)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    model = load_model(args, dev)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    results = []
    for B in args.batch_sizes:
        prompts = [
            torch.randint(3, vocab, (int(torch.randint(32, 129, (1,), generator=g)),), generator=g)
            for _ in range(B)
        ]
        prompts = [x.tolist() for x in prompts]
        decs = {m: decoder(model, m, B, args) for m in MODES}
        first, times, tokens, rounds = {}, {m: [] for m in (*MODES, BASELINE)}, {}, {}
        runs = {m: functools.partial(run_once, decs[m]) for m in MODES}
        runs[BASELINE] = lambda prompts, n: (run_generate(model, prompts, n), None)
        for rep in range(args.repeats + 1):  # repetition 0: first use (captures)
            for m, run in runs.items():
                box = {}

                def call(run=run, prompts=prompts, box=box):
                    box["out"] = run(prompts, args.new_tokens)

                t = median_time(call, dev, 1)
                tokens[m], rounds[m] = box["out"]
                (times[m] if rep else first.setdefault(m, [])).append(t)
        new = B * args.new_tokens
        row = dict(batch=B, new_tokens=new, rounds=rounds["eager"])
        for m in MODES:
            med = statistics.median(times[m])
            row[m] = dict(
                tokens_per_s=new / med,
                median_s=med,
                first_run_extra_s=first[m][0] - med,
                rounds=rounds[m],
            )
        med = statistics.median(times[BASELINE])
        row[BASELINE] = dict(tokens_per_s=new / med, median_s=med)
        graphs = decs["graphs"].graphs
        row["graphs_captured"] = graphs.captured
        row["graph_replays"] = graphs.replays
        pairs = zip(tokens["eager"], tokens["graphs"], strict=True)
        row["rows_identical"] = sum(a == b for a, b in pairs)
        row["speedup"] = row["graphs"]["tokens_per_s"] / row["eager"]["tokens_per_s"]
        # against model.generate on the same batch (rows equal to its rows: random bf16 weights
        # give near-flat logits, so a near-tie may split one; the tests check exactness)
        for m in MODES:
            row[m]["vs_generate"] = row[m]["tokens_per_s"] / row[BASELINE]["tokens_per_s"]
        pairs = zip(tokens["graphs"], tokens[BASELINE], strict=True)
        row["rows_equal_generate"] = sum(a == b for a, b in pairs)
        results.append(row)
        print(
            f"B={B}: eager {row['eager']['tokens_per_s']:.1f} tok/s, graphs "
            f"{row['graphs']['tokens_per_s']:.1f} tok/s ({row['speedup']:.2f}x), generate "
            f"{row[BASELINE]['tokens_per_s']:.1f} tok/s, captures "
            f"{row['graphs_captured']} (+{row['graphs']['first_run_extra_s']:.2f} s first run), "
            f"rows identical {row['rows_identical']}/{B}",
            flush=True,
        )
        write(args, results)  # after each batch size: a step timeout keeps what was measured


def write(args, results: list[dict]) -> None:
    dev = torch.device(args.device)
    env = machine_description(torch.get_num_threads())
    env.update(
        device=str(dev),
        model=args.model or f"random {args.random_shape}",
        dtype=args.dtype,
        max_draft=args.max_draft,
        policy=args.policy,
        capture=dev.type == "cuda",
    )
    out = dict(environment=env, results=results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=2))
    lines = [
        f"CUDA graphs vs eager rounds: {env['model']} {args.dtype} on "
        f"{env.get('gpu') or env['cpu']} (capture: {env['capture']}), policy {args.policy}, "
        f"max_draft {args.max_draft}, {args.new_tokens} new tokens per row, median of "
        f"{args.repeats}"
        + (
            " (first-run extra s: the captures and, on a fresh machine, the cost tables' "
            "measurement)"
            if args.policy == "cost"
            else ""
        ),
        "",
        "| B | generate tok/s | eager tok/s | graphs tok/s | graphs / eager | eager / generate "
        "| graphs / generate | rounds | captures | first-run extra s | rows graphs = eager "
        "| rows graphs = generate |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        b = r["batch"]
        lines.append(
            f"| {b} | {r[BASELINE]['tokens_per_s']:.1f} | {r['eager']['tokens_per_s']:.1f} | "
            f"{r['graphs']['tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
            f"{r['eager']['vs_generate']:.2f}x | {r['graphs']['vs_generate']:.2f}x | "
            f"{r['rounds']} | {r['graphs_captured']} | {r['graphs']['first_run_extra_s']:.2f} | "
            f"{r['rows_identical']}/{b} | {r['rows_equal_generate']}/{b} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
