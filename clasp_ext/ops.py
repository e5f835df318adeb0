"""Typed Python entry points of the `clasp` ops (SPEC.md section 5).

Each function calls ``torch.ops.clasp.<name>``, so it dispatches to the CPU or CUDA kernel by the
inputs' device and works under ``torch.compile`` through the fakes in ``clasp_ext.fake``.
Shapes: B batch, n candidates, d hidden size, L layers, M skipped layers, K draft tokens,
V vocabulary. Float inputs may be float32, float16 or bfloat16 (accumulation is always fp32) and
need a unit-stride last dimension; other dimensions may be strided.
"""

from __future__ import annotations

import torch
from torch import Tensor

from clasp_ext import (
    _C_loader,  # noqa: F401  (registers the ops)
    fake,  # noqa: F401  (registers the fakes)
)

_ops = torch.ops.clasp


def cosine_scores(candidates: Tensor, target: Tensor) -> Tensor:
    """Cosine similarity of every candidate with its sequence's target.

    candidates [B, n, d], target [B, d] -> float32 [B, n]. Denominators are clamped at 1e-8 like
    ``torch.nn.functional.cosine_similarity``.
    """
    return _ops.cosine_scores.default(candidates, target)


def layer_importance(hidden: Tensor) -> Tensor:
    """1 - cos(h_i, h_{i+1}) for every layer i, in one launch.

    hidden [B, L+1, d] (h_0 = embedding output, h_L = last layer output) -> float32 [B, L].
    """
    return _ops.layer_importance.default(hidden)


def skip_search_step(
    prev: Tensor, computed: Tensor, target: Tensor, layer: int
) -> tuple[Tensor, Tensor, Tensor]:
    """One row i = layer + 1 of the skip-set dynamic program (SPEC.md section 2).

    prev [B, M+1, d]: g(i-1, j) for j = 0..M (rows past min(i-1, M) are ignored).
    computed [B, l, d] with l = min(layer, M): computed[:, k] = f_layer(g(i-1, k+1)).
    target [B, d]: the verify pass's h_i (after the final norm at i = L, as are prev/computed).
    Returns (next [B, M+1, d] = g(i, j), choice uint8 [B, M+1] (1 = skip), score float32
    [B, M+1] = cos(g(i, j), h_i)). Unreachable cells (j > min(i, M)) get zeros, choice 0 and
    score -inf.
    """
    return _ops.skip_search_step.default(prev, computed, target, layer)


def skip_search_backtrack(choices: Tensor, num_skip: int) -> Tensor:
    """Skip mask from the DP's choice table: choices uint8 [B, L, M+1] -> bool [B, L].

    choices[:, i] is the ``choice`` output of the step for layer i. Backtracking starts at
    (L, num_skip), 0 <= num_skip <= min(M, L).
    """
    return _ops.skip_search_backtrack.default(choices, num_skip)


def verify_greedy(
    draft_tokens: Tensor, num_draft: Tensor, target_logits: Tensor, seq_lens: Tensor
) -> tuple[Tensor, Tensor]:
    """Greedy verification of one speculative round, fused.

    draft_tokens int64 [B, K], num_draft int32 [B] (0..K), target_logits [B, K+1, V],
    seq_lens int32 [B] (updated in place: += accepted + 1).
    Returns (accepted int32 [B], out_tokens int64 [B, K+1]): the accepted drafts, then the
    target's token at the first mismatch (or the bonus token), padded with -1. Argmax ties go to
    the lowest index; NaN counts as the largest value, like ``torch.argmax``.
    """
    return _ops.verify_greedy.default(draft_tokens, num_draft, target_logits, seq_lens)


def verify_sample(
    draft_tokens: Tensor,
    num_draft: Tensor,
    draft_probs: Tensor,
    target_probs: Tensor,
    uniforms: Tensor,
    seq_lens: Tensor,
) -> tuple[Tensor, Tensor]:
    """Speculative sampling of one round (Leviathan et al. 2023), fused.

    draft_probs [B, K, V] and target_probs [B, K+1, V] are the processed distributions q and p.
    uniforms float32 [B, K+1, 2] in [0, 1): [b, i, 0] tests draft i+1 (accept iff u * q < p),
    [b, i, 1] draws the residual normalize(max(0, p - q)) at the first rejection, or the bonus
    token from p when all num_draft drafts are accepted. Same outputs and in-place seq_lens
    update as ``verify_greedy``.
    """
    return _ops.verify_sample.default(
        draft_tokens, num_draft, draft_probs, target_probs, uniforms, seq_lens
    )


OP_NAMES = (
    "cosine_scores",
    "layer_importance",
    "skip_search_step",
    "skip_search_backtrack",
    "verify_greedy",
    "verify_sample",
)
