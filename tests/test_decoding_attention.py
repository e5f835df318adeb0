"""The packed grouped-query sdpa (clasp_ext/decoding/attention.py) against the attention it
replaces, fp32 reference of K/V repeated per query head, over odd shapes; and which
implementation the adapter's forwards dispatch to."""

from __future__ import annotations

import pytest
import torch
from decoding_models import FAMILIES, tiny_model
from transformers.integrations.sdpa_attention import repeat_kv

from clasp_ext.decoding.adapter import ModelAdapter
from clasp_ext.decoding.attention import PACKED_GQA_SDPA, packed_calls, packed_gqa_sdpa


class _Module:  # what the attention functions read of the attention module
    is_causal = True

    def __init__(self, groups):
        self.num_key_value_groups = groups


def _reference(q, k, v, mask, scale):
    """fp32 attention with K/V repeated per query head; output [B, T, H, D]."""
    rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k.float(), rep), repeat_kv(v.float(), rep)
    s = (q.float() @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


def _ragged_mask(B, T, S, gen, window=None):
    """Row b's queries at its own last positions (a ragged batch), causal within the window."""
    last = torch.randint(T - 1, S, (B,), generator=gen)
    pos = last[:, None] - torch.arange(T - 1, -1, -1)
    slots = torch.arange(S)
    allowed = slots[None, None] <= pos[:, :, None]
    if window is not None:
        allowed &= slots[None, None] > pos[:, :, None] - window
    return allowed[:, None]  # [B, 1, T, S]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "B,H,Hk,T,S,D,window",
    [
        (1, 4, 2, 1, 5, 16, None),
        (1, 12, 2, 3, 130, 64, None),
        (3, 6, 3, 17, 64, 32, 9),
        (2, 8, 1, 5, 700, 16, None),
        (5, 14, 2, 2, 33, 128, 7),
        (1, 4, 2, 40, 40, 16, None),
    ],
)
def test_packed_equals_repeated_reference(dtype, B, H, Hk, T, S, D, window):
    gen = torch.Generator().manual_seed(B * 1000 + T * 10 + S)
    q = torch.randn(B, T, H, D, generator=gen).to(dtype).transpose(1, 2)  # as the modules pass it
    k = torch.randn(B, Hk, S, D, generator=gen).to(dtype)
    v = torch.randn(B, Hk, S, D, generator=gen).to(dtype)
    mask = _ragged_mask(B, T, S, gen, window)
    scale = D**-0.5
    got, weights = packed_gqa_sdpa(_Module(H // Hk), q, k, v, mask, scaling=scale)
    want = _reference(q, k, v, mask, scale)
    assert weights is None and got.shape == (B, T, H, D) and got.dtype == dtype
    assert got.is_contiguous()
    tol = 2e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    mask_b1 = mask[:1]  # one mask for every row broadcasts as in the model's own calls
    got1, _ = packed_gqa_sdpa(_Module(H // Hk), q, k, v, mask_b1, scaling=scale)
    torch.testing.assert_close(
        got1.float(), _reference(q, k, v, mask_b1.expand_as(mask), scale), rtol=tol, atol=tol
    )


def test_what_it_does_not_cover_goes_to_transformers_sdpa():
    """No mask (causal by flag), a per-head mask, one K/V head per query head: transformers'
    own sdpa function, same result."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 16, generator=gen)
    k = torch.randn(2, 2, 6, 16, generator=gen)
    v = torch.randn(2, 2, 6, 16, generator=gen)
    per_head = torch.rand(2, 4, 6, 6, generator=gen) > 0.3
    per_head[..., 0] = True
    for mask, kv in ((None, (k, v)), (per_head, (k, v)), (None, (q, q))):
        m = _Module(q.shape[1] // kv[0].shape[1])
        got, _ = packed_gqa_sdpa(m, q, *kv, mask, scaling=0.25)
        want, _ = sdpa_attention_forward(m, q, *kv, mask, scaling=0.25)
        assert torch.equal(got, want)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_adapter_forwards_run_packed_attention(family):
    """An sdpa model's decoding forwards (one sequence and ragged) run every layer through the
    packed attention, and the model's own config is sdpa again after them."""
    model = tiny_model(family, layers=3)
    a = ModelAdapter(model)
    assert a.masked_attn_implementation == a.forward_attn_implementation == PACKED_GQA_SDPA
    ids = torch.randint(3, a.vocab_size, (2, 4), generator=torch.Generator().manual_seed(1))

    def run(name):
        a.set_masked_attention(name)
        try:
            cache = a.new_cache(16, batch=2)
            a.forward(ids[:1], 0, cache.row(0))
            a.forward(ids, torch.tensor([4, 0]), cache, kv_len=8)
        finally:
            a.set_masked_attention(PACKED_GQA_SDPA)

    assert packed_calls(run) == 2 * a.num_layers
    assert model.config._attn_implementation == "sdpa"


@torch.no_grad()
def test_family_that_tests_for_sdpa_by_name_keeps_sdpa():
    """Falcon's attention runs sdpa only when the config says "sdpa" (its own math for any other
    name): the adapter finds the packed function is not called and keeps sdpa."""
    import transformers as tf

    cfg = tf.FalconConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        new_decoder_architecture=True,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = tf.FalconForCausalLM(cfg).eval()
    a = ModelAdapter(model)
    assert a.masked_attn_implementation == a.forward_attn_implementation == "sdpa"


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3"])
@torch.no_grad()
def test_a_prefill_runs_causal_sdpa_without_a_mask(family):
    """A forward from slot 0 hands sdpa no mask where no sliding window binds (transformers'
    sdpa then runs it causal: half the work, the flash kernel), and computes what the masked
    forward computes; a verify from a later slot keeps its mask."""
    model = tiny_model(family, layers=2, seed=3)
    a = ModelAdapter(model)
    T = 10  # past the tiny models' sliding window of 8: there the mask stays
    pos = torch.arange(T)
    for w, m in a.causal_masks(pos, T, from_zero=True).items():
        assert (m is None) == (w is None or w >= T)
    assert all(m is not None for m in a.causal_masks(pos + 3, T + 3).values())
    ids = torch.randint(3, 100, (1, T), generator=torch.Generator().manual_seed(0))
    unmasked, _ = a.forward(ids, 0, a.new_cache(T + 2))
    masked_fn = a.causal_masks
    a.causal_masks = lambda q, kv_len, from_zero=False: masked_fn(q, kv_len)
    masked, _ = a.forward(ids, 0, a.new_cache(T + 2))
    torch.testing.assert_close(unmasked, masked, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3"])
@torch.no_grad()
def test_a_one_token_step_runs_sdpa_without_a_mask(family):
    """One query token sees every slot of its view, so where no sliding window binds sdpa gets
    no mask (as transformers' one-token steps), and the step computes what the masked step
    computes (that it stays packed: test_one_query_without_a_mask_stays_packed)."""
    model = tiny_model(family, layers=2, seed=3)
    a = ModelAdapter(model)
    for kv_len in (5, 12):  # within and past the tiny models' sliding window of 8
        for w, m in a.causal_masks(torch.tensor([kv_len - 1]), kv_len).items():
            assert (m is None) == (w is None or w >= kv_len), (w, kv_len)
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    unmasked_fn = a.causal_masks

    def with_masks(q, kv_len, from_zero=False):  # a one-token step's None: an all-True mask
        masks = unmasked_fn(q, kv_len, from_zero)
        if len(q) > 1:
            return masks
        full = torch.ones(1, kv_len, dtype=torch.bool)
        return {
            w: a._to_attn_mask(full, a.attn_implementation) if m is None else m
            for w, m in masks.items()
        }

    for start in (6, 11):  # a step within the window (7 slots: every layer unmasked) and past it
        outs = []
        for masks in (unmasked_fn, with_masks):
            a.causal_masks = masks
            cache = a.new_cache(16)
            a.forward(ids[:, :start], 0, cache)
            outs.append(a.forward(ids[:, start : start + 1], start, cache)[0])
        torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_one_query_without_a_mask_stays_packed(monkeypatch):
    """packed_gqa_sdpa with no mask and one query token folds the query heads (no K/V copy, no
    fallback to transformers' sdpa) and equals sdpa over the copied heads with no mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from clasp_ext.decoding import attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 1, 8, generator=g)
    kv = [torch.randn(2, 2, 9, 8, generator=g) for _ in range(2)]
    m = _Module(3)
    want, _ = sdpa_attention_forward(m, q, *kv, None, scaling=0.25)

    def fallback(*args, **kwargs):
        raise AssertionError("fell back to transformers' sdpa (K/V copied per query head)")

    monkeypatch.setattr(attention, "sdpa_attention_forward", fallback)
    got, _ = packed_gqa_sdpa(m, q, *kv, None, scaling=0.25)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    with pytest.raises(AssertionError, match="fell back"):  # several tokens: no mask, no packing
        packed_gqa_sdpa(m, torch.randn(2, 6, 3, 8, generator=g), *kv, None, scaling=0.25)
