"""One plain batched decoding step: the batched loop's ragged forward (per-row positions and
masks over the static cache, ``ModelAdapter.forward`` + the head) against ``model`` with a
DynamicCache of the left-padded batch (what ``model.generate`` runs per step), at the dev prompts'
lengths + 32 tokens. The caches hold random K/V (the time does not depend on the values); both
keep their length (the DynamicCache is cropped back after each step). Interleaved, repeated;
prints medians.

    python bench/bench_batch_step.py --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_e2e import DEFAULT_DATA, encode, load_prompts, machine_description  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from clasp_ext.cli import models  # noqa: E402
from clasp_ext.decoding.adapter import ModelAdapter  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(models.DTYPES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = models.DTYPES[args.dtype]
    model, tok = models.load(args.model, dtype)
    chosen = sorted(load_prompts(DEFAULT_DATA, 2, 0), key=lambda r: r["group"])
    chosen = [chosen[i] for i in sorted(range(len(chosen)), key=lambda i: (i % 2, i))]
    lens = [encode(tok, r["turns"][0], chat=True)[0].shape[0] + 32 for r in chosen][: args.batch]
    B = len(lens)
    a = ModelAdapter(model)
    cfg = model.config
    H = cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    T = max(lens)
    cache = a.new_cache(T + 16, batch=B)
    hf = DynamicCache()
    for i in range(a.num_layers):
        cache.keys[i] = torch.randn(B, H, T + 16, D, dtype=dtype)
        cache.values[i] = torch.randn(B, H, T + 16, D, dtype=dtype)
        hf.update(torch.randn(B, H, T, D, dtype=dtype), torch.randn(B, H, T, D, dtype=dtype), i)
    starts = torch.tensor(lens, dtype=torch.int32)
    ids = torch.randint(0, 1000, (B, 1))
    mask = torch.zeros(B, T + 1, dtype=torch.long)
    for b, n in enumerate(lens):
        mask[b, T - n :] = 1
    pos = (mask.cumsum(-1) - 1)[:, -1:]

    def ours():
        h, _ = a.forward(ids, starts, cache, kv_len=T + 1)
        return a.head(h)

    def generate_step():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=hf)
        hf.crop(-1)
        return out.logits

    res = {"batched loop": [], "model (generate's step)": []}
    with torch.inference_mode():
        ours(), generate_step()
        for _ in range(args.repeats):
            for name, fn in zip(res, (ours, generate_step), strict=True):
                t = time.perf_counter()
                for _ in range(3):
                    fn()
                res[name].append((time.perf_counter() - t) / 3)
    m = machine_description(args.threads)
    print(f"{m['cpu']}, {args.threads} threads, torch "
          f"{m['torch']}, transformers {m['transformers']}; {args.model} {args.dtype}, B = {B}, "
          f"context {min(lens)}..{T}")  # fmt: skip
    for name, v in res.items():
        runs = [round(x * 1e3) for x in v]
        print(f"{name}: {statistics.median(v) * 1e3:.1f} ms per step (runs: {runs})")


if __name__ == "__main__":
    main()
