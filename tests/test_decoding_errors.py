"""Bad input gets a clear error; a decoder that raised is usable after reset()."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf
from decoding_models import tiny_model

from clasp_ext.decoding import ClaspConfig, ClaspDecoder, UnsupportedModelError, generate

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=4, seed=0)


@pytest.fixture(scope="module")
def reference(model):
    ids = torch.tensor([[5, 9, 14, 3]])
    with torch.no_grad():
        out = model.generate(
            ids,
            do_sample=False,
            max_new_tokens=8,
            min_new_tokens=8,
            eos_token_id=None,
            pad_token_id=0,
        )
    return ids, out[0].tolist()


def _run(dec, ids):
    dec.prefill(ids)
    while not dec.finished:
        dec.step()
    return dec.sequences[0].tolist()


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(1, 0, dtype=torch.long), "empty prompt"),
        (torch.tensor([[5, 6], [7, 8]]), "batch size 2"),
        (torch.tensor([[5.0, 6.0]]), "int64"),
        (torch.tensor([[5, 6]], dtype=torch.int16), "int64"),
        (torch.tensor([[5, 6]], device="meta"), "model is on cpu"),
        (torch.tensor([[5, 100000]]), r"token ids must be in \[0, 256\)"),
        (torch.zeros(1, 2, 3, dtype=torch.long), "must be"),
        ([[5, 6]], "torch.Tensor"),
        (torch.arange(3, 60)[None], "does not fit max_cache_len"),
    ],
)
@torch.no_grad()
def test_bad_input_ids_then_reset(model, reference, bad, match):
    ids, want = reference
    dec = ClaspDecoder(model, max_new_tokens=8, eos_token_id=[], max_cache_len=40, max_draft=4)
    with pytest.raises((ValueError, TypeError), match=match):
        dec.prefill(bad)
    dec.reset()
    assert _run(dec, ids) == want
    with pytest.raises(RuntimeError, match="prefill"):
        ClaspDecoder(model).step()


@pytest.mark.parametrize(
    "knobs, match",
    [
        (dict(num_skip_layers=4), r"num_skip_layers must be an int in \[0, 4\)"),
        (dict(num_skip_layers=-1), "num_skip_layers"),
        (dict(skip_ratio=1.0), "skip_ratio"),
        (dict(skip_ratio=math.nan), "skip_ratio"),
        (dict(num_skip_layers=1, skip_ratio=0.5), "not both"),
        (dict(max_draft=-1), "max_draft"),
        (dict(draft_exit_threshold=math.nan), "draft_exit_threshold"),
        (dict(draft_exit_threshold=-0.1), "draft_exit_threshold"),
        (dict(update_interval=0), "update_interval"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(top_k=-3), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=math.nan), "top_p"),
        (dict(max_new_tokens=-5), "max_new_tokens"),
        (dict(eos_token_id=-2), "eos_token_id"),
        (dict(skip_strategy="fastest"), "skip_strategy"),
        (dict(skip_strategy=[0, 0]), "repeated"),
        (dict(skip_strategy=[7]), "out of range"),
        (dict(skip_strategy=[0, 1], num_skip_layers=1), "contradicts"),
        (dict(seed=1.5), "seed"),
        (dict(max_cache_len=0), "max_cache_len"),
    ],
)
def test_bad_knobs(model, knobs, match):
    with pytest.raises(ValueError, match=match):
        ClaspDecoder(model, **knobs)
    with pytest.raises(ValueError, match=match):
        generate(model, torch.tensor([[5, 6]]), ClaspConfig(**knobs))


def test_unknown_override_and_bad_config_type(model):
    with pytest.raises(TypeError, match="unknown ClaspConfig field"):
        generate(model, torch.tensor([[5, 6]]), max_new_tokns=3)
    with pytest.raises(TypeError, match="ClaspConfig"):
        ClaspDecoder(model, config={"max_draft": 3})


def test_defaults_from_generation_config(model):
    dec = ClaspDecoder(model)
    c = dec.config
    assert c.temperature == 0.0 and c.eos_token_id == [2]
    assert c.num_skip_layers == 1  # default skip ratio 0.35 of 4 layers
    model.generation_config.do_sample = True
    model.generation_config.temperature = 0.7
    model.generation_config.top_k = 5
    try:
        c = ClaspDecoder(model).config
        assert (c.temperature, c.top_k) == (0.7, 5)
        assert ClaspDecoder(model, temperature=0).config.greedy
    finally:
        model.generation_config.do_sample = False


def test_unsupported_models():
    t5 = tf.T5ForConditionalGeneration(
        tf.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
    )
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        ClaspDecoder(t5)
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedModelError, match="absolute position embeddings"):
        ClaspDecoder(gpt2)
    mamba = tf.MambaForCausalLM(
        tf.MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, state_size=4)
    )
    with pytest.raises(UnsupportedModelError, match="decoder-layer list|recurrent"):
        ClaspDecoder(mamba)
    with pytest.raises(UnsupportedModelError, match="attn_implementation"):
        ClaspDecoder(tiny_model("llama", layers=2, attn="flex_attention"))


def test_bidirectional_model_rejected():
    model = tiny_model("gemma3", layers=2)
    model.config.use_bidirectional_attention = True
    with pytest.raises(UnsupportedModelError, match="bidirectional"):
        ClaspDecoder(model)
