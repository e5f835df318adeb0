"""Tiny random-weight models of every supported family, built in the tests (no downloads)."""

from __future__ import annotations

import torch

FAMILIES = ("llama", "qwen2", "mistral", "gemma3")


def tiny_model(
    family: str,
    *,
    layers: int = 6,
    vocab: int = 256,
    window: int = 8,
    attn: str = "sdpa",
    seed: int = 0,
    dtype=torch.float32,
    softcap: float | None = None,
):
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        attn_implementation=attn,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "llama":
        cfg = tf.LlamaConfig(**common)
        cls = tf.LlamaForCausalLM
    elif family == "qwen2":
        # the upper half of the layers use a sliding window
        cfg = tf.Qwen2Config(
            **common, use_sliding_window=True, sliding_window=window, max_window_layers=layers // 2
        )
        cls = tf.Qwen2ForCausalLM
    elif family == "mistral":
        cfg = tf.MistralConfig(**common, sliding_window=window)
        cls = tf.MistralForCausalLM
    elif family == "gemma3":
        cfg = tf.Gemma3TextConfig(
            **common,
            sliding_window=window,
            sliding_window_pattern=3,
            query_pre_attn_scalar=16,
            final_logit_softcapping=softcap if softcap is not None else 30.0,
        )
        cls = tf.Gemma3ForCausalLM
    else:
        raise ValueError(family)
    model = cls(cfg).to(dtype).eval()
    # random-init models are near-uniform; sharpen them so greedy decoding is far from ties
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and p.dim() == 2:
                p.mul_(3.0 if "embed" in name or "lm_head" in name else 1.5)
    return model
