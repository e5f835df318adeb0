"""Speculative sampling keeps the full model's distribution (SPEC section 1)."""

from __future__ import annotations

import math

import pytest
import torch
from decoding_models import tiny_model

from clasp_ext.decoding import ClaspDecoder, process_logits

torch.set_num_threads(1)


def chi2_critical(df: int, z: float = 3.719) -> float:
    """Wilson-Hilferty upper quantile of chi-square(df); z = 3.719 is p = 1e-4."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def assert_matches(counts: torch.Tensor, probs: torch.Tensor, what: str):
    """Pearson chi-square goodness of fit at p = 1e-4, and no mass where the model has none."""
    n = counts.sum().item()
    pos = probs > 0
    assert counts[~pos].sum() == 0, f"{what}: drew tokens the model gives zero probability"
    expected = probs[pos].double() * n
    stat = (((counts[pos].double() - expected) ** 2) / expected).sum().item()
    df = int(pos.sum()) - 1
    crit = chi2_critical(df)
    assert stat < crit, f"{what}: chi2 {stat:.1f} >= {crit:.1f} (df {df})"


@torch.no_grad()
def exact_marginals(model, prompt, V, proc):
    """P(t1), P(t2), P(t3) of ancestral sampling from the full model with processing ``proc``."""
    p1 = proc(model(prompt).logits[:, -1])[0]  # [V]
    seq2 = torch.cat([prompt.expand(V, -1), torch.arange(V)[:, None]], 1)
    p2_given = proc(model(seq2).logits[:, -1])  # [V, V]
    p12 = p1[:, None] * p2_given
    seq3 = torch.cat(
        [seq2.repeat_interleave(V, 0), torch.arange(V).repeat(V)[:, None]], 1
    )  # [V*V, T+2]
    p3_given = proc(model(seq3).logits[:, -1]).view(V, V, V)
    p3 = (p12[:, :, None] * p3_given).sum((0, 1))
    return p1, p12.sum(0), p3


@pytest.mark.parametrize(
    "family, temperature, top_k, top_p, sharpen, skip, draft_vocab, lookup, weights",
    [
        ("llama", 1.0, 0, 1.0, 4.0, [1, 2], 0, 0, "original"),
        ("gemma3", 0.8, 6, 0.9, 1.0, [0, 1, 2], 0, 0, "original"),
        # the draft scores ids 0..4 and the context's: q is zero on the rest of the vocabulary
        ("llama", 1.0, 0, 1.0, 2.0, [1, 2], 5, 0, "original"),
        # context lookup drafts first (a point-mass q) wherever the last token occurred before
        ("llama", 1.0, 0, 1.0, 2.0, [1, 2], 0, 2, "original"),
        # the draft on int8 / int4 copies of the kept layers and of the draft head (low_bit.py)
        ("llama", 1.0, 0, 1.0, 4.0, [1, 2], 5, 0, "int8"),
        ("llama", 1.0, 0, 1.0, 4.0, [1, 2], 5, 0, "int4"),
    ],
)
def test_first_tokens_distribution(
    family, temperature, top_k, top_p, sharpen, skip, draft_vocab, lookup, weights
):
    V = 8
    model = tiny_model(family, layers=4, vocab=V, seed=5)
    with torch.no_grad():  # target and draft distributions far enough apart to reject often
        model.lm_head.weight.mul_(sharpen)
    # with lookup, the prompt holds "1 v" for almost every v and ends in 1, so after most first
    # tokens v the bigram [1, v] matches and the round proposes the point mass on 1
    prompt = torch.tensor(
        [[1, 0, 1, 2, 1, 3, 1, 4, 1, 5, 1, 6, 1, 7, 1]] if lookup else [[3, 1, 4]]
    )
    dec = ClaspDecoder(
        model,
        skip_strategy=skip,  # a fixed, genuinely different draft model
        max_draft=2,
        draft_exit_threshold=0.0,
        max_new_tokens=3,
        eos_token_id=[],
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        draft_vocab_size=draft_vocab,
        lookup_ngram=lookup,
        draft_weights=weights,
        # the lookup row checks point-mass proposals, which "fixed" makes whenever a match is
        # there; the others run the default "cost" policy (on the tests' synthetic flat table)
        policy="fixed" if lookup else "cost",
    )
    dec.generator.manual_seed(1234)
    N = 1500
    counts = torch.zeros(3, V, dtype=torch.long)
    drafted = accepted = lookups = 0
    for _ in range(N):
        dec.prefill(prompt)
        while not dec.finished:
            dec.step()
        new = dec.tokens[prompt.shape[1] :]
        assert len(new) == 3
        for i, t in enumerate(new):
            counts[i, t] += 1
        drafted += dec.stats.drafted
        accepted += dec.stats.accepted
        lookups += dec.stats.lookup_rounds
    # both acceptances and rejections were exercised, many times
    assert min(accepted, drafted - accepted) > max(50, 0.1 * drafted), (accepted, drafted)
    assert (lookups > N // 2) if lookup else lookups == 0, lookups

    def proc(logits):
        return process_logits(logits, temperature, top_k, top_p)

    exact = exact_marginals(model, prompt, V, proc)
    for i in range(3):
        assert_matches(counts[i], exact[i], f"token {i + 1}")


def test_process_logits_matches_transformers_warpers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    for t, k, p in [(1.0, 0, 1.0), (0.7, 10, 1.0), (1.3, 0, 0.8), (0.5, 5, 0.6)]:
        x = TemperatureLogitsWarper(t)(None, logits.clone())
        if k:
            x = TopKLogitsWarper(k)(None, x)
        if p < 1:
            x = TopPLogitsWarper(p)(None, x)
        torch.testing.assert_close(process_logits(logits, t, k, p), x.softmax(-1))
