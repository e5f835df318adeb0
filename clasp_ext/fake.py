"""Fake (meta) implementations of the `clasp` ops, for torch.compile and CUDA graphs.

They compute output shapes and dtypes only; input validation with full messages happens in the
real kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from clasp_ext import _C_loader  # noqa: F401  (the schemas must exist before the fakes)


def _check(cond: bool, msg: str) -> None:
    torch._check(cond, lambda: msg)


@torch.library.register_fake("clasp::cosine_scores")
def _cosine_scores(candidates: Tensor, target: Tensor) -> Tensor:
    _check(candidates.dim() == 3, "clasp::cosine_scores: `candidates` must have rank 3")
    _check(target.dim() == 2, "clasp::cosine_scores: `target` must have rank 2")
    return candidates.new_empty(candidates.shape[:2], dtype=torch.float32)


@torch.library.register_fake("clasp::layer_importance")
def _layer_importance(hidden: Tensor) -> Tensor:
    _check(hidden.dim() == 3, "clasp::layer_importance: `hidden` must have rank 3")
    return hidden.new_empty((hidden.shape[0], hidden.shape[1] - 1), dtype=torch.float32)


@torch.library.register_fake("clasp::skip_search_step")
def _skip_search_step(prev: Tensor, computed: Tensor, target: Tensor, layer: int):
    _check(prev.dim() == 3, "clasp::skip_search_step: `prev` must have rank 3")
    B, W, _ = prev.shape
    return (
        torch.empty_like(prev, memory_format=torch.contiguous_format),
        prev.new_empty((B, W), dtype=torch.uint8),
        prev.new_empty((B, W), dtype=torch.float32),
    )


@torch.library.register_fake("clasp::skip_search_backtrack")
def _skip_search_backtrack(choices: Tensor, num_skip: int) -> Tensor:
    _check(choices.dim() == 3, "clasp::skip_search_backtrack: `choices` must have rank 3")
    return choices.new_empty(choices.shape[:2], dtype=torch.bool)


def _verify_outputs(draft_tokens: Tensor, num_draft: Tensor) -> tuple[Tensor, Tensor]:
    B, K = draft_tokens.shape
    return num_draft.new_empty((B,)), draft_tokens.new_empty((B, K + 1))


@torch.library.register_fake("clasp::verify_greedy")
def _verify_greedy(draft_tokens, num_draft, target_logits, seq_lens):
    _check(draft_tokens.dim() == 2, "clasp::verify_greedy: `draft_tokens` must have rank 2")
    return _verify_outputs(draft_tokens, num_draft)


@torch.library.register_fake("clasp::verify_sample")
def _verify_sample(draft_tokens, num_draft, draft_probs, target_probs, uniforms, seq_lens):
    _check(draft_tokens.dim() == 2, "clasp::verify_sample: `draft_tokens` must have rank 2")
    return _verify_outputs(draft_tokens, num_draft)
