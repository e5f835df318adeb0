"""``python -m clasp_ext calibrate``: measure (or read back) the cost table that
``ClaspConfig(policy="cost")`` decides from, print it and where it is cached."""

from __future__ import annotations

import torch

from clasp_ext.cli.models import DTYPES


def add_parser(sub) -> None:
    c = sub.add_parser("calibrate", help="measure and cache the cost table of policy='cost'")
    c.add_argument("--model", default="qwen2.5-coder-1.5b", help="a known model name or folder")
    c.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    c.add_argument("--device", default="cpu")
    c.add_argument("--num-skip-layers", type=int, default=None)
    c.add_argument("--skip-ratio", type=float, default=None)
    c.add_argument("--max-draft", type=int, default=None)
    c.add_argument("--max-lookup", type=int, default=None)
    c.add_argument("--draft-vocab-size", type=int, default=None)
    c.add_argument("--draft-weights", choices=("original", "int8"), default=None)
    c.add_argument("--refresh", action="store_true", help="measure again, replacing the cache")


def run(args, load_model, out) -> int:
    from clasp_ext.decoding import ClaspDecoder

    model, _ = load_model(args.model, DTYPES[args.dtype], args.device)
    knobs = (
        "num_skip_layers",
        "skip_ratio",
        "max_draft",
        "max_lookup",
        "draft_vocab_size",
        "draft_weights",
    )
    overrides = {k: getattr(args, k) for k in knobs if getattr(args, k) is not None}
    dec = ClaspDecoder(model, **overrides)  # "fixed": measures nothing until asked
    table = dec.calibrate(refresh=args.refresh)
    s = table.setup
    out.write(
        f"[calibrate] {s['model']} {s['dtype']} on {s['device_name']}, {s['threads']} threads, "
        f"{s['attn_implementation']}, M = {s['num_skip']} of {s['num_layers']} layers skipped, "
        f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}\n"
        f"{table.describe()}\n[calibrate] cache: {table.path or '(not saved)'}\n"
    )
    return 0
