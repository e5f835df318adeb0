"""The adapter reads the calling convention off the installed transformers release, and its
self-check refuses what it cannot drive losslessly (it can fail: each case here makes it fail)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from decoding_models import FAMILIES, tiny_model

from clasp_ext.decoding import ClaspDecoder, ModelAdapter, UnsupportedModelError
from clasp_ext.decoding.adapter import CACHE_KEYWORDS, LayerConvention

torch.set_num_threads(1)


@pytest.mark.parametrize("family", FAMILIES)
def test_convention_from_the_layer_signature(family):
    model = tiny_model(family, layers=2)
    conv = ModelAdapter(model).convention
    params = inspect.signature(type(model.model.layers[0]).forward).parameters
    # the first cache keyword the installed release's layer takes (cache= from 5.24 on)
    assert conv.cache_keyword == next(k for k in CACHE_KEYWORDS if k in params)
    assert conv.takes_cache_position == ("cache_position" in params)
    assert conv == LayerConvention.of(model.model.layers[1])


@torch.no_grad()
def test_self_check_catches_a_cache_keyword_the_layer_swallows():
    """The transformers 5.17 failure: a cache passed under a keyword the layer does not know
    lands in **kwargs, nothing is written, and only a chunked prefill can notice."""
    model = tiny_model("llama", layers=3)
    a = ModelAdapter(model, check=False)
    a.convention = dataclasses.replace(a.convention, cache_keyword="not_the_cache")
    with pytest.raises(UnsupportedModelError, match="did not write K/V through the cache"):
        a.self_check()


@torch.no_grad()
def test_self_check_catches_a_wrong_scaling():
    model = tiny_model("qwen2", layers=3)
    a = ModelAdapter(model, check=False)
    a.logit_scale = 1.5  # a logit scale the model does not apply
    with pytest.raises(UnsupportedModelError, match="does not reproduce the model's own logits"):
        a.self_check()


@torch.no_grad()
def test_self_check_wraps_a_crash_of_the_layer_calls():
    model = tiny_model("mistral", layers=2)
    a = ModelAdapter(model, check=False)
    a.convention = dataclasses.replace(a.convention, rotary_keywords=("position_embeddings",))
    a.rotary_emb = None  # the layers then get no (cos, sin) and fail inside attention
    with pytest.raises(UnsupportedModelError, match="failed in the self-check"):
        a.self_check()


@torch.no_grad()
def test_self_check_measures_an_embedding_scale_and_refuses_unknown_ones():
    """A base model that scales embeddings in its forward (Gemma 1/2 before transformers 5) is
    matched by the measured scale; an unknown transformation is refused up front."""
    model = tiny_model("llama", layers=2)
    base_forward = type(model.model).forward
    hidden = model.config.hidden_size

    def scaled_embeddings(scale):
        def embed_then_scale(self, input_ids=None, inputs_embeds=None, **kwargs):
            emb = self.embed_tokens(input_ids) * torch.tensor(scale, dtype=torch.float32)
            return base_forward(self, inputs_embeds=emb, **kwargs)

        return embed_then_scale

    try:
        type(model.model).forward = scaled_embeddings(hidden**0.5)
        a = ModelAdapter(model, check=False)
        a.self_check()
        assert a.embed_scale == hidden**0.5
        type(model.model).forward = scaled_embeddings(1.7)
        with pytest.raises(UnsupportedModelError, match="transforms the token embeddings"):
            ModelAdapter(model, check=False).self_check()
    finally:
        type(model.model).forward = base_forward


def test_refusal_is_up_front():
    """A refused model raises when the decoder is built, before any token is decoded."""
    model = tiny_model("llama", layers=2)
    model.config.logit_scale = 3.0  # the adapter would apply it, the model does not
    with pytest.raises(UnsupportedModelError):
        ClaspDecoder(model)
