"""``python -m clasp_ext calibrate``: measure (or read back) the cost table that
``ClaspConfig(policy="cost")`` decides from, print it and where it is cached."""

from __future__ import annotations

import torch

from clasp_ext.cli import options
from clasp_ext.cli.models import DTYPES


def add_parser(sub) -> None:
    c = sub.add_parser("calibrate", help="measure and cache the cost table of policy='cost'")
    options.add_model_args(c)
    options.add_setup_knobs(c)
    c.add_argument("--refresh", action="store_true", help="measure again, replacing the cache")


def run(args, load_model, out) -> int:
    from clasp_ext.decoding import ClaspDecoder

    model, _ = load_model(args.model, DTYPES[args.dtype], args.device)
    overrides = options.given(args, options.SETUP_KNOBS)
    # "fixed" builds no table on construction (the table does not depend on the policy), so a
    # --refresh measures once
    dec = ClaspDecoder(model, policy="fixed", **overrides)
    table = dec.calibrate(refresh=args.refresh)
    s = table.setup
    out.write(
        f"[calibrate] {s['model']} {s['dtype']} on {s['device_name']}, {s['threads']} threads, "
        f"{s['attn_implementation']}, M = {s['num_skip']} of {s['num_layers']} layers skipped, "
        f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}\n"
        f"{table.describe()}\n[calibrate] cache: {table.path or '(not saved)'}\n"
    )
    return 0
