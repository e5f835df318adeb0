"""End-to-end benchmark: CLaSp against the alternatives a user has, on a real model and a
Spec-Bench-style prompt set, greedy, every method on every prompt in one process.

Methods run interleaved per prompt (and in a rotated order from prompt to prompt), so machine
drift hits them all alike; speedups are per-prompt wall-time ratios against ``ar`` measured back to
back (where a near-tie changed the output's length, against ar's time to as many tokens, from its
per-token timestamps; e2e_report.speedup). ``--repeats N`` runs every method N times per prompt,
interleaved (each repetition in the reverse order of the one before), and keeps each method's
median run: one run's time on this shared machine moves by more than the methods differ.
Writes ``records.json`` (machine, command, every per-prompt record), ``table.md`` and
``speedup.png`` to ``--out``, after every prompt, so an interrupted run keeps what it measured.

    python bench/bench_e2e.py --model qwen2.5-coder-1.5b --dtype bfloat16 --per-category 4 \\
        --max-new-tokens 128 --out bench/results/e2e-qwen2.5-coder-1.5b-bf16

Sweeps are the same script with ClaspConfig overrides in the method specs:

    python bench/bench_e2e.py --methods ar clasp:num_skip_layers=6 clasp:num_skip_layers=10 ...
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # e2e_methods, e2e_report beside us
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # clasp_ext from this checkout

import e2e_methods  # noqa: E402
import e2e_report  # noqa: E402
import transformers  # noqa: E402

from clasp_ext.cli import models  # noqa: E402
from clasp_ext.decoding.adapter import ModelAdapter  # noqa: E402
from clasp_ext.timing import cpu_description  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "spec_bench_dev.jsonl"
DEFAULT_METHODS = [
    "ar",
    "clasp",
    "clasp-static",
    "clasp-importance",
    "clasp-random",
    "pld",
    "early-exit",
]
MT_BENCH = {
    "writing",
    "roleplay",
    "reasoning",
    "math",
    "coding",
    "extraction",
    "stem",
    "humanities",
}
GROUPS = ["mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"]


def group_of(category: str) -> str:
    return "mt_bench" if category in MT_BENCH else category


def load_prompts(path: Path, per_category: int | None, seed: int) -> list[dict]:
    """The first turn of each question; ``per_category`` prompts drawn per group with ``seed``
    (MT-bench's eight categories round-robin, so a small sample still spans them)."""
    if not path.exists():
        raise SystemExit(f"bench_e2e: prompt file {path} not found (pass --data)")
    rows = [json.loads(line) for line in path.open() if line.strip()]
    by_group: dict[str, list[dict]] = {}
    for r in rows:
        r["group"] = group_of(r["category"])
        by_group.setdefault(r["group"], []).append(r)
    rng = random.Random(seed)
    chosen = []
    for g in [*GROUPS, *sorted(set(by_group) - set(GROUPS))]:
        items = by_group.get(g, [])
        if per_category is not None:
            if g == "mt_bench":
                cats: dict[str, list[dict]] = {}
                for r in items:
                    cats.setdefault(r["category"], []).append(r)
                for v in cats.values():
                    rng.shuffle(v)
                order = [v for _, v in sorted(cats.items())]
                items = [v[i] for i in range(max(map(len, order))) for v in order if i < len(v)]
            else:
                items = rng.sample(items, len(items))
            items = items[:per_category]
        chosen += items
    return chosen


def encode(tok, text: str, chat: bool) -> torch.Tensor:
    if chat:
        out = tok.apply_chat_template(
            [{"role": "user", "content": text}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        return out["input_ids"]
    return tok(text, return_tensors="pt")["input_ids"]


def machine_description(threads: int) -> dict:
    cpu = cpu_description()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    d = dict(
        cpu=cpu,
        logical_cpus=os.cpu_count(),
        torch_threads=threads,
        torch=torch.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        git_commit=commit,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name()
    return d


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def near_tie(model, ids: torch.Tensor, prefix: list[int]) -> dict:
    """The full model's top-2 logit gap where an output first differs from ``ar`` (one forward of
    the model itself over the prompt and the common prefix), in units of the dtype's spacing at
    the top logit: SPEC section 4 allows a difference only where the two are (nearly) tied."""
    seq = torch.cat([ids, torch.tensor([prefix], dtype=ids.dtype, device=ids.device)], 1)
    logits = model(input_ids=seq).logits[0, -1]
    top2 = torch.topk(logits.float(), 2).values
    gap = float(top2[0] - top2[1])
    finfo = torch.finfo(logits.dtype)
    ulp = max(abs(float(top2[0])), finfo.tiny) * finfo.eps  # spacing near the top logit
    return dict(gap=gap, gap_ulps=gap / ulp, near_tie=gap <= 2 * ulp)


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-1.5b", help="a known name or a model folder")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(models.DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--per-category", type=int, default=None, help="prompts per group (default all)")
    p.add_argument("--categories", nargs="*", default=None, help=f"subset of {GROUPS}")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--seed", type=int, default=0, help="prompt sampling seed")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (pinned)")
    p.add_argument("--no-chat", action="store_true", help="raw prompts, no chat template")
    p.add_argument("--warmup-tokens", type=int, default=8)
    p.add_argument(
        "--repeats",
        type=_positive,
        default=1,
        help="runs of every method per prompt, interleaved (the next in reverse order); a "
        "record is its median run (e2e_methods.median_run), all walls in wall_s_runs",
    )
    p.add_argument("--out", type=Path, required=True, help="results folder")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, set(range(min(args.threads, os.cpu_count() or 1))))
    methods = [e2e_methods.parse_method(m) for m in args.methods]
    labels = [m[0] for m in methods]
    if "ar" not in labels:
        raise SystemExit("bench_e2e: the 'ar' method is the baseline; include it in --methods")
    prompts = load_prompts(args.data, args.per_category, args.seed)
    if args.categories:
        unknown = set(args.categories) - set(GROUPS)
        if unknown:
            raise SystemExit(f"bench_e2e: unknown categories {sorted(unknown)}; known: {GROUPS}")
        prompts = [p for p in prompts if p["group"] in args.categories]
    if not prompts:
        raise SystemExit("bench_e2e: no prompts selected")

    model, tok = models.load(args.model, dtype=models.DTYPES[args.dtype], device=args.device)
    model.eval()
    chat = not args.no_chat and getattr(tok, "chat_template", None) is not None
    gc = model.generation_config
    eos = gc.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = gc.pad_token_id if gc.pad_token_id is not None else (eos[0] if eos else None)
    default_clasp = next((o for label, _, o in methods if label == "clasp"), {})
    num_layers = ModelAdapter(model).num_layers
    exit_layer = e2e_methods.early_exit_layer(num_layers, default_clasp)

    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(
        command="python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        machine=machine_description(args.threads),
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        chat_template=chat,
        max_new_tokens=args.max_new_tokens,
        methods=labels,
        early_exit_layer=exit_layer,
        num_layers=num_layers,
        prompts=len(prompts),
        per_category=args.per_category,
        seed=args.seed,
        repeats=args.repeats,
    )
    print(
        f"bench_e2e: {len(prompts)} prompts x {len(labels)} methods on {args.model} "
        f"{args.dtype} {args.device}, {args.threads} threads, chat template: {chat}"
    )

    with torch.inference_mode():
        # warm-up: every method once on a short generation (allocator, kernels, lazy imports)
        ids = encode(tok, "Say hello.", chat).to(args.device)
        wctx = e2e_methods.Context(args.warmup_tokens, eos, pad, 0, exit_layer)
        for _label, fn, ov in methods:
            e2e_methods.run_method(fn, ov, model, ids, wctx)

        records = []
        t_start = time.perf_counter()
        runs_total = len(prompts) * len(methods) * args.repeats
        bar = tqdm(total=runs_total, unit="run", dynamic_ncols=True)
        for pi, prompt in enumerate(prompts):
            ids = encode(tok, prompt["turns"][0], chat).to(args.device)
            ctx = e2e_methods.Context(args.max_new_tokens, eos, pad, pi, exit_layer)
            # rotate the order so no method always runs first (after a model switch, say)
            order = methods[pi % len(methods) :] + methods[: pi % len(methods)]
            runs = {label: [] for label in labels}
            # ABBA: over an even count of repeats, what drifts within a prompt hits all alike
            for rep in range(args.repeats):
                for label, fn, ov in order if rep % 2 == 0 else order[::-1]:
                    bar.set_description(f"{prompt['group'][:12]:12s} {label[:24]:24s}")
                    runs[label].append(e2e_methods.run_method(fn, ov, model, ids, ctx))
                    bar.update(1)
            results = {label: e2e_methods.median_run(rs) for label, rs in runs.items()}
            ref = results["ar"].new_tokens
            ties: dict[int, dict] = {}  # first-difference position -> the full model's top-2 gap
            for label in labels:
                r = results[label]
                d = first_difference(r.new_tokens, ref)
                if d is not None and d not in ties and d < len(ref):
                    ties[d] = near_tie(model, ids, ref[:d])
                rec = dict(
                    prompt_key=f"{prompt['question_id']}",
                    question_id=prompt["question_id"],
                    category=prompt["category"],
                    group=prompt["group"],
                    method=label,
                    prompt_tokens=int(ids.shape[1]),
                    num_new_tokens=len(r.new_tokens),
                    wall_s=r.wall_s,
                    speedup=e2e_report.speedup(
                        dict(
                            wall_s=results["ar"].wall_s,
                            num_new_tokens=len(ref),
                            token_times=results["ar"].token_times,
                        ),
                        dict(wall_s=r.wall_s, num_new_tokens=len(r.new_tokens)),
                    ),
                    equal_to_ar=d is None,
                    first_difference=d,
                    divergence=ties.get(d),
                    wall_s_runs=[x.wall_s for x in runs[label]],
                    # greedy runs of one method can still differ where the policy's timed
                    # choices change the verify's shapes at a near-tie
                    runs_agree=all(x.new_tokens == r.new_tokens for x in runs[label]),
                    **{k: v for k, v in vars(r).items() if k not in ("new_tokens", "wall_s")},
                    new_tokens=r.new_tokens,
                )
                records.append(rec)
            _save(args, meta, records, labels, time.perf_counter() - t_start)
            s = {r["method"]: r["speedup"] for r in records[-len(labels) :]}  # this prompt's
            bar.write(
                f"[{pi + 1}/{len(prompts)}] {prompt['group']:14s} "
                + " ".join(f"{k}={s[k]:.2f}x" for k in labels if k != "ar")
            )
        bar.close()
    rows = _save(args, meta, records, labels, time.perf_counter() - t_start)
    print((args.out / "table.md").read_text())
    mism = [r for r in records if not r["equal_to_ar"] and r["method"].startswith("clasp")]
    if mism:
        ties = sum(1 for r in mism if (r["divergence"] or {}).get("near_tie"))
        print(
            f"bench_e2e: {len(mism)} clasp outputs differ from ar, {ties} of them at a near-tie of "
            "the full model (top-2 logits within 2 units of the dtype's spacing); see "
            "first_difference and divergence in records.json (SPEC section 4)"
        )
    return rows


def _save(args, meta, records, labels, elapsed):
    rows = e2e_report.summarize(records, labels, GROUPS)
    meta = dict(meta, elapsed_s=round(elapsed, 1), records=len(records))
    (args.out / "records.json").write_text(
        json.dumps(dict(meta=meta, summary=rows, records=records), indent=1)
    )
    m = meta["machine"]
    header = (
        f"# End-to-end: {meta['model']} {meta['dtype']} on {meta['device']}\n\n"
        f"{m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}, transformers "
        f"{m['transformers']}, commit {m['git_commit']}, {m['date']}. Greedy, "
        f"{meta['max_new_tokens']} new tokens at most, chat template: {meta['chat_template']}, "
        f"early-exit layer {meta['early_exit_layer']} of {meta['num_layers']}. "
        f"Speedup = geometric mean over prompts of ar wall time / method wall time (where a "
        f"near-tie changed an output's length: ar's time to as many new tokens), measured back "
        f"to back in one process"
        + (
            f", each method's median of {meta['repeats']} interleaved runs per prompt"
            if meta.get("repeats", 1) > 1
            else ""
        )
        + ".\n\n"
        f"Command: `{meta['command']}`"
    )
    (args.out / "table.md").write_text(e2e_report.markdown(rows, labels, GROUPS, header))
    e2e_report.chart(
        rows,
        labels,
        GROUPS,
        args.out / "speedup.png",
        f"{meta['model']} {meta['dtype']} {meta['device']}: speedup over ar",
    )
    return rows


if __name__ == "__main__":
    main()
