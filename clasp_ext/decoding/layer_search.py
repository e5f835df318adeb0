"""Choosing the skip set: the dynamic program of SPEC section 2 and the simpler strategies.

``dp_skip_mask`` runs the DP with sequence parallelism: for layer i-1 the l = min(i-1, M) "keep"
candidates g(i-1, 1..l) are l query positions of ONE call of that decoder layer, all carrying the
target token's position id p, each attending to cache slots [0, p-1] (within the layer's sliding
window) and to its own scratch slot, nothing else. Their K/V go to scratch slots
[scratch_start, scratch_start + l) past the committed length: they are never committed and are
overwritten by the next draft. The cache is never copied. That call needs a custom mask, so with a
flash-attention model it runs through sdpa (``ModelAdapter.masked_attention``). Selection and state
update are the fused ``clasp.skip_search_step`` op; the mask comes from
``clasp.skip_search_backtrack``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from clasp_ext import ops

STRATEGIES = ("dp", "static", "importance", "random")
# the strategies that choose the skip set from the verified hidden states of a target token
SEARCHED = ("dp", "static", "importance")


@torch.no_grad()
def dp_skip_search(
    adapter,
    cache,
    target_hidden: Tensor,
    target_pos: int,
    scratch_start: int,
    num_skip: int,
    return_states: bool = False,
):
    """The skip-set DP for one target token.

    target_hidden [1, L+1, d]: the full model's h_0..h_L of the target (h_L before the final norm),
    whose K/V at slots [0, target_pos] are in ``cache`` (slot target_pos itself is never read).
    Returns the skip mask bool [1, L] on the model's device (and, with ``return_states``, the list
    of DP states g(i, .) [1, M+1, d] for i = 1..L as the op returned them, the last one normed).
    """
    L = adapter.num_layers
    M = int(num_skip)
    if not 0 <= M < L:
        raise ValueError(f"clasp_ext: num_skip must be in [0, {L}), got {M}")
    if scratch_start <= target_pos:
        raise ValueError("clasp_ext: DP scratch slots must lie past the target position")
    B, Lp1, d = target_hidden.shape
    if B != 1 or Lp1 != L + 1:
        raise ValueError(f"clasp_ext: target_hidden must be [1, {L + 1}, d], got {(B, Lp1, d)}")
    device = target_hidden.device
    prev = target_hidden.new_zeros(1, M + 1, d)
    prev[:, 0] = target_hidden[:, 0]
    choices = torch.zeros(1, L, M + 1, dtype=torch.uint8, device=device)
    states = []
    if M > 0:
        pos_ids = torch.full((1, M), target_pos, dtype=torch.long, device=device)
        pos_emb = adapter.position_embeddings(target_hidden[:, :1].expand(1, M, d), pos_ids)
        masks = adapter.candidate_masks(target_pos, scratch_start, M)
    cache.set_write(scratch_start)
    for layer in range(L):
        num_keep = min(layer, M)
        if num_keep > 0:
            pe = adapter.first_positions(pos_emb, num_keep)
            mk = {w: m[..., :num_keep, : scratch_start + num_keep] for w, m in masks.items()}
            # The candidate layout needs a custom mask that flash-attn cannot express: with a
            # flash-attention model this one call runs through sdpa (adapter.masked_attention).
            with adapter.masked_attention():
                computed = adapter.run_layer(
                    layer, prev[:, 1 : num_keep + 1], pos_ids[:, :num_keep], pe, mk, cache
                )
        else:
            computed = prev[:, :0]
        target = target_hidden[:, layer + 1]
        if layer == L - 1:  # compare what the lm_head would see
            prev = adapter.final_norm(prev)
            computed = adapter.final_norm(computed)
            target = adapter.final_norm(target)
        prev, choice, _score = ops.skip_search_step(prev, computed, target, layer)
        choices[:, layer] = choice
        if return_states:
            states.append(prev)
    mask = ops.skip_search_backtrack(choices, M)
    return (mask, states) if return_states else mask


def importance_skip_mask(target_hidden: Tensor, num_skip: int) -> tuple[Tensor, Tensor]:
    """Skip the ``num_skip`` layers with the lowest ``layer_importance`` (1 - cos(h_i, h_{i+1})).
    Returns (mask bool [1, L], importance float32 [1, L]) on the device."""
    imp = ops.layer_importance(target_hidden)
    L = imp.shape[1]
    mask = torch.zeros(1, L, dtype=torch.bool, device=imp.device)
    if num_skip > 0:
        idx = torch.topk(imp, num_skip, dim=1, largest=False).indices
        mask.scatter_(1, idx, True)
    return mask, imp


def searched_skip_mask(
    strategy: str, adapter, cache, target_hidden: Tensor, target_pos: int, scratch: int, M: int
) -> tuple[Tensor, Tensor]:
    """The skip mask of a ``SEARCHED`` strategy for one target token ("dp" and "static": the DP,
    "importance": the least important layers) and the layers' importance, both [1, L] on the
    device (arguments as for ``dp_skip_search``)."""
    if strategy == "importance":
        return importance_skip_mask(target_hidden, M)
    mask = dp_skip_search(adapter, cache, target_hidden, target_pos, scratch, M)
    return mask, ops.layer_importance(target_hidden)


def random_skip_mask(num_layers: int, num_skip: int, seed: int | None) -> list:
    """``num_skip`` layers drawn at random: from ``seed``, or fresh entropy when None."""
    g = torch.Generator()
    g.manual_seed(seed) if seed is not None else g.seed()
    perm = torch.randperm(num_layers, generator=g).tolist()
    chosen = set(perm[:num_skip])
    return [i in chosen for i in range(num_layers)]


def explicit_skip_mask(num_layers: int, layers: Sequence[int]) -> list:
    chosen = set(layers)
    return [i in chosen for i in range(num_layers)]
