"""The phases of a round of the decoding loop (batch.py; one sequence is a batch of one): the
first token after a prefill, a layer-skip draft step, the acceptance of a verified round and the
cut of emitted tokens at a stop, each a plain function of its tensors. Row b of a batch draws its
randomness from ``generators[b]`` alone."""

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


def apply_processor(processor, ids: Tensor, logits: Tensor) -> Tensor:
    """A logits processor (transformers' ``LogitsProcessor`` protocol: ``(input_ids [1, n],
    scores [1, V] float32) -> scores``) over the last R positions of one sequence ``ids`` [1, n]:
    row r of ``logits`` [1, R, V] scores the token after ``ids[:, : n - R + 1 + r]``. On float32
    copies, as model.generate passes them (some processors write in place)."""
    n, R = ids.shape[1], logits.shape[1]
    rows = [
        processor(ids[:, : n - R + 1 + r], logits[:, r].to(torch.float32, copy=True))
        for r in range(R)
    ]
    return torch.stack(rows, 1)


def sample_rows(probs: Tensor, generators: list[torch.Generator]) -> Tensor:
    """One index per row of ``probs`` [B, V], row b drawn with ``generators[b]``: [B, 1]."""
    rows = zip(probs.split(1), generators, strict=True)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in rows])


def first_token(config, scores: Tensor, generators: list[torch.Generator]) -> Tensor:
    """The token after a prefill from the full model's (processed) scores [B, V]: the argmax, or
    a sample of temperature / top-k / top-p. [B, 1]."""
    if config.greedy:
        return scores.argmax(-1, keepdim=True)
    p = process_logits(scores, config.temperature, config.top_k, config.top_p)
    return sample_rows(p, generators)


def draft_step(
    config,
    forward,
    draft_head,
    tokens: Tensor,
    start,
    cache,
    skip: list[bool],
    generators: list[torch.Generator],
    *,
    kv_len: int | None = None,
    processor=None,
    want_top1: bool = False,
    alternatives: int = 0,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """One layer-skip draft step: the kept layers on ``tokens`` [B, 1] at ``start`` (an int, or
    per-row positions with ``kv_len``) by ``forward`` (``ModelAdapter.forward``, or the same on
    CUDA graphs: cuda_graphs.GraphedSteps.forward), then the draft head. Returns (the next
    draft tokens [B, 1] as full-vocabulary ids; their proposal distributions q [B, V] over the
    full vocabulary, None when greedy; the top-1 probabilities [B] when sampling or
    ``want_top1``, for the exit threshold). ``processor(full_logits [B, V]) -> [B, V]`` applies
    a logits processor (it indexes the full vocabulary, so the draft head's logits are widened
    first). Greedy with ``alternatives`` = w > 0, also the draft's next w tokens after the argmax,
    best first ([B, w], branches.py's siblings; else None)."""
    h, _ = forward(tokens, start, cache, skip=skip, kv_len=kv_len)
    logits = draft_head.logits(h)[:, -1]  # over the draft vocabulary
    to_ids, to_full = draft_head.token_ids, draft_head.full_probs
    if processor is not None:
        logits = processor(draft_head.full_logits(logits))
        to_ids = to_full = _unchanged
    if config.greedy:
        top1 = logits.float().softmax(-1).amax(-1) if want_top1 else None
        if alternatives > 0:  # the draft token and the next best, from one topk (no repeats)
            w = min(alternatives + 1, logits.shape[-1])
            best = torch.topk(logits, w, dim=-1).indices
            return to_ids(best[:, :1]), None, top1, to_ids(best[:, 1:])
        return to_ids(logits.argmax(-1, keepdim=True)), None, top1, None
    q = process_logits(logits, config.temperature, config.top_k, config.top_p)
    return to_ids(sample_rows(q, generators)), to_full(q), q.amax(-1), None


def _unchanged(x: Tensor) -> Tensor:
    return x


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
