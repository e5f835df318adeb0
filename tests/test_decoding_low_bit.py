"""Low-bit draft weights (clasp_ext/decoding/low_bit.py, ClaspConfig(draft_weights="int8")): the
int8 matmul against an fp32 reference over odd shapes, the swap in and out of the model, lossless
greedy output with int8 drafts, and the memory the copies take. Sampling exactness with int8
drafts is in test_decoding_sampling.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from decoding_models import FAMILIES, tiny_model
from test_decoding_greedy import POLICIES, assert_lossless, hf_greedy

from clasp_ext.decoding import ClaspDecoder, generate, low_bit
from clasp_ext.decoding.low_bit import Int8Draft, Int8Weight, int8_copy, int8_pays

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


def test_inner_sizes_the_kernel_gets_wrong_are_refused():
    assert not Int8Weight.supports(torch.ones(4, 200))
    with pytest.raises(ValueError, match="multiple of 16"):
        Int8Weight(torch.ones(4, 200))
    layer = torch.nn.Sequential(torch.nn.Linear(200, 32), torch.nn.Linear(32, 8))
    draft = Int8Draft([layer])
    with draft.active([False]):
        assert "forward" not in layer[0].__dict__  # keeps its own weights
        assert isinstance(layer[1].forward, Int8Weight)


def test_int8_draft_swaps_only_inside_and_only_kept_layers():
    model = tiny_model("llama", layers=4)
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        want = model(ids).logits
    draft = Int8Draft(model.model.layers)
    skip = [False, True, False, True]
    with draft.active(skip):
        layer0 = model.model.layers[0]
        assert isinstance(layer0.mlp.down_proj.forward, Int8Weight)
        assert "forward" not in model.model.layers[1].mlp.down_proj.__dict__
        with torch.no_grad():
            inside = model(ids).logits
    assert sorted(draft._copies) == [0, 2]  # copies made only for the kept layers
    assert not any("forward" in m.__dict__ for m in model.modules())  # all restored
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(after, want)
    assert not torch.equal(inside, want)  # the copies were really used
    assert torch.allclose(inside, want, atol=5e-2)
    linears = [
        m for i in (0, 2) for m in model.model.layers[i].modules() if type(m) is torch.nn.Linear
    ]
    assert draft.nbytes == sum(m.weight.numel() + 4 * m.weight.shape[0] for m in linears)
    with pytest.raises(RuntimeError, match="boom"), draft.active(skip):  # restored on errors too
        raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_greedy_lossless_with_int8_drafts(family, policy):
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
        draft_weights="int8",
        draft_vocab_size=64,
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
    lin = torch.nn.Linear(32, 8)
    first = int8_copy(lin)
    assert int8_copy(lin) is first  # a second decoder reuses it
    assert int8_copy(lin, rows=4) is not first and int8_copy(lin, rows=4).q.shape == (4, 32)
    with torch.no_grad():
        lin.weight.mul_(2.0)  # modified in place: a new copy
    again = int8_copy(lin)
    assert again is not first and torch.allclose(again.scale, 2 * first.scale)


def test_auto_keeps_small_layers_on_their_own_weights():
    model = tiny_model("llama", layers=3)  # a few KiB per layer: overhead-bound, never worth it
    assert not int8_pays(model.model.layers[0])
    dec = ClaspDecoder(model)  # draft_weights="auto" by default
    assert dec.config.draft_weights == "auto" and dec.int8_draft is None
    assert dec.low_bit_bytes == 0


def test_auto_measures_a_large_layer_once():
    layer = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.Linear(2048, 1024))
    layer = layer.to(torch.bfloat16)  # 8 MiB of weights: measured
    first = int8_pays(layer, repeats=3)
    assert isinstance(first, bool)
    key = next(k for k in low_bit._AUTO if k[0] == ((2048, 1024), (1024, 2048)))
    low_bit._AUTO[key] = not first  # the cached verdict is what later calls read
    assert int8_pays(layer) is (not first)
    low_bit._AUTO.pop(key)
