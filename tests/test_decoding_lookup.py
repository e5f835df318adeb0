"""Context-lookup drafts (clasp_ext/decoding/lookup.py): the matching rule, and lossless greedy
output when rounds use them. Their sampling exactness is in test_decoding_sampling.py."""

from __future__ import annotations

import pytest
import torch
from decoding_models import FAMILIES, tiny_model
from test_decoding_greedy import POLICIES, assert_lossless, hf_greedy

from clasp_ext.decoding import ClaspDecoder, generate
from clasp_ext.decoding.lookup import LookupIndex

torch.set_num_threads(1)


def match(tokens, max_ngram, max_tokens, min_ngram=2):
    index = LookupIndex(max_ngram)
    index.reset(list(tokens))
    return index.match(max_tokens, min_ngram)[0]


def scan(tokens, max_ngram, max_tokens, min_ngram):
    """The rule written as the plain backward scan the index replaces (the oracle)."""
    T = len(tokens)
    for n in range(min(max_ngram, T - 1), min_ngram - 1, -1):
        for j in range(T - n - 1, -1, -1):
            if tokens[j : j + n] == tokens[T - n :]:
                return tokens[j + n : j + n + max_tokens]
    return []


def test_lookup_rule():
    toks = [5, 6, 7, 8, 9, 1, 6, 7]
    assert match(toks, 2, 3) == [8, 9, 1]  # [6, 7] occurred at 1..2
    assert match(toks, 2, 1) == [8]  # capped
    assert match(toks, 2, 0) == []
    # the longest n-gram wins over a more recent shorter one
    toks = [1, 2, 3, 9, 3, 4, 2, 3]
    assert match(toks, 2, 2) == [9, 3]  # [2, 3] at 1..2, not [3] at 4
    assert match(toks, 1, 2) == []  # single-token matches only when asked for
    assert match(toks, 1, 2, min_ngram=1) == [4, 2]  # [3] most recently at 4
    toks = [1, 2, 3, 1, 2, 4, 1, 2]
    assert match(toks, 2, 2) == [4, 1]  # the most recent earlier occurrence
    assert match([1, 2, 3], 3, 4, min_ngram=1) == []  # nothing repeats
    assert match([4], 2, 4, min_ngram=1) == []
    assert match([1, 1, 1, 1], 3, 4) == [1]  # overlapping occurrence
    assert match([1, 2, 1, 2], 0, 4, min_ngram=1) == []  # off
    index = LookupIndex(3)
    index.reset([1, 2, 3])
    assert index.match(4, 1) == ([], 0)
    index._tokens.extend([1, 2])  # the decoder appends to the list it passed; the index catches up
    assert index.match(4, 1) == ([3, 1, 2], 2)


def test_lookup_index_matches_the_scan_on_random_sequences():
    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        vocab = 2 + trial % 6  # small vocabularies: many repeats and overlaps
        length = int(torch.randint(1, 40, (1,), generator=gen))
        toks = torch.randint(0, vocab, (length,), generator=gen).tolist()
        index = LookupIndex(3)
        grown: list[int] = []
        index.reset(grown)
        for t in toks:  # incrementally, as in decoding, against the scan at every length
            grown.append(t)
            for min_ngram in (1, 2):
                want = scan(grown, 3, 5, min_ngram)
                assert index.match(5, min_ngram)[0] == want, (grown, min_ngram)


def prompt_that_repeats_its_continuation(model) -> torch.Tensor:
    """A prompt ``seg + rnd + seg[:3]`` whose segment ``seg`` continues with the model's own first
    greedy token t0, so the suffix 3-gram (seg[1], seg[2], t0) occurs earlier and a lookup draft
    must fire at the first round, whatever the random weights (a fixed point, found in a few
    tries)."""
    gen = torch.Generator().manual_seed(7)
    for _ in range(30):  # a new middle part when the tokens cycle instead of settling
        seg = torch.randint(3, 256, (1, 6), generator=gen)
        rnd = torch.randint(3, 256, (1, 3), generator=gen)
        for _ in range(5):
            ids = torch.cat([seg, rnd, seg[:, :3]], 1)
            t0 = model(ids).logits[0, -1].argmax()
            if seg[0, 3] == t0:
                return ids
            seg[0, 3] = t0
    raise AssertionError("no prompt whose segment continues with the model's first token")


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_greedy_lossless_with_lookup_drafts(family, policy):
    model = tiny_model(family, layers=6, window=8, seed=13)
    ids = prompt_that_repeats_its_continuation(model)
    want = hf_greedy(model, ids, 30)
    out = generate(
        model,
        ids,
        num_skip_layers=2,
        max_draft=5,
        draft_exit_threshold=0.0,
        max_new_tokens=30,
        eos_token_id=[],
        lookup_ngram=3,
        **POLICIES[policy],
    )
    assert_lossless(model, out.sequences[0].tolist(), want, ids.shape[1])
    s = out.stats
    if policy == "fixed":  # "cost" may judge the layer-skip draft the better one
        assert s.lookup_rounds >= 1  # the prompt's repeated segment matched at the first round
    assert s.round_tokens == s.accepted + s.branch_hits + s.rounds


def test_lookup_ngram_is_validated():
    model = tiny_model("llama", layers=2)
    for bad in (-1, 1, 2.0):
        with pytest.raises(ValueError, match="lookup_ngram must be 0"):
            ClaspDecoder(model, lookup_ngram=bad)
