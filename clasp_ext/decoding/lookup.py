"""Drafts by lookup in the context (prompt lookup decoding): an incremental n-gram index.

When the last ``n`` tokens (n = ``max_ngram`` down to ``min_ngram``) occurred earlier in the prompt
or the output, the tokens that followed their most recent earlier occurrence are proposed as the
draft. Such a draft costs no forward pass at all, so a round that uses it costs one verify forward
and emits at least one token. Summaries, RAG answers, code edits and rewrites copy long spans of
their input, where this proposes many tokens at once.

Match lengths: with ``policy="fixed"`` only n >= 2 is used (a single-token match recurs by chance
and would displace a layer-skip draft that is right most of the time); with ``policy="cost"``
single-token matches are a separate draft source with their own acceptance estimate, which the
policy uses where a verify of two tokens costs about one step (then a free guess is worth it even
when it is mostly wrong) and drops where it does not. Lossless like every draft: the verify pass
decides (in sampling mode the lookup draft is a point mass q, which speculative sampling handles
exactly).

The index maps every n-gram (n <= ``max_ngram``) to the end of its most recent occurrence that has
a continuation; each new token adds ``max_ngram`` entries, so a lookup costs ``max_ngram``
dictionary probes whatever the context length (the previous per-round backward scan of the whole
context cost milliseconds per round at a few thousand tokens).
"""

from __future__ import annotations


class LookupIndex:
    def __init__(self, max_ngram: int):
        self.max_ngram = max_ngram
        self._last: dict[tuple, int] = {}  # n-gram -> end position of its latest occurrence
        self._tokens: list[int] = []
        self._indexed = 0  # tokens whose n-grams ending before them are registered

    def reset(self, tokens: list[int]) -> None:
        """Starts over on ``tokens`` (the list is kept by reference: appending to it, as the
        decoder does, is enough; ``match`` catches up)."""
        self._last.clear()
        self._tokens = tokens
        self._indexed = 0

    def _catch_up(self) -> None:
        toks, last, N = self._tokens, self._last, self.max_ngram
        for t in range(max(self._indexed, 1), len(toks)):
            # token t is the continuation of every n-gram ending at e = t - 1
            e = t - 1
            for n in range(1, min(N, e + 1) + 1):
                last[tuple(toks[e - n + 1 : e + 1])] = e
        self._indexed = len(toks)

    def match(self, max_tokens: int, min_ngram: int = 2) -> tuple[list[int], int]:
        """(up to ``max_tokens`` tokens that followed the most recent earlier occurrence of the
        longest suffix n-gram, ``min_ngram`` <= n <= ``max_ngram``; n), or ([], 0) when none
        occurs. An occurrence may overlap the suffix; it must end before the last token."""
        if max_tokens <= 0 or self.max_ngram <= 0:
            return [], 0
        self._catch_up()
        toks = self._tokens
        T = len(toks)
        for n in range(min(self.max_ngram, T - 1), min_ngram - 1, -1):
            e = self._last.get(tuple(toks[T - n :]))
            if e is not None:
                return toks[e + 1 : e + 1 + max_tokens], n
        return [], 0
