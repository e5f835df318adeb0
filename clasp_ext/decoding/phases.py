"""The phases both decoding loops share (loop.py: one sequence; batch.py: many): the acceptance
of a verified round and the cut of emitted tokens at a stop. One implementation each, so the
batch-1 and the batched loop cannot drift apart on what makes them lossless."""

from __future__ import annotations

import torch
from torch import Tensor

from clasp_ext import ops


def process_logits(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Temperature, top-k, top-p (transformers' warper semantics, in that order) -> float32
    probabilities. Applied identically to the draft and the target."""
    x = logits.float() / temperature
    V = x.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, idx = torch.sort(x, dim=-1, descending=False)
        cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1.0 - top_p)
        remove[..., -1:] = False
        x = x.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))
    return x.softmax(dim=-1)


def accept(
    config,
    logits: Tensor,
    drafts: Tensor,
    num_draft: Tensor,
    seq_lens: Tensor,
    q: Tensor | None,
    generators: list[torch.Generator],
) -> tuple[Tensor, Tensor]:
    """The verdict on one round of B rows (SPEC section 1): greedy (``clasp.verify_greedy``) or
    speculative sampling (``clasp.verify_sample`` on the processed target p and proposals q
    [B, K, V], zeros for none; row b's uniforms from ``generators[b]``). ``logits`` [B, K+1, V]
    are the full model's, processed already where a logits processor applies. Returns
    (accepted int32 [B], tokens int64 [B, K+1]); ``seq_lens`` is advanced in place."""
    if config.greedy:
        return ops.verify_greedy(drafts, num_draft, logits, seq_lens)
    B, K = drafts.shape
    p = process_logits(logits, config.temperature, config.top_k, config.top_p)
    if q is None:
        q = p.new_zeros(B, K, p.shape[-1])
    u = torch.stack([torch.rand(K + 1, 2, generator=g, device=logits.device) for g in generators])
    return ops.verify_sample(drafts, num_draft, q, p, u, seq_lens)


def cut_at_stop(tokens: list[int], eos: set[int], remaining: int) -> list[int]:
    """Emitted tokens up to and including the first EOS, and at most ``remaining``: exact, never
    past either (a round may verify tokens beyond them)."""
    for i, t in enumerate(tokens):
        if t in eos:
            tokens = tokens[: i + 1]
            break
    return tokens[:remaining]
