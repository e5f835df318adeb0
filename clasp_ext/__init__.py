"""clasp_ext: lossless self-speculative decoding by in-context layer skip (CLaSp).

Decoding: ``clasp_ext.generate(model, input_ids, **knobs)`` and ``clasp_ext.ClaspDecoder`` for
serving loops (``clasp_ext.decoding``); ``clasp_ext.hf`` plugs it into ``model.generate``. The
compiled ops live in ``torch.ops.clasp`` and are wrapped with docstrings in ``clasp_ext.ops``;
``clasp_ext.reference`` holds their pure-PyTorch references.

``import clasp_ext`` loads only torch and the ops. The decoding names (and ``hf``) need
transformers and are imported on first access (PEP 562 ``__getattr__``), so the ops can be used
where transformers is not installed.
"""

from __future__ import annotations

import importlib

from clasp_ext import ops, reference
from clasp_ext._C_loader import build_info
from clasp_ext.ops import (
    cosine_scores,
    layer_importance,
    skip_search_backtrack,
    skip_search_step,
    verify_greedy,
    verify_sample,
)

__version__ = "0.1.0"

# name -> the module it is imported from on first access (these modules import transformers)
_LAZY_NAMES = {
    "BatchDecoder": "clasp_ext.decoding",
    "ClaspConfig": "clasp_ext.decoding",
    "ClaspDecoder": "clasp_ext.decoding",
    "ClaspOutput": "clasp_ext.decoding",
    "ClaspStats": "clasp_ext.decoding",
    "UnsupportedModelError": "clasp_ext.decoding",
    "generate": "clasp_ext.decoding",
}
# submodules that import transformers, importable as attributes (clasp_ext.hf)
_LAZY_SUBMODULES = ("decoding", "hf")

__all__ = [
    "BatchDecoder",
    "ClaspConfig",
    "ClaspDecoder",
    "ClaspOutput",
    "ClaspStats",
    "UnsupportedModelError",
    "build_info",
    "cosine_scores",
    "generate",
    "hf",
    "layer_importance",
    "ops",
    "reference",
    "skip_search_backtrack",
    "skip_search_step",
    "verify_greedy",
    "verify_sample",
]


def __getattr__(name: str):
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    elif name in _LAZY_SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_LAZY_SUBMODULES))
