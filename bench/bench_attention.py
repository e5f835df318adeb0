"""One decoding forward with the packed grouped-query sdpa (clasp_ext/decoding/attention.py)
against transformers' sdpa (K/V repeated per query head), the only difference between the two:
ragged batches of B rows, T new tokens per row, over a cache of ``context`` slots (random K/V:
the time does not depend on the values). Interleaved, repeated; prints medians and the ratio.

    python bench/bench_attention.py --batch-sizes 1 4 8 --tokens 1 2 5 17 --contexts 128 1024
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_e2e import machine_description  # noqa: E402

from clasp_ext.cli import models  # noqa: E402
from clasp_ext.decoding.adapter import ModelAdapter  # noqa: E402
from clasp_ext.decoding.attention import PACKED_GQA_SDPA  # noqa: E402
from clasp_ext.timing import median_time  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(models.DTYPES))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 5, 17])
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = models.load(args.model, models.DTYPES[args.dtype])
    a = ModelAdapter(model)
    if a.masked_attn_implementation != PACKED_GQA_SDPA:
        sys.exit(f"{args.model}: its attention does not run the packed sdpa; nothing to compare")
    m = machine_description(args.threads)
    print(f"{m['cpu']} ({torch.backends.cpu.get_cpu_capability()}), {args.threads} threads, torch "
          f"{m['torch']}, transformers {m['transformers']}; {args.model} {args.dtype}, ragged "
          f"forward (ModelAdapter.forward), median of {args.repeats} interleaved")  # fmt: skip
    print(f"{'B':>3} {'T':>3} {'context':>7} {'packed ms':>10} {'sdpa ms':>9} {'sdpa/packed':>11}")
    cfg = model.config
    H = cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for B in args.batch_sizes:
            for ctx in args.contexts:
                cap = ctx + max(args.tokens) + 1
                cache = a.new_cache(cap, batch=B)
                for i in range(a.num_layers):
                    cache.keys[i] = torch.randn(B, H, cap, D, generator=gen).to(a.dtype)
                    cache.values[i] = torch.randn(B, H, cap, D, generator=gen).to(a.dtype)
                for T in args.tokens:
                    ids = torch.randint(0, a.vocab_size, (B, T), generator=gen)
                    starts = torch.full((B,), ctx, dtype=torch.int32)

                    def forward(ids=ids, starts=starts, cache=cache, kv_len=ctx + T):
                        a.forward(ids, starts, cache, kv_len=kv_len)

                    times = {PACKED_GQA_SDPA: [], "sdpa": []}
                    for r in range(args.repeats):
                        order = list(times) if r % 2 == 0 else list(times)[::-1]
                        for impl in order:
                            a.set_masked_attention(impl)
                            times[impl].append(median_time(forward, a.device, 1, warmup=r == 0))
                    a.set_masked_attention(PACKED_GQA_SDPA)
                    packed, sdpa = (statistics.median(times[k]) for k in times)
                    print(
                        f"{B:>3} {T:>3} {ctx:>7} {packed * 1e3:>10.1f} {sdpa * 1e3:>9.1f} "
                        f"{sdpa / packed:>10.2f}x",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
