"""CLaSp decoding for Hugging Face decoder-only causal LMs: one loop over a batch with continuous
batching (batch.py), and one sequence streamed over it (loop.py).

Public names (re-exported from ``clasp_ext``): ClaspConfig, ClaspDecoder, ClaspOutput, ClaspStats,
BatchDecoder, generate.
"""

from clasp_ext.decoding.adapter import ModelAdapter, UnsupportedModelError
from clasp_ext.decoding.batch import BatchDecoder, BatchOutput, Finished, generate_batch
from clasp_ext.decoding.config import ClaspConfig
from clasp_ext.decoding.kv_cache import ClaspKVCache
from clasp_ext.decoding.loop import ClaspDecoder, ClaspOutput, generate
from clasp_ext.decoding.phases import process_logits
from clasp_ext.decoding.stats import ClaspStats

__all__ = [
    "BatchDecoder",
    "BatchOutput",
    "Finished",
    "ClaspConfig",
    "ClaspDecoder",
    "ClaspKVCache",
    "ClaspOutput",
    "ClaspStats",
    "ModelAdapter",
    "UnsupportedModelError",
    "generate",
    "generate_batch",
    "process_logits",
]
