"""Models whose ``config._attn_implementation`` is a flash-attention name (flash_attention_2/3).

flash-attn has no wheel for the test machine, so these tests register a pure-PyTorch stand-in
(``FlashAttnStandIn``) under the names transformers dispatches flash attention to, and check the
adapter's PLUMBING, not flash-attn's kernels: that draft, verify and prefill call the layers the
way transformers' flash path expects (no 4-D mask, ``is_causal``, causal aligned to the bottom
right with the K/V view ending exactly at the last query, the layer's own sliding window, GQA),
and that the DP's candidate call, whose mask flash-attn cannot express, goes through sdpa instead.
The stand-in implements flash-attn's semantics as documented (``flash_attn_func(q, k, v,
causal=True, window_size=(w - 1, w - 1))`` as transformers calls it); a real flash-attn run is
untested here.

transformers refuses ``attn_implementation="flash_attention_2"`` at load time (and in
``set_attn_implementation``) when the flash_attn package is missing, so the models are built with
sdpa and the field those methods set after their checks, ``config._attn_implementation``, is set
directly (``use_flash``). The attention modules read it on every call.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from decoding_models import FAMILIES, tiny_model
from test_decoding_greedy import assert_lossless, hf_greedy
from test_decoding_layer_search import _full_pass, _sequential_dp
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from clasp_ext.decoding import generate
from clasp_ext.decoding.adapter import ModelAdapter
from clasp_ext.decoding.attention import PACKED_GQA_SDPA
from clasp_ext.decoding.layer_search import dp_skip_search

torch.set_num_threads(1)

FLASH_NAMES = ("flash_attention_2", "flash_attention_3")


class FlashAttnStandIn:
    """Pure-PyTorch stand-in for transformers' ``flash_attention_forward`` (same signature and
    output layout [B, T, H, D]) with flash-attn's semantics: no mask tensor (only ``None``; a 2-D
    padding mask would be legal for transformers' flash path but never occurs here, and a 4-D mask
    never can), causal aligned to the bottom right (query i sees keys j <= i + Tk - Tq), sliding
    window ``(w - 1, 0)`` around that diagonal, GQA by head groups. Counts its calls."""

    def __init__(self):
        self.calls = 0
        self.position_checks = 0

    def __call__(
        self,
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0,
        scaling=None,
        sliding_window=None,
        softcap=None,
        is_causal=None,
        **kwargs,
    ):
        self.calls += 1
        assert attention_mask is None, (
            f"flash attention was given a mask of shape {tuple(attention_mask.shape)}; flash-attn "
            "takes no 4-D mask"
        )
        is_causal = is_causal if is_causal is not None else module.is_causal
        assert is_causal is True
        assert dropout == 0.0
        B, Hq, Tq, D = query.shape
        Hk, Tk = key.shape[1], key.shape[2]
        assert Tq <= Tk and Hq % Hk == 0
        pos = kwargs.get("position_ids")
        if pos is not None:  # bottom-right alignment is right only if the K/V end at the last query
            assert pos.shape[-1] == Tq
            assert int(pos[0, -1]) == Tk - 1, (int(pos[0, -1]), Tk)
            self.position_checks += 1
        k = key.repeat_interleave(Hq // Hk, dim=1).float()
        v = value.repeat_interleave(Hq // Hk, dim=1).float()
        scale = scaling if scaling is not None else D**-0.5
        scores = query.float() @ k.transpose(-1, -2) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        qi = torch.arange(Tq, device=query.device)[:, None] + (Tk - Tq)
        kj = torch.arange(Tk, device=query.device)[None, :]
        allowed = kj <= qi
        if sliding_window is not None:
            allowed = allowed & (kj >= qi - (sliding_window - 1))
        scores = scores.masked_fill(~allowed, float("-inf"))
        out = scores.softmax(-1) @ v  # [B, H, Tq, D]
        return out.transpose(1, 2).to(query.dtype).contiguous(), None


@pytest.fixture
def flash(monkeypatch):
    """Registers the stand-in under every flash name in transformers' attention registry (the
    class-wide mapping ``AttentionInterface.register`` writes); monkeypatch undoes it."""
    standin = FlashAttnStandIn()
    for name in FLASH_NAMES:
        monkeypatch.setitem(AttentionInterface._global_mapping, name, standin)
        assert ALL_ATTENTION_FUNCTIONS[name] is standin
    return standin


@contextlib.contextmanager
def use_flash(model, name):
    """The model dispatches its attention to ``name`` inside the block (see the module docstring
    for why the config field is set directly), sdpa again after it."""
    assert model.config._attn_implementation == "sdpa"
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = "sdpa"


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_standin_matches_sdpa_forward(flash, family):
    """The stand-in itself: the model's own forward through it equals its sdpa forward (sliding
    windows included: the prompt is longer than the window)."""
    model = tiny_model(family, layers=4, window=5, seed=2)
    ids = torch.randint(3, 256, (1, 17), generator=torch.Generator().manual_seed(1))
    want = model(ids).logits
    with use_flash(model, "flash_attention_2"):
        got = model(ids).logits
    assert flash.calls == 4 and flash.position_checks == 4
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FLASH_NAMES)
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_greedy_flash_equals_generate_sdpa(flash, family, name):
    """Greedy CLaSp on a flash model (draft and verify through the stand-in, the DP through sdpa)
    equals ``model.generate`` with sdpa, fp32."""
    window = 6
    model = tiny_model(family, layers=6, window=window, seed=5)
    gen = torch.Generator().manual_seed(8)
    for trial, (M, max_draft, thr, interval) in enumerate([(2, 4, 0.0, 1), (3, 6, 0.3, 2)]):
        T = int(torch.randint(2 * window, 3 * window, (1,), generator=gen))
        ids = torch.randint(3, model.config.vocab_size, (1, T), generator=gen)
        n_new = 24
        want = hf_greedy(model, ids, n_new)
        calls = flash.calls
        with use_flash(model, name):
            out = generate(
                model,
                ids,
                num_skip_layers=M,
                max_draft=max_draft,
                draft_exit_threshold=thr,
                update_interval=interval,
                max_new_tokens=n_new,
                eos_token_id=[],
                seed=trial,
                skip_strategy="dp",  # re-runs: the DP's sdpa detour runs more than once
                policy="fixed",
            )
            assert model.config._attn_implementation == name  # the DP restored it
        assert flash.calls > calls and flash.position_checks > 0
        s = out.stats
        assert s.dp_runs >= 2 and s.rounds > 0 and s.drafted > 0
        assert_lossless(model, out.sequences[0].tolist(), want, T)  # near-tie check in sdpa


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("M", [1, 3])
@torch.no_grad()
def test_dp_on_flash_model_equals_sequential(flash, family, M):
    """The sequence-parallel DP of a flash model (its layer calls switched to sdpa) equals the
    sequential reference, whose one-query candidate calls go through the flash path."""
    window = 6
    model = tiny_model(family, layers=6, window=window, seed=1)
    with use_flash(model, "flash_attention_2"):
        adapter = ModelAdapter(model)
        assert adapter.is_flash and adapter.masked_attn_implementation == PACKED_GQA_SDPA
        T = 3 * window
        ids = torch.randint(
            3, adapter.vocab_size, (1, T), generator=torch.Generator().manual_seed(5)
        )
        calls = flash.calls  # after the adapter's self-check, which runs through flash too
        cache, hs = _full_pass(adapter, ids, T + M + 4)
        assert flash.calls == calls + adapter.num_layers  # the full pass went through flash
        p = T - 1
        target = torch.stack([h[:, p] for h in hs], 1)
        before = [k[:, :, :T].clone() for k in cache.keys]
        calls = flash.calls
        mask, states = dp_skip_search(adapter, cache, target, p, T, M, return_states=True)
        assert flash.calls == calls, "the DP's masked call must not go through flash attention"
        assert model.config._attn_implementation == "flash_attention_2"
        for k, b in zip(cache.keys, before, strict=True):
            assert torch.equal(k[:, :, :T], b)
        ref_mask, ref_states = _sequential_dp(adapter, cache, target, p, M)
        assert flash.calls > calls  # the reference's candidates did
    assert torch.equal(mask, ref_mask)
    for got, want in zip(states, ref_states, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_masked_attention_restores_on_error(flash):
    model = tiny_model("gemma3", layers=3, seed=0)
    with use_flash(model, "flash_attention_3"):
        adapter = ModelAdapter(model)
        assert all(m is None for m in adapter.causal_masks(torch.arange(4), 4).values())
        with pytest.raises(RuntimeError, match="boom"), adapter.masked_attention():
            assert model.config._attn_implementation == PACKED_GQA_SDPA
            assert all(
                layer.self_attn.config._attn_implementation == PACKED_GQA_SDPA
                for layer in adapter.layers
            )
            raise RuntimeError("boom")
        assert model.config._attn_implementation == "flash_attention_3"
