"""Drafts by lookup in the context (prompt lookup decoding), tried before the layer-skip draft.

When the last ``n`` tokens (n = ``max_ngram`` down to 2) occurred earlier in the prompt or the
output, the tokens that followed that occurrence are proposed as the draft. Such a draft costs no
forward pass at all, so a round that uses it costs one verify forward (about one autoregressive
step on a memory-bound machine) and emits at least one token: it can only lose the layer-skip
draft it replaced. Summaries, RAG answers, code edits and rewrites copy long spans of their input,
where this proposes many tokens at once; elsewhere no n-gram matches and the layer-skip draft runs.
Single-token matches are not used: unlike transformers' prompt lookup, which has nothing else
to propose, here a weak match would displace a layer-skip draft that is right most of the time.
Lossless like every draft: the verify pass decides (in sampling mode the lookup draft is a point
mass q, which speculative sampling handles exactly).
"""

from __future__ import annotations

MIN_NGRAM = 2


def lookup_continuation(tokens: list[int], max_ngram: int, max_tokens: int) -> list[int]:
    """Up to ``max_tokens`` tokens that followed the most recent earlier occurrence of the
    longest suffix n-gram of ``tokens`` (2 <= n <= ``max_ngram``); [] when none occurs."""
    T = len(tokens)
    if max_tokens <= 0:
        return []
    for n in range(min(max_ngram, T - 1), MIN_NGRAM - 1, -1):
        suffix = tokens[T - n :]
        first = suffix[0]
        # the occurrence must end before the suffix itself starts to propose anything
        for j in range(T - n - 1, -1, -1):
            if tokens[j] == first and tokens[j : j + n] == suffix:
                return tokens[j + n : j + n + max_tokens]
    return []
