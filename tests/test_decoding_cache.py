"""The shared KV cache: after every round it equals a fresh full forward over the committed tokens;
the verify pass reproduces the model's own logits; nothing is reallocated or copied."""

from __future__ import annotations

import pytest
import torch
from decoding_models import FAMILIES, tiny_model

from clasp_ext.decoding import ClaspDecoder, ModelAdapter

torch.set_num_threads(1)


def _fresh_kv(model, tokens):
    """K/V of the model's own forward (transformers' DynamicCache) over ``tokens``."""
    out = model(torch.tensor([tokens]), use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    return [(layer.keys, layer.values) for layer in cache.layers]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@torch.no_grad()
def test_cache_equals_fresh_forward_after_every_round(family, temperature):
    window = 6
    model = tiny_model(family, layers=6, window=window, seed=2)
    ids = torch.randint(3, 256, (1, 4), generator=torch.Generator().manual_seed(1))
    dec = ClaspDecoder(
        model,
        num_skip_layers=3,
        max_draft=4,
        draft_exit_threshold=0.2,
        update_interval=1,
        max_new_tokens=3 * window,
        eos_token_id=[],
        temperature=temperature,
        seed=0,
    )
    dec.prefill(ids)
    cache = dec.cache
    ptrs = [t.data_ptr() for t in cache.keys + cache.values]
    rounds = 0
    while not dec.finished:
        dec.step()
        rounds += 1
        n = dec.committed  # the length the device holds (the verify op advances it)
        assert n == len(dec.tokens) - 1  # every token but the last emitted one
        fresh = _fresh_kv(model, dec.tokens[:n])
        for i, (k, v) in enumerate(fresh):
            m = k.shape[2]  # sliding layers keep only the last window - 1 positions
            # fp32 noise: transformers' forward and the chunked one round differently
            torch.testing.assert_close(cache.keys[i][:, :, n - m : n], k, rtol=5e-5, atol=5e-5)
            torch.testing.assert_close(cache.values[i][:, :, n - m : n], v, rtol=5e-5, atol=5e-5)
    assert rounds >= 3 and len(dec.tokens) > 4 + 2 * window  # well past the window
    # the cache is never reallocated or copied: same buffers throughout
    assert [t.data_ptr() for t in cache.keys + cache.values] == ptrs
    assert dec.cache is cache


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_verify_pass_equals_model_forward(family, attn):
    """Chunked layer-by-layer forward through the shared cache (as prefill + verify rounds do)
    gives the logits of the model's own forward over the whole sequence."""
    model = tiny_model(family, layers=4, window=5, attn=attn, seed=4)
    a = ModelAdapter(model)
    T = 23
    ids = torch.randint(3, 256, (1, T), generator=torch.Generator().manual_seed(2))
    want = model(ids).logits
    cache = a.new_cache(T + 3)
    got = []
    for start, end in [(0, 7), (7, 8), (8, 13), (13, 23)]:
        h, _ = a.forward(ids[:, start:end], start, cache)
        got.append(a.head(h))
    torch.testing.assert_close(torch.cat(got, 1), want, rtol=1e-5, atol=1e-5)


def test_gemma3_softcapping_applied():
    model = tiny_model("gemma3", layers=2, softcap=0.5, seed=1)
    a = ModelAdapter(model)
    assert a.final_softcap == 0.5
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7, 8, 9]])).logits
        assert logits.abs().max() <= 0.5
        diff = a.self_check()
    assert diff < 1e-5


@torch.no_grad()
def test_draft_writes_only_layers_it_runs():
    model = tiny_model("mistral", layers=6, window=5, seed=3)
    ids = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(8))
    dec = ClaspDecoder(
        model,
        skip_strategy=[1, 3, 4],
        max_draft=4,
        draft_exit_threshold=0.0,
        max_new_tokens=20,
        eos_token_id=[],
        lookup_ngram=0,  # every round drafts with the layers (a lookup round writes nothing)
    )
    dec.prefill(ids)
    while not dec.finished:
        before = list(dec.cache.writes)
        drafted = dec.stats.drafted
        dec.step()
        k = dec.stats.drafted - drafted
        delta = [b - a for a, b in zip(before, dec.cache.writes, strict=True)]
        # one write per draft token on the layers the draft runs, one verify write everywhere
        assert delta == [1 + (0 if i in (1, 3, 4) else k) for i in range(6)]


@torch.no_grad()
def test_rounds_never_copy_the_cache():
    """Memory proof of "no copy": during a long generation no operator allocates even half of
    one layer's K buffer (a copy of the cache, or of one layer's committed K/V, would)."""
    import transformers as tf
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,  # no GQA: transformers' repeat_kv would copy K/V views itself
        head_dim=16,
        attn_implementation="sdpa",
    )
    model = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 128, (1, 300))
    dec = ClaspDecoder(
        model,
        max_new_tokens=40,
        eos_token_id=[],
        max_draft=4,
        num_skip_layers=2,
        update_interval=2,
        skip_strategy="dp",  # DP re-runs too: their scratch slots must not copy either
        policy="fixed",
    )
    dec.prefill(ids)
    layer_bytes = dec.cache.keys[0].numel() * dec.cache.keys[0].element_size()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        while not dec.finished:
            dec.step()
    assert dec.stats.rounds > 5 and dec.stats.dp_runs > 2
    biggest = max((e.cpu_memory_usage for e in prof.events()), default=0)
    assert 0 < biggest < layer_bytes // 2, (biggest, layer_bytes)
