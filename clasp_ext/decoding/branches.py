"""Sibling branches of a greedy layer-skip draft, verified in the chain's forward (a token tree).

A chain draft d_1..d_k rejected at position j emits the target's token t_j there and nothing
after it. Where verifying a few more tokens costs nearly nothing (a bf16 forward of 17 tokens
costs 1.10 of one token on the AMX Xeon, as on a GPU at batch 1), the round also verifies the
draft's next-best tokens at each layer-skip position: sibling i of d_j sits at d_j's position,
sees the committed context and d_1..d_{j-1} and itself, nothing else. If the chain is rejected at j
and t_j is one of d_j's siblings, that sibling's verify logits are the full model's distribution
after (context, d_1..d_{j-1}, t_j): the round emits their argmax as one more token. Its K/V moves
from its scratch slot to position j's slot (one slot per layer), so the cache holds exactly the
committed sequence, as after a chain round.

Lossless by construction: every emitted token is the full model's argmax after the tokens emitted
before it; the siblings only add a node whose context is the one the chain's verdict produced.
Greedy, one sequence, no logits processor (the loop checks); how many siblings per position a
round verifies is the cost policy's choice (``CostPolicy.branch_width``).

Layout of the verify forward: nodes 0..k are the chain (node 0 the round's first token, node j
draft d_j), then the siblings, position by position (``positions``), ``width`` each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TokenTree:
    """What the verify forward and the verdict need about one round's tree."""

    depth: Tensor  # long [T]: node t sits at position start + depth[t]
    visible: Tensor  # bool [T, T]: node t attends to node u (its chain ancestors and itself)
    sibling_tokens: Tensor  # long [1, S]: the siblings' token ids, in node order
    # long [k + 1, width]: the node of sibling i of chain position j + 1 (-1: none); row j is
    # read for a chain with j accepted drafts (row k: nothing left to branch)
    nodes: Tensor
    width: int
    positions: list[int]  # the draft indices j (0-based: d_{j+1}) with siblings, on the host

    @property
    def num_siblings(self) -> int:
        return len(self.positions) * self.width

    @property
    def first_sibling(self) -> int:
        return self.depth.shape[0] - self.num_siblings

    def rank(self, node: int) -> int:
        """A sibling node's rank among its position's siblings (0: the draft's second best)."""
        return (node - self.first_sibling) % self.width


def build(alternatives: Tensor, positions: list[int], width: int) -> TokenTree:
    """The tree for a chain of k = ``alternatives.shape[1]`` drafts with ``width`` siblings at
    each draft index j in ``positions`` (0-based: d_{j+1}), taken from ``alternatives`` [1, k, w]
    (the draft's next-best tokens, best first, w >= width)."""
    k = alternatives.shape[1]
    dev = alternatives.device
    C = k + 1
    S = len(positions) * width
    T = C + S
    depth = torch.empty(T, dtype=torch.long)
    depth[:C] = torch.arange(C)
    visible = torch.zeros(T, T, dtype=torch.bool)
    visible[:C, :C] = torch.ones(C, C, dtype=torch.bool).tril()
    nodes = torch.full((k + 1, width), -1, dtype=torch.long)
    for n, j in enumerate(positions):
        for i in range(width):
            t = C + n * width + i
            depth[t] = j + 1
            visible[t, : j + 1] = True  # node 0 (the first token) .. node j (d_j)
            visible[t, t] = True
            nodes[j, i] = t
    pos = torch.tensor(positions, dtype=torch.long, device=dev)
    sib = alternatives[:, pos, :width].reshape(1, S)
    return TokenTree(depth.to(dev), visible.to(dev), sib, nodes.to(dev), width, list(positions))


def verdict(tree: TokenTree, logits: Tensor, accepted: Tensor, out: Tensor) -> Tensor:
    """After the chain's verdict (``accepted`` int32 [1], ``out`` [1, k + 1] from
    clasp.verify_greedy on the chain's logits): long [2] = (the sibling node that matched the
    target's token at the first rejected position, or -1; the target's token after it, the
    round's extra token). ``logits`` [1, T, V] are the whole tree's. On the device (no read)."""
    a = accepted.long()  # [1]
    target = out.gather(1, a[:, None])  # [1, 1]: the token emitted at the first rejection
    nodes = tree.nodes.index_select(0, a)  # [1, width]
    # [1, width]: the siblings' tokens (junk where a node is -1; masked below)
    sib = tree.sibling_tokens[0, (nodes - tree.first_sibling).clamp(min=0)]
    match = (nodes >= 0) & (sib == target)
    hit = match.any(-1)  # [1]
    node = nodes.gather(1, match.long().argmax(-1, keepdim=True))[:, 0]  # the first match
    extra = logits[0].index_select(0, node.clamp(min=0)).argmax(-1)  # [1] (junk without a hit)
    return torch.cat([torch.where(hit, node, torch.full_like(node, -1)), extra])
