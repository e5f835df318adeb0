"""CLaSp decoding for Hugging Face decoder-only causal LMs (batch size 1).

Public names (re-exported from ``clasp_ext``): ClaspConfig, ClaspDecoder, ClaspOutput, ClaspStats,
generate.
"""

from clasp_ext.decoding.adapter import ModelAdapter, UnsupportedModelError
from clasp_ext.decoding.config import ClaspConfig
from clasp_ext.decoding.kv_cache import ClaspKVCache
from clasp_ext.decoding.loop import (
    ClaspDecoder,
    ClaspOutput,
    ClaspStats,
    generate,
    process_logits,
)

__all__ = [
    "ClaspConfig",
    "ClaspDecoder",
    "ClaspKVCache",
    "ClaspOutput",
    "ClaspStats",
    "ModelAdapter",
    "UnsupportedModelError",
    "generate",
    "process_logits",
]
