"""The draft head over a vocabulary subset (clasp_ext/decoding/draft_head.py): the same logits as
the full head on its token ids, the id map, and lossless greedy output when the full model picks
tokens outside the subset. Its sampling exactness is in test_decoding_sampling.py."""

from __future__ import annotations

import pytest
import torch
from decoding_models import FAMILIES, tiny_model
from test_decoding_greedy import assert_lossless, hf_greedy

from clasp_ext.decoding import ClaspDecoder, generate
from clasp_ext.decoding.adapter import ModelAdapter
from clasp_ext.decoding.draft_head import DraftHead

torch.set_num_threads(1)


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: final logit softcapping
@torch.no_grad()
def test_subset_logits_equal_full_head_columns(family):
    model = tiny_model(family, layers=2, vocab=256, seed=3)
    a = ModelAdapter(model)
    head = DraftHead(a, 50)
    assert head.enabled
    head.reset([100, 7, 200, 100, 51], eos_ids=[2, 255])
    want_ids = list(range(50)) + [51, 100, 200, 255]
    assert head.ids.tolist() == want_ids and head.num_scored == len(want_ids)
    h = torch.randn(1, 3, model.config.hidden_size)
    full = a.head(h)
    sub = head.logits(h)
    torch.testing.assert_close(sub, full[..., head.ids], rtol=1e-5, atol=1e-5)
    # subset positions map back to vocabulary ids on the device
    idx = torch.tensor([[0, 49, 50, 53]])
    assert head.token_ids(idx).tolist() == [[0, 49, 51, 255]]
    # probabilities scatter into the full vocabulary with zeros elsewhere
    q = sub[:, -1].softmax(-1)
    qf = head.full_probs(q)
    assert qf.shape == (1, 256)
    torch.testing.assert_close(qf[0, head.ids], q[0])
    mask = torch.ones(256, dtype=torch.bool)
    mask[head.ids] = False
    assert qf[0, mask].abs().sum() == 0
    # a new context token outside the subset joins; known ones do not repeat
    head.add([100, 180, 3])
    assert head.ids.tolist() == want_ids + [180]
    # a new prompt starts from the first ids again (the sampling test reuses one decoder)
    head.reset([1, 60], eos_ids=[2])
    assert head.ids.tolist() == list(range(50)) + [60]
    head.reset([1], eos_ids=[2])
    assert head.ids.tolist() == list(range(50))
    assert head.logits(h).shape[-1] == 50


@torch.no_grad()
def test_disabled_when_zero_or_as_large_as_the_vocabulary():
    a = ModelAdapter(tiny_model("llama", layers=2, vocab=64))
    h = torch.randn(1, 1, 64)
    for size in (0, 64, 1000):
        head = DraftHead(a, size)
        head.reset([10, 63], [2])
        assert not head.enabled
        torch.testing.assert_close(head.logits(h), a.head(h))
        idx = torch.tensor([[5]])
        assert head.token_ids(idx) is idx


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_greedy_lossless_with_a_small_draft_vocabulary(family):
    model = tiny_model(family, layers=6, window=8, seed=11)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 40, (1, 9), generator=gen)  # prompt ids inside the subset
    want = hf_greedy(model, ids, 30)
    out = generate(
        model,
        ids,
        num_skip_layers=2,
        max_draft=4,
        draft_exit_threshold=0.0,
        max_new_tokens=30,
        eos_token_id=[],
        draft_vocab_size=24,
    )
    got = out.sequences[0].tolist()
    assert_lossless(model, got, want, ids.shape[1])
    # the full model emitted tokens the draft head could not score at first
    assert any(t >= 40 for t in got[ids.shape[1] :])


def test_draft_vocab_size_is_validated():
    model = tiny_model("llama", layers=2)
    with pytest.raises(ValueError, match="draft_vocab_size must be an int >= 0"):
        ClaspDecoder(model, draft_vocab_size=-1)
    with pytest.raises(ValueError, match="draft_vocab_size must be an int >= 0"):
        ClaspDecoder(model, draft_vocab_size=1.5)
