"""Command-line options that ``generate`` and ``calibrate`` share: which model to load, and the
ClaspConfig knobs that select a cost table's setup (skip count, draft lengths, draft head and
weights). Choices come from the library's own lists, so the two commands accept the same values."""

from __future__ import annotations

from clasp_ext.cli.models import DTYPES

DEFAULT_MODEL = "qwen2.5-coder-1.5b"
# the ClaspConfig fields add_setup_knobs adds, as argparse dest names
SETUP_KNOBS = (
    "num_skip_layers",
    "skip_ratio",
    "max_draft",
    "max_lookup",
    "draft_vocab_size",
    "draft_weights",
    "skip_unit",
)


def add_model_args(p) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="qwen2.5-coder-1.5b, gemma-3-270m, or a model folder (default %(default)s)",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--device", default="cpu")


def add_setup_knobs(p) -> None:
    from clasp_ext.decoding.config import SKIP_UNITS
    from clasp_ext.decoding.low_bit import DRAFT_WEIGHTS

    p.add_argument("--num-skip-layers", type=int, default=None)
    p.add_argument("--skip-ratio", type=float, default=None)
    p.add_argument("--max-draft", type=int, default=None)
    p.add_argument("--max-lookup", type=int, default=None, help="longest context-lookup draft")
    p.add_argument(
        "--draft-vocab-size", type=int, default=None, help="draft head vocabulary; 0 = full"
    )
    p.add_argument(
        "--draft-weights",
        choices=DRAFT_WEIGHTS,
        default=None,
        help="auto (default): int4 or int8 copies of the kept layers for draft steps, whichever "
        "measures faster (none where neither pays); int8; int4; original (verify always runs "
        "the model's weights)",
    )
    p.add_argument(
        "--skip-unit",
        choices=SKIP_UNITS,
        default=None,
        help="what a draft skips in a layer of its skip set: layer (default) or mlp (its MLP "
        "block only, its attention runs; measured slower than layer so far)",
    )


def given(args, names) -> dict:
    """{name: value} of the options among ``names`` that were set on the command line."""
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}
