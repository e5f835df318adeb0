"""Low-bit draft weights (clasp_ext/decoding/low_bit.py, ClaspConfig(draft_weights="int8" |
"int4")): the int8 and int4 matmuls against fp32 references over odd shapes, the swap in and out
of the model, lossless greedy output with low-bit drafts, the memory the copies take, and the
"auto" choice. Sampling exactness with low-bit drafts is in test_decoding_sampling.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from decoding_models import FAMILIES, tiny_model
from test_decoding_greedy import POLICIES, assert_lossless, hf_greedy

from clasp_ext.decoding import ClaspDecoder, generate, low_bit
from clasp_ext.decoding.low_bit import (
    INT4_GROUP,
    Int4Weight,
    Int8Weight,
    LowBitDraft,
    auto_kind,
    int4_quantize,
    low_bit_copy,
)

torch.set_num_threads(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 16, 5), (3, 64, 33), (2, 208, 129), (9, 1536, 7)])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_weight_matches_fp32_reference(dtype, shape, bias):
    rows, K, N = shape  # inner sizes K: multiples of 16 (low_bit.K_MULTIPLE)
    gen = torch.Generator().manual_seed(K * N)
    w = torch.randn(N, K, generator=gen).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    x = torch.randn(2, rows, K, generator=gen).to(dtype)
    q = Int8Weight(w, b)
    got = q(x)
    assert got.shape == (2, rows, N) and got.dtype == dtype
    # the copy's exact product, in fp32: what int8 rounding alone allows
    deq = q.q.float() * q.scale.float()[:, None]
    ref = F.linear(x.float(), deq, None if b is None else b.float())
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert torch.allclose(got.float(), ref, rtol=tol, atol=tol * K**0.5)
    # and the rounding itself: at most half a step per weight, plus up to 127 x the rounding of
    # the scale to bf16 (2^-8 relative) in bf16
    step = q.scale.float()[:, None]
    bound = step / 2 + (127 * step / 256 if dtype == torch.bfloat16 else 1e-6)
    assert (deq - w.float()).abs().le(bound).all()
    assert q.nbytes == N * K + N * q.scale.element_size()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 32, 16), (3, 96, 48), (2, 224, 144), (9, 1536, 32)])
@pytest.mark.parametrize("bias", [False, True])
def test_int4_weight_matches_fp32_reference(dtype, shape, bias):
    rows, K, N = shape  # K: multiples of INT4_GROUP (32), N: of 16
    gen = torch.Generator().manual_seed(K * N + 1)
    w = torch.randn(N, K, generator=gen).to(dtype)
    w[0, :INT4_GROUP] = 0.25  # a constant group: scale 0 must not divide by zero
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    x = torch.randn(2, rows, K, generator=gen).to(dtype)
    q = Int4Weight(w, b)
    got = q(x)
    assert got.shape == (2, rows, N) and got.dtype == dtype
    codes, scale, zero = int4_quantize(w)
    assert codes.min() >= 0 and codes.max() <= 15
    deq = q.dequantized(codes)  # what the kernel multiplies by, from the codes it packed
    ref = F.linear(x.float(), deq, None if b is None else b.float())
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert torch.allclose(got.float(), ref, rtol=tol, atol=tol * K**0.5)
    # the rounding: at most half a step per weight, plus the rounding of scale and zero to the
    # dtype (2^-8 relative in bf16, of up to 8 steps and the group's range)
    step = scale.repeat_interleave(INT4_GROUP, 1)
    span = w.float().abs().reshape(N, -1, INT4_GROUP).amax(-1).repeat_interleave(INT4_GROUP, 1)
    slack = 8 * step / 256 + 2 * span / 256 if dtype == torch.bfloat16 else 1e-5 * (1 + span)
    assert (deq - w.float()).abs().le(step / 2 + slack).all()
    assert torch.allclose(deq[0, :INT4_GROUP], torch.full((INT4_GROUP,), 0.25), atol=1e-2)
    assert q.nbytes == N * K // 2 + 2 * (K // INT4_GROUP) * N * q.scale_zeros.element_size()


def test_int4_shapes_the_kernels_cannot_take_are_refused():
    assert not Int4Weight.supports(torch.ones(16, 48))  # K not a multiple of the group
    assert not Int4Weight.supports(torch.ones(24, 64))  # N not a multiple of 16
    with pytest.raises(ValueError, match="multiple of 32"):
        Int4Weight(torch.ones(16, 48))
    layer = torch.nn.Sequential(torch.nn.Linear(48, 32), torch.nn.Linear(32, 16))
    draft = LowBitDraft([layer], "int4")
    with draft.active([False]):
        assert "forward" not in layer[0].__dict__  # keeps its own weights
        assert isinstance(layer[1].forward, Int4Weight)


def test_inner_sizes_the_kernel_gets_wrong_are_refused():
    assert not Int8Weight.supports(torch.ones(4, 200))
    with pytest.raises(ValueError, match="multiple of 16"):
        Int8Weight(torch.ones(4, 200))
    layer = torch.nn.Sequential(torch.nn.Linear(200, 32), torch.nn.Linear(32, 8))
    draft = LowBitDraft([layer])
    with draft.active([False]):
        assert "forward" not in layer[0].__dict__  # keeps its own weights
        assert isinstance(layer[1].forward, Int8Weight)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_low_bit_draft_swaps_only_inside_and_only_kept_layers(kind):
    model = tiny_model("llama", layers=4)
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        want = model(ids).logits
    draft = LowBitDraft(model.model.layers, kind)
    skip = [False, True, False, True]
    with draft.active(skip):
        layer0 = model.model.layers[0]
        assert isinstance(
            layer0.mlp.down_proj.forward, {"int8": Int8Weight, "int4": Int4Weight}[kind]
        )
        assert "forward" not in model.model.layers[1].mlp.down_proj.__dict__
        with torch.no_grad():
            inside = model(ids).logits
    assert sorted(draft._copies) == [(0, True), (2, True)]  # copies only for the kept layers
    assert not any("forward" in m.__dict__ for m in model.modules())  # all restored
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(after, want)
    assert not torch.equal(inside, want)  # the copies were really used
    assert torch.allclose(inside, want, atol=5e-2 if kind == "int8" else 0.3)
    linears = [
        m for i in (0, 2) for m in model.model.layers[i].modules() if type(m) is torch.nn.Linear
    ]
    if kind == "int8":  # a byte per weight, an fp32 scale per output
        want_bytes = sum(m.weight.numel() + 4 * m.weight.shape[0] for m in linears)
    else:  # half a byte per weight, an fp32 scale and zero per group of 32 inputs
        want_bytes = sum(m.weight.numel() // 2 + 8 * m.weight.numel() // 32 for m in linears)
    assert draft.nbytes == want_bytes
    with pytest.raises(RuntimeError, match="boom"), draft.active(skip):  # restored on errors too
        raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("skip_unit", ["layer", "mlp"])  # mlp: the skipped layers' attention too
@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_greedy_lossless_with_low_bit_drafts(family, policy, kind, skip_unit):
    model = tiny_model(family, layers=6, window=8, seed=3)
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    want = hf_greedy(model, ids, 24)
    dec = ClaspDecoder(
        model,
        num_skip_layers=2,
        max_draft=4,
        draft_exit_threshold=0.0,
        max_new_tokens=24,
        eos_token_id=[],
        draft_weights=kind,
        draft_vocab_size=64,
        skip_unit=skip_unit,
        **POLICIES[policy],
    )
    out = dec.generate(ids)
    assert_lossless(model, out.sequences[0].tolist(), want, ids.shape[1])
    assert out.stats.layer_skip_rounds > 0 and out.stats.drafted > 0
    assert dec.low_bit_bytes > 0
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_draft_weights_is_validated():
    model = tiny_model("llama", layers=2)
    with pytest.raises(ValueError, match="draft_weights must be one of"):
        generate(model, torch.tensor([[3, 4]]), draft_weights="int3")
    assert ClaspDecoder(model).low_bit_bytes == 0


def test_copies_are_made_once_per_module_and_follow_weight_changes():
    lin = torch.nn.Linear(32, 16)
    first = low_bit_copy(lin)
    assert low_bit_copy(lin) is first  # a second decoder reuses it
    four = low_bit_copy(lin, rows=4)
    assert four is not first and four.q.shape == (4, 32)
    assert isinstance(low_bit_copy(lin, "int4"), Int4Weight)  # one copy per kind
    assert low_bit_copy(lin, "int8") is first
    with torch.no_grad():
        lin.weight.mul_(2.0)  # modified in place: a new copy
    again = low_bit_copy(lin)
    assert again is not first and torch.allclose(again.scale, 2 * first.scale)


def test_auto_keeps_small_layers_on_their_own_weights():
    model = tiny_model("llama", layers=3)  # a few KiB per layer: overhead-bound, never worth it
    assert auto_kind(model.model.layers) is None
    dec = ClaspDecoder(model)  # draft_weights="auto" by default
    assert dec.config.draft_weights == "auto" and dec.low_bit is None
    assert dec.low_bit_bytes == 0


def test_auto_measures_a_large_layer_once():
    layer = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.Linear(2048, 1024))
    layer = layer.to(torch.bfloat16)  # 8 MiB of weights: measured
    first = auto_kind([layer], repeats=3)
    assert first in (None, "int8", "int4")
    # only the chosen kind's copies are kept
    kept = {k[0] for m in layer for k in low_bit._COPIES.get(m, {})}
    assert kept == ({first} if first else set())
    key = next(k for k in low_bit._AUTO if k[0] == ((2048, 1024), (1024, 2048)))
    other = "int8" if first != "int8" else "int4"
    low_bit._AUTO[key] = other  # the cached verdict is what later calls read
    assert auto_kind([layer]) == other
    low_bit._AUTO.pop(key)


def test_auto_rule_prefers_int4_only_when_clearly_faster(monkeypatch):
    """The choice from measured times: int8 needs AUTO_MIN_SPEEDUP over the model's weights,
    int4 AUTO_INT4_OVER_INT8 over int8 (a little acceptance is lost on int4 copies)."""
    layer = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.Linear(2048, 1024))
    layer = layer.to(torch.bfloat16)
    for times, want in [
        ({None: 1.0, "int8": 0.6, "int4": 0.4}, "int4"),  # AMX Xeon-like: int4 1.5x int8
        ({None: 1.0, "int8": 0.58, "int4": 0.70}, "int8"),  # AVX2 EPYC-like: int4 slower
        ({None: 1.0, "int8": 0.6, "int4": 0.55}, "int8"),  # int4 only 1.09x int8
        ({None: 1.0, "int8": 0.95, "int4": 0.7}, "int4"),  # int8 does not pay, int4 does
        ({None: 1.0, "int8": 0.9, "int4": 0.9}, None),  # neither pays (fp32-like)
    ]:
        monkeypatch.setattr("clasp_ext.timing.median_times", lambda *a, t=times, **k: t)
        low_bit._AUTO.clear()
        assert auto_kind([layer]) == want, times
    low_bit._AUTO.clear()
