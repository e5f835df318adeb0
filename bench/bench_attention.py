"""One decoding forward with the packed grouped-query sdpa (clasp_ext/decoding/attention.py)
against transformers' sdpa (K/V repeated per query head), the only difference between the two:
ragged batches of B rows, T new tokens per row, over a cache of ``context`` slots (random K/V:
the time does not depend on the values). Interleaved, repeated; prints medians and the ratio,
and writes them to ``--out`` (.json, .md) when given.

    python bench/bench_attention.py --model qwen2.5-coder-1.5b --contexts 128 1024
    python bench/bench_attention.py --random-shape llama3.2-1b --device cuda --contexts 1024 4096
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_e2e import machine_description  # noqa: E402
from bench_step_costs import add_model_arguments, load_model  # noqa: E402

from clasp_ext.cli import models  # noqa: E402
from clasp_ext.decoding.adapter import ModelAdapter  # noqa: E402
from clasp_ext.decoding.attention import PACKED_GQA_SDPA  # noqa: E402
from clasp_ext.timing import median_time  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 5, 17])
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="output prefix (.json, .md)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev, dtype = torch.device(args.device), models.DTYPES[args.dtype]
    model = load_model(args, dev)
    name = args.model or f"random {args.random_shape}"
    a = ModelAdapter(model)
    if a.masked_attn_implementation != PACKED_GQA_SDPA:
        sys.exit(f"{name}: its attention does not run the packed sdpa; nothing to compare")
    env = machine_description(args.threads)
    where = (
        torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"{env['cpu']}, {args.threads} threads"
    )
    head = (
        f"{where}, torch {env['torch']}, transformers {env['transformers']}; {name} {args.dtype}, "
        f"ragged forward (ModelAdapter.forward), median of {args.repeats} interleaved"
    )
    print(head)
    cols = f"| B | T | context | packed ms | sdpa ms | sdpa / packed |\n|{'---:|' * 6}"
    print(cols)
    cfg = model.config
    H = cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    gen = torch.Generator().manual_seed(0)
    results = []
    with torch.inference_mode():
        for B in args.batch_sizes:
            for ctx in args.contexts:
                cap = ctx + max(args.tokens) + 1
                cache = a.new_cache(cap, batch=B)
                for i in range(a.num_layers):
                    cache.keys[i] = torch.randn(B, H, cap, D, generator=gen).to(dev, dtype)
                    cache.values[i] = torch.randn(B, H, cap, D, generator=gen).to(dev, dtype)
                for T in args.tokens:
                    ids = torch.randint(0, a.vocab_size, (B, T), generator=gen).to(dev)
                    starts = torch.full((B,), ctx, dtype=torch.int32, device=dev)

                    def forward(ids=ids, starts=starts, cache=cache, kv_len=ctx + T):
                        a.forward(ids, starts, cache, kv_len=kv_len)

                    times = {PACKED_GQA_SDPA: [], "sdpa": []}
                    for r in range(args.repeats):
                        order = list(times) if r % 2 == 0 else list(times)[::-1]
                        for impl in order:
                            a.set_masked_attention(impl)
                            times[impl].append(median_time(forward, dev, 1, warmup=r == 0))
                    a.set_masked_attention(PACKED_GQA_SDPA)
                    packed, sdpa = (statistics.median(times[k]) for k in times)
                    row = dict(batch=B, tokens=T, context=ctx, packed_s=packed, sdpa_s=sdpa)
                    results.append(row)
                    print(
                        f"| {B} | {T} | {ctx} | {packed * 1e3:.1f} | {sdpa * 1e3:.1f} | "
                        f"{sdpa / packed:.2f}x |",
                        flush=True,
                    )
                del cache
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        env.update(model=name, dtype=args.dtype, device=where, command=" ".join(sys.argv))
        data = dict(environment=env, results=results)
        args.out.with_suffix(".json").write_text(json.dumps(data, indent=1))
        rows = [
            f"| {r['batch']} | {r['tokens']} | {r['context']} | {r['packed_s'] * 1e3:.1f} | "
            f"{r['sdpa_s'] * 1e3:.1f} | {r['sdpa_s'] / r['packed_s']:.2f}x |"
            for r in results
        ]
        args.out.with_suffix(".md").write_text("\n".join([head, "", cols, *rows, ""]))


if __name__ == "__main__":
    main()
