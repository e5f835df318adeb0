"""How repeatable the cost table is: ``--runs`` calibrations of one setup in one process, the
package's (``cost_model.calibrate``: interleaved rounds, each length's fastest call) alternating
with the one it replaced (each length timed alone, one after another, median of 3), and for each
the spread across runs of the table's shape: verify(T) / verify(2) and verify(1) / verify(2).
The policy reads the shape (TimeScale corrects the level from the rounds' own times), so the
shape's spread is what moves its choices from one calibration to the next.

    python bench/bench_calibration.py --model qwen2.5-coder-1.5b --runs 6 \\
        --out bench/results/calibration-qwen2.5-coder-1.5b-bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # clasp_ext from this checkout

from bench_e2e import machine_description  # noqa: E402

from clasp_ext.cli import models  # noqa: E402
from clasp_ext.decoding import ClaspDecoder  # noqa: E402
from clasp_ext.decoding import cost_model as cm  # noqa: E402
from clasp_ext.timing import median_time  # noqa: E402


@torch.inference_mode()
def sequential(adapter, max_tokens: int, context: int, repeats: int) -> dict[int, float]:
    """The replaced measurement of the verify lengths: each T timed alone, one after another,
    the median of ``repeats`` (after one warm-up call)."""
    cache = adapter.new_cache(context + max_tokens + 2)
    ids = torch.randint(0, adapter.vocab_size, (1, max_tokens), generator=torch.Generator())

    def verify(T):
        h, _ = adapter.forward(ids[:, :T], context, cache, keep_hidden="all")
        return adapter.head(h).argmax(-1).tolist()

    out = {}
    for i, T in enumerate(cm.verify_lengths(max_tokens)):
        out[T] = median_time(lambda T=T: verify(T), adapter.device, repeats, warmup=int(i == 0))
    return out


def shape(verify_s: dict[int, float]) -> dict[int, float]:
    return {t: v / verify_s[2] for t, v in verify_s.items()}


def spread(tables: list[dict[int, float]]) -> dict[int, dict]:
    """Per T: min, max and the range over the median of the shapes (verify(T) / verify(2))."""
    shapes = [shape(t) for t in tables]
    out = {}
    for t in shapes[0]:
        xs = [s[t] for s in shapes]
        med = statistics.median(xs)
        out[t] = dict(min=min(xs), max=max(xs), range=(max(xs) - min(xs)) / med)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(models.DTYPES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=25, help="longest verify (default: 25)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = models.load(args.model, dtype=models.DTYPES[args.dtype])
    dec = ClaspDecoder(model, policy="fixed")
    loop = dec.loop
    a, M = loop.adapter, loop.config.num_skip_layers
    runs = {"interleaved": [], "sequential": []}
    for r in range(args.runs):
        order = ["interleaved", "sequential"][:: 1 if r % 2 == 0 else -1]
        for name in order:
            if name == "interleaved":
                t = cm.calibrate(a, loop.draft_head, M, args.max_tokens, low_bit=loop.low_bit)
                v = t.verify_s
            else:
                v = sequential(a, args.max_tokens, cm.DEFAULT_CONTEXT, cm.DEFAULT_REPEATS)
            runs[name].append(v)
            cells = " ".join(f"{t}:{s * 1e3:.0f}" for t, s in v.items())
            print(f"[calibration] run {r + 1} {name:>11}: verify ms {cells}", flush=True)
    result = dict(
        meta=dict(
            command="python " + " ".join(sys.argv),
            machine=machine_description(args.threads),
            model=args.model,
            dtype=args.dtype,
            num_skip=M,
            draft_weights=dec.config.draft_weights,
        ),
        runs=runs,
        spread={name: spread(tables) for name, tables in runs.items()},
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# Cost-table repeatability: {args.model} {args.dtype}",
        "",
        f"{result['meta']['machine']['cpu']}, {args.threads} threads, torch {torch.__version__}, "
        f"commit {result['meta']['machine']['git_commit']}. Command: `{result['meta']['command']}`",
        "",
        "verify(T) / verify(2) over the runs: min-max (range over the median)",
        "",
        "| method | " + " | ".join(f"T = {t}" for t in runs["interleaved"][0]) + " |",
        "|---|" + "---|" * len(runs["interleaved"][0]),
    ]
    for name, sp in result["spread"].items():
        cells = [f"{s['min']:.2f}-{s['max']:.2f} ({s['range']:.0%})" for s in sp.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (args.out / "calibration.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
