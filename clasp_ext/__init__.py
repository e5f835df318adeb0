"""clasp_ext: lossless self-speculative decoding by in-context layer skip (CLaSp).

Decoding: ``clasp_ext.generate(model, input_ids, **knobs)`` and ``clasp_ext.ClaspDecoder`` for
serving loops (``clasp_ext.decoding``). The compiled ops live in ``torch.ops.clasp`` and are
wrapped with docstrings in ``clasp_ext.ops``; ``clasp_ext.reference`` holds their pure-PyTorch
references.
"""

from clasp_ext import ops, reference
from clasp_ext._C_loader import build_info
from clasp_ext.decoding import (
    ClaspConfig,
    ClaspDecoder,
    ClaspOutput,
    ClaspStats,
    UnsupportedModelError,
    generate,
)
from clasp_ext.ops import (
    cosine_scores,
    layer_importance,
    skip_search_backtrack,
    skip_search_step,
    verify_greedy,
    verify_sample,
)

__version__ = "0.1.0"

__all__ = [
    "ClaspConfig",
    "ClaspDecoder",
    "ClaspOutput",
    "ClaspStats",
    "UnsupportedModelError",
    "generate",
    "build_info",
    "cosine_scores",
    "layer_importance",
    "ops",
    "reference",
    "skip_search_backtrack",
    "skip_search_step",
    "verify_greedy",
    "verify_sample",
]
