"""Batched CLaSp: throughput at batch sizes 1, 2, 4, 8 against ``model.generate`` on the same
(left-padded) batch, and a serving scenario (requests arriving while others decode) against
serving them one by one. Greedy; every row is checked against ``model.generate`` on that prompt
alone (identical, or first different at a near-tie of the full model).

    python bench/bench_batch.py --model qwen2.5-coder-1.5b --dtype bfloat16 --prompts 8 \\
        --max-new-tokens 64 --out bench/results/batch-qwen2.5-coder-1.5b-bf16

The same ``--prompts`` prompts (spread over the Spec-Bench groups) run at every batch size, in
consecutive chunks of B; per chunk the two methods run back to back in alternating order, and a
batch size's ratio is the throughput of ``clasp`` over that of ``ar`` (generated tokens over
their total time), with and without the prefill: ``model.generate`` prefills the padded batch (B x
the longest prompt), the batched loop each prompt on its own row, so with prompts of unequal length
much of a batch's gain can be the prefill; ``ar``'s prefill is the time to its first scores
(a pass-through logits processor notes it), ``clasp``'s the time its prefills took. ``clasp`` is
``clasp_ext.generate``: ClaspDecoder at B = 1 (the batched loop with one row), BatchDecoder above.
Writes records.json and table.md to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_e2e import (  # noqa: E402
    DEFAULT_DATA,
    encode,
    first_difference,
    load_prompts,
    machine_description,
    near_tie,
)

import clasp_ext  # noqa: E402
from clasp_ext.cli import models  # noqa: E402
from clasp_ext.decoding import BatchDecoder, ClaspDecoder  # noqa: E402


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :] = torch.tensor(r)
        mask[b, T - len(r) :] = 1
    return ids, mask


def new_tokens(row: list[int], eos: set[int], pad: int, limit: int) -> list[int]:
    """A padded output row's new tokens up to and including its EOS."""
    out = []
    for t in row[:limit]:
        out.append(t)
        if t in eos:
            break
    return out


class _FirstScores:
    """A pass-through logits processor that notes when model.generate first scores: the end of
    its prefill, timed inside the same call (timing a separate forward of the padded batch and
    subtracting it left the decoding time a small difference of two noisy large ones)."""

    def __init__(self):
        self.at = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            self.at = time.perf_counter()
        return scores


def run_ar(model, rows, max_new, pad, eos):
    """model.generate on the left-padded batch; returns (new tokens per row, seconds to its
    first scores: the prefill), so decoding can be compared without it."""
    ids, mask = left_pad(rows, pad)
    first = _FirstScores()
    t = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=max_new,
        pad_token_id=pad,
        logits_processor=LogitsProcessorList([first]),
    )
    prefill = first.at - t
    return [new_tokens(r, eos, pad, max_new) for r in out[:, ids.shape[1] :].tolist()], prefill


def run_clasp(model, rows, max_new, pad, eos):
    ids, mask = left_pad(rows, pad)
    out = clasp_ext.generate(model, ids, attention_mask=mask, max_new_tokens=max_new)
    if isinstance(out, clasp_ext.ClaspOutput):
        return [out.sequences[0, ids.shape[1] :].tolist()], out.stats.as_dict()
    s = out.stats
    stats = dict(
        rounds=s.rounds,
        mean_batch=s.mean_batch,
        plain_rounds=s.plain_rounds,
        draft_lengths=s.draft_lengths,
        accepted=sum(f.stats.accepted for f in out.finished),
        drafted=sum(f.stats.drafted for f in out.finished),
        time_prefill=s.time_prefill,
        time_draft=s.time_draft,
        time_verify=s.time_verify,
    )
    return [f.new_tokens for f in out.finished], stats


def compare_skip_rules(model, rows, B, max_new, rules):
    """The batch's shared skip set by each ``batch_skip_rule``, with every round a layer-skip draft
    (policy="fixed", no lookup, so the rule alone differs): per rule, tokens/s, acceptance and the
    layers skipped. The chunks of B prompts run the rules back to back in alternating order."""
    out = {r: dict(time=0.0, tokens=0, drafted=0, accepted=0, skipped=[]) for r in rules}
    decoders = {}
    for rule in rules:
        dec = decoders[rule] = BatchDecoder(
            model,
            max_batch=B,
            max_new_tokens=max_new,
            policy="fixed",
            lookup_ngram=0,
            batch_skip_rule=rule,
        )
        if dec.low_bit is not None:  # every layer's low-bit copy now, not in a timed run
            for i in range(dec.adapter.num_layers):
                dec.low_bit._layer(i)
    for c0 in range(0, len(rows) - B + 1, B):
        order = rules if (c0 // B) % 2 == 0 else rules[::-1]
        for rule in order:
            dec = decoders[rule]
            dec.stats = type(dec.stats)()
            for r in rows[c0 : c0 + B]:
                dec.add(torch.tensor(r))
            t = time.perf_counter()
            dec.step()  # admits every row: the shared set is chosen from all B rows' DPs
            skipped = sum(dec.skip)
            done = dec.run()
            o = out[rule]
            o["time"] += time.perf_counter() - t - dec.stats.time_prefill
            o["tokens"] += sum(len(f.new_tokens) for f in done)
            o["drafted"] += sum(f.stats.drafted for f in done)
            o["accepted"] += sum(f.stats.accepted for f in done)
            o["skipped"].append(skipped)
            print(f"skip rule {rule} rows {c0}..{c0 + B - 1}: {skipped} layers skipped", flush=True)
    return out


def serving(model, prompts, max_new, gap_s, max_batch):
    """Requests arrive every ``gap_s`` seconds. ``one-by-one``: ClaspDecoder serves each in
    arrival order; ``batched``: one BatchDecoder admits each as it arrives. Latency = finish -
    arrival."""
    results = {}
    # one by one
    t0 = time.perf_counter()
    lat, outs = [], []
    dec = ClaspDecoder(model, max_new_tokens=max_new)
    for i, p in enumerate(prompts):
        arrival = t0 + i * gap_s
        while time.perf_counter() < arrival:
            time.sleep(0.005)
        outs.append(dec.generate(torch.tensor([p])).sequences[0, len(p) :].tolist())
        lat.append(time.perf_counter() - arrival)
    results["one-by-one"] = dict(makespan=time.perf_counter() - t0, latencies=lat, outputs=outs)
    # batched, joining as they arrive
    bd = BatchDecoder(model, max_batch=max_batch, max_new_tokens=max_new)
    t0 = time.perf_counter()
    arrivals, finish, added = {}, {}, 0
    outs = {}
    while added < len(prompts) or not bd.idle:
        now = time.perf_counter()
        while added < len(prompts) and now >= t0 + added * gap_s:
            rid = bd.add(torch.tensor(prompts[added]))
            arrivals[rid] = t0 + added * gap_s
            added += 1
        if bd.idle:
            time.sleep(0.005)
            continue
        for f in bd.step():
            finish[f.request_id] = time.perf_counter()
            outs[f.request_id] = f.new_tokens
    results["batched"] = dict(
        makespan=time.perf_counter() - t0,
        latencies=[finish[r] - arrivals[r] for r in sorted(finish)],
        outputs=[outs[r] for r in sorted(outs)],
        mean_batch=bd.stats.mean_batch,
    )
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(models.DTYPES))
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 2, 4, 8])
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--serving-requests", type=int, default=6)
    p.add_argument("--serving-gap", type=float, default=3.0, help="seconds between arrivals")
    p.add_argument(
        "--skip-rules",
        nargs="*",
        default=[],
        help="compare these batch_skip_rule values at --skip-rule-batch rows (fixed policy)",
    )
    p.add_argument("--skip-rule-batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = models.load(args.model, models.DTYPES[args.dtype])
    gc = model.generation_config
    eos = gc.eos_token_id
    eos = set([eos] if isinstance(eos, int) else (eos or []))
    pad = gc.pad_token_id if gc.pad_token_id is not None else min(eos, default=0)
    chosen = load_prompts(args.data, 2, 0)
    chosen = sorted(chosen, key=lambda r: r["group"])
    chosen = [chosen[i] for i in sorted(range(len(chosen)), key=lambda i: (i % 2, i))]
    chosen = chosen[: args.prompts]  # one per group first, then the second of each
    rows = [encode(tok, r["turns"][0], chat=True)[0].tolist() for r in chosen]
    meta = machine_description(args.threads)
    meta.update(
        command=" ".join(sys.argv),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        model=args.model,
        dtype=args.dtype,
        max_new_tokens=args.max_new_tokens,
        prompts=[r["question_id"] if "question_id" in r else r["group"] for r in chosen],
    )
    print(json.dumps(meta, indent=1), flush=True)
    N = args.max_new_tokens
    # warm-up: low-bit copies, cost tables at every batch size, first-call allocations
    with torch.inference_mode():
        for B in args.batch_sizes:
            t = time.perf_counter()
            run_clasp(model, [rows[0][:32]] * B, 8, pad, eos)
            run_ar(model, [rows[0][:32]] * B, 8, pad, eos)
            print(f"warm-up B={B}: {time.perf_counter() - t:.1f} s", flush=True)
    alone: dict[int, list[int]] = {}
    records = []
    with torch.inference_mode():
        for B in args.batch_sizes:
            methods = ["ar", "clasp"]
            for c0 in range(0, len(rows) - B + 1, B):
                chunk = list(range(c0, c0 + B))
                order = methods if (c0 // B) % 2 == 0 else methods[::-1]
                for m in order:
                    t = time.perf_counter()
                    if m == "ar":
                        outs, prefill = run_ar(model, [rows[i] for i in chunk], N, pad, eos)
                        dt = time.perf_counter() - t
                        stats = dict(time_prefill=prefill)
                    else:
                        outs, stats = run_clasp(model, [rows[i] for i in chunk], N, pad, eos)
                        dt = time.perf_counter() - t
                    if m == "ar" and B == 1:
                        alone[chunk[0]] = outs[0]
                    rec = dict(B=B, method=m, rows=chunk, time=dt, outputs=outs, stats=stats)
                    records.append(rec)
                    print(
                        f"B={B} rows {chunk} {m}: {dt:.1f} s, {sum(map(len, outs)) / dt:.2f} tok/s",
                        flush=True,
                    )
        # correctness: every row against model.generate on that prompt alone (B = 1 ar)
        for rec in records:
            rec["checks"] = []
            for i, out in zip(rec["rows"], rec["outputs"], strict=True):
                want = alone.get(i)
                if want is None:
                    continue
                d = first_difference(out, want)
                check = dict(row=i, identical=d is None)
                if d is not None:
                    ids = torch.tensor([rows[i]])
                    check.update(at=d, **near_tie(model, ids, want[:d]))
                rec["checks"].append(check)
        rules = None
        if args.skip_rules:
            rules = compare_skip_rules(model, rows, args.skip_rule_batch, N, args.skip_rules)
        serve = None
        if args.serving_requests:
            reqs = [rows[i % len(rows)] for i in range(args.serving_requests)]
            serve = serving(model, reqs, N, args.serving_gap, max_batch=4)
            for name, r in serve.items():
                print(
                    f"serving {name}: makespan {r['makespan']:.1f} s, mean latency "
                    f"{statistics.mean(r['latencies']):.1f} s",
                    flush=True,
                )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "records.json").write_text(
        json.dumps(dict(meta=meta, records=records, serving=serve, skip_rules=rules), indent=1)
    )
    table = report(records, serve, meta, rules, args.skip_rule_batch)
    (args.out / "table.md").write_text(table)
    print(table)


def report(records, serve, meta, rules=None, rule_batch=None) -> str:
    lines = [
        f"Machine: {meta['cpu']}, {meta['torch_threads']} threads, "
        f"torch {meta['torch']}, transformers {meta['transformers']}; {meta['model']} "
        f"{meta['dtype']}, {meta['max_new_tokens']} new tokens, greedy.",
        f"Command: `{meta['command']}`",
        "",
        "| B | method | tokens | time (s) | tokens/s | vs ar | prefill (s) | tokens/s after "
        "prefill | vs ar | rows identical / near-tie / other |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by = {}
    for r in records:
        by.setdefault((r["B"], r["method"]), []).append(r)

    def rates(rs):
        toks = sum(len(o) for r in rs for o in r["outputs"])
        t = sum(r["time"] for r in rs)
        pre = sum(r["stats"]["time_prefill"] for r in rs)
        return toks, t, pre, toks / t, toks / (t - pre)

    for (B, m), rs in by.items():
        toks, t, pre, rate, decode_rate = rates(rs)
        _, _, _, rate_ar, decode_ar = rates(by[(B, "ar")])
        checks = [c for r in rs for c in r["checks"]]
        same = sum(c["identical"] for c in checks)
        tie = sum((not c["identical"]) and c["near_tie"] for c in checks)
        other = len(checks) - same - tie
        lines.append(
            f"| {B} | {m} | {toks} | {t:.1f} | {rate:.2f} | {rate / rate_ar:.2f}x | {pre:.1f} | "
            f"{decode_rate:.2f} | {decode_rate / decode_ar:.2f}x | {same} / {tie} / {other} |"
        )
    if serve:
        lines += [
            "",
            "| serving | makespan (s) | mean latency (s) | max latency (s) |",
            "|---|---|---|---|",
        ]
        for name, r in serve.items():
            lat = r["latencies"]
            lines.append(
                f"| {name} | {r['makespan']:.1f} | {statistics.mean(lat):.1f} | {max(lat):.1f} |"
            )
    if rules:
        lines += [
            "",
            f"| batch_skip_rule (B = {rule_batch}, fixed policy, no lookup) | tokens/s after "
            "prefill | acceptance | layers skipped per chunk |",
            "|---|---|---|---|",
        ]
        for rule, o in rules.items():
            acc = o["accepted"] / o["drafted"] if o["drafted"] else 0.0
            lines.append(
                f"| {rule} | {o['tokens'] / o['time']:.2f} | {acc:.2f} | "
                f"{', '.join(map(str, o['skipped']))} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
