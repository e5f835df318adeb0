"""Sequence-parallel DP (one layer call for all candidates) equals a sequential reference."""

from __future__ import annotations

import pytest
import torch
from decoding_models import FAMILIES, tiny_model

from clasp_ext import reference
from clasp_ext.decoding.adapter import ModelAdapter
from clasp_ext.decoding.layer_search import dp_skip_search, importance_skip_mask

torch.set_num_threads(1)


def _full_pass(adapter, ids, capacity):
    """Full forward over ids writing the cache; returns the cache and h_0..h_L [1, T, d] each."""
    cache = adapter.new_cache(capacity)
    _, hs = adapter.forward(ids, 0, cache, keep_hidden="all")
    cache.rollback(ids.shape[1])
    return cache, hs


def _sequential_dp(adapter, cache, target_hidden, p, M):
    """SPEC section 2 cell by cell; each keep candidate runs alone at position p against a
    private cache holding the full model's K/V of positions [0, p-1] (a test may copy)."""
    L = adapter.num_layers
    d = target_hidden.shape[-1]
    prev = target_hidden.new_zeros(1, M + 1, d)
    prev[:, 0] = target_hidden[:, 0]
    choices = torch.zeros(1, L, M + 1, dtype=torch.uint8)
    states = []
    for layer in range(L):
        outs = []
        for j in range(1, min(layer, M) + 1):
            own = adapter.new_cache(p + 1)
            own.keys[layer] = cache.keys[layer][:, :, : p + 1].clone()
            own.values[layer] = cache.values[layer][:, :, : p + 1].clone()
            own.set_write(p)
            x = prev[:, j : j + 1]
            pos = torch.tensor([p])
            pe = adapter.position_embeddings(x, pos[None])
            masks = adapter.causal_masks(pos, p + 1)
            outs.append(adapter.run_layer(layer, x, pos[None], pe, masks, own))
        computed = torch.cat(outs, 1) if outs else prev[:, :0]
        target = target_hidden[:, layer + 1]
        if layer == L - 1:
            prev, computed, target = (adapter.final_norm(t) for t in (prev, computed, target))
        prev, choice, _ = reference.skip_search_step(prev, computed, target, layer)
        choices[:, layer] = choice
        states.append(prev)
    return reference.skip_search_backtrack(choices, M), states


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("M", [1, 3])
@torch.no_grad()
def test_sequence_parallel_dp_equals_sequential(family, M):
    window = 6
    model = tiny_model(family, layers=6, window=window, seed=1)
    adapter = ModelAdapter(model)
    T = 3 * window  # context well beyond the sliding window
    ids = torch.randint(3, adapter.vocab_size, (1, T), generator=torch.Generator().manual_seed(5))
    cache, hs = _full_pass(adapter, ids, T + M + 4)
    p = T - 1
    target = torch.stack([h[:, p] for h in hs], 1)
    before = [k[:, :, :T].clone() for k in cache.keys]
    mask, states = dp_skip_search(adapter, cache, target, p, T, M, return_states=True)
    # committed K/V untouched by the candidates (they went to scratch slots)
    for k, b in zip(cache.keys, before, strict=True):
        assert torch.equal(k[:, :, :T], b)
    ref_mask, ref_states = _sequential_dp(adapter, cache, target, p, M)
    assert mask.dtype == torch.bool and mask.shape == (1, adapter.num_layers)
    assert int(mask.sum()) == M
    assert torch.equal(mask, ref_mask)
    for got, want in zip(states, ref_states, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_importance_mask():
    hidden = torch.randn(1, 7, 16)
    mask, imp = importance_skip_mask(hidden, 2)
    assert int(mask.sum()) == 2
    lowest = set(torch.argsort(imp[0])[:2].tolist())
    assert set(torch.nonzero(mask[0]).flatten().tolist()) == lowest
