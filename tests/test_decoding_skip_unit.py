"""ClaspConfig(skip_unit="mlp"): a draft runs the attention of every layer of its skip set and
skips only its MLP block (ModelAdapter.set_skip_unit). Only drafts change: the verify and the DP
run whole layers, low-bit copies cover what the draft runs, and the choice keys the cost table.
Greedy output equal to model.generate's: test_decoding_low_bit's lossless test, per skip_unit."""

from __future__ import annotations

import pytest
import torch
from decoding_models import tiny_model

from clasp_ext.decoding import ClaspDecoder, cost_model
from clasp_ext.decoding.adapter import ModelAdapter
from clasp_ext.decoding.low_bit import Int8Weight, LowBitDraft

torch.set_num_threads(1)


def mlp_outputs(adapter) -> tuple[dict, list]:
    out = {}
    hooks = [
        layer.mlp.register_forward_hook(lambda m, a, o, i=i: out.__setitem__(i, o))
        for i, layer in enumerate(adapter.layers)
    ]
    return out, hooks


@torch.no_grad()
def test_a_skipped_layer_runs_its_attention_without_its_mlp():
    model = tiny_model("llama", layers=6)
    adapter = ModelAdapter(model)
    adapter.set_skip_unit("mlp")
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    skip = [False, True, False, True, False, False]
    out, hooks = mlp_outputs(adapter)
    cache = adapter.new_cache(16)
    h, hs = adapter.forward(ids, 0, cache, skip=skip, keep_hidden="all")
    assert set(out) == set(range(6))  # every layer ran, the skipped ones included
    for i, skipped in enumerate(skip):
        assert bool(out[i].eq(0).all()) == skipped
        assert cache.keys[i][..., :6, :].abs().sum() > 0  # its attention wrote K/V
    assert not torch.equal(hs[2], hs[1])  # layer 1 changed the hidden state (its attention)
    assert all("forward" not in layer.mlp.__dict__ for layer in adapter.layers)  # restored
    # not the full model's output: the two MLP blocks were left out
    ref = adapter.forward(ids, 0, adapter.new_cache(16), skip=[False] * 6)[0]
    assert not torch.allclose(h, ref)
    out.clear()
    adapter.forward(ids, 0, adapter.new_cache(16))  # no skip (a verify): nothing zeroed
    assert not any(bool(o.eq(0).all()) for o in out.values())
    adapter.set_skip_unit("layer")
    out.clear()
    adapter.forward(ids, 0, adapter.new_cache(16), skip=skip)
    assert sorted(out) == [0, 2, 4, 5]  # whole layers skipped again
    for hk in hooks:
        hk.remove()


def test_low_bit_copies_cover_the_attention_of_skipped_layers():
    model = tiny_model("llama", layers=4)
    layers = model.model.layers
    draft = LowBitDraft(layers, "int8", [layer.mlp for layer in layers])
    skip = [False, True, False, True]
    whole = LowBitDraft(layers, "int8")
    with whole.active(skip):
        pass
    with draft.active(skip):
        assert isinstance(layers[1].self_attn.q_proj.forward, Int8Weight)  # attention: a copy
        assert "forward" not in layers[1].mlp.down_proj.__dict__  # its MLP does not run
        assert isinstance(layers[0].mlp.down_proj.forward, Int8Weight)  # a kept layer: all
    assert not any("forward" in m.__dict__ for m in model.modules())
    attention = [
        m for i in (1, 3) for m in layers[i].self_attn.modules() if type(m) is torch.nn.Linear
    ]
    extra = sum(m.weight.numel() + 4 * m.weight.shape[0] for m in attention)
    assert draft.nbytes == whole.nbytes + extra  # each copy counted once


def test_skip_unit_is_validated_and_keys_the_cost_table():
    model = tiny_model("llama", layers=3)
    with pytest.raises(ValueError, match="skip_unit must be one of"):
        ClaspDecoder(model, skip_unit="attention")
    with pytest.raises(ValueError, match="eager rounds only"):
        ClaspDecoder(model, skip_unit="mlp", cuda_graphs=True)
    for layer in model.model.layers:  # a family whose blocks go by another name
        layer.dense_block = layer.mlp
        del layer.mlp
    with pytest.raises(ValueError, match="needs an MLP block"):
        ModelAdapter(model, check=False).set_skip_unit("mlp")

    model = tiny_model("llama", layers=3)
    keys = {}
    for unit in ("layer", "mlp"):
        dec = ClaspDecoder(model, skip_unit=unit, num_skip_layers=1, policy="fixed")
        setup = cost_model.setup_of(dec.adapter, dec.draft_head, 1, 16)
        keys[unit] = cost_model.key_of(setup)
        assert ("skip_unit" in setup) == (unit == "mlp")
    assert keys["layer"] != keys["mlp"]
