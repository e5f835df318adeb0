"""Grouped-query attention over the cache without copying it per query head.

transformers' sdpa attention, handed a mask (which every forward of this package passes: causal
and ragged masks, the DP's candidate layout), cannot use sdpa's own grouped-query path and
expands K and V to one copy per query head (``repeat_kv``) for all ``kv_len`` slots, in every
layer and every call; releases from 5.24 avoid that for one query token only. On the AVX-512 EPYC
(bf16, Qwen2.5-1.5B: 12 query heads on 2 K/V heads) a ragged forward of 8 rows x 2 tokens over
1024 slots spent 398 of its 994 ms in those copies and 206 ms in attention over the copies
(1 token: 40 ms, no copies), so every verify and draft step at batch > 1 or long context paid for
it. ``packed_gqa_sdpa`` folds the query heads that share a K/V head into the query dimension
instead ([B, H, T, D] -> [B, H_kv, rep * T, D], the mask repeated along it): the same
per-query-row arithmetic over the same K/V, with no copy of the cache.

The decoding forwards run their layers with it (``ModelAdapter.layer_attention``) wherever the
model's attention is sdpa; flash-attention models use it for their masked calls. Anything it
does not cover (no mask over several query tokens, a per-head mask, position bias, logit
softcapping, dropout, keys and values of different head sizes) goes to transformers' sdpa
function unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

# the name the attention modules dispatch on (config._attn_implementation); no "flash" in it,
# which some modeling code tests for
PACKED_GQA_SDPA = "clasp_packed_gqa_sdpa"
_PROBE = "clasp_packed_gqa_probe"  # packed_calls' counting wrapper


def packed_gqa_sdpa(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
):
    """transformers' attention-function signature: query [B, H, T, D], key / value [B, H_kv, S,
    D], mask [B or 1, 1, T, S]; returns (output [B, T, H, D], None)."""
    B, H, T, D = query.shape
    Hk = key.shape[1]
    plain = (
        Hk == H
        or H % Hk != 0
        # no mask: one query token sees every slot of the view (causal_masks passes None then)
        or (attention_mask is None and T != 1)
        or (
            attention_mask is not None
            and (attention_mask.dim() != 4 or attention_mask.shape[1] != 1)
        )
        or dropout != 0.0
        or kwargs.get("position_bias") is not None
        or kwargs.get("softcap") is not None
        or key.shape[-1] != value.shape[-1]
    )
    if plain:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    rep = H // Hk
    # query head j * rep + r reads K/V head j (repeat_kv's order): rows (r, t) of head j
    q = query.reshape(B, Hk, rep * T, D)
    mask = attention_mask
    if T > 1:  # every query row needs its own mask row (one token: the mask broadcasts)
        mb, _, _, S = mask.shape
        mask = mask[:, :, None].expand(mb, 1, rep, T, S).reshape(mb, 1, rep * T, S)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(B, H, T, value.shape[-1]).transpose(1, 2).contiguous(), None


def register() -> str:
    """Registers ``packed_gqa_sdpa`` with transformers' attention functions (idempotent) and
    returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_GQA_SDPA, packed_gqa_sdpa)
    return PACKED_GQA_SDPA


def packed_calls(run) -> int:
    """How many attention calls ``run(name)`` (which runs the layers with the attention modules
    set to ``name``) makes to ``packed_gqa_sdpa`` registered under a probe name."""
    from transformers import AttentionInterface

    calls = [0]

    def probe(*args, **kwargs):
        calls[0] += 1
        return packed_gqa_sdpa(*args, **kwargs)

    AttentionInterface.register(_PROBE, probe)
    run(_PROBE)
    return calls[0]
