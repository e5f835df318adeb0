"""Sibling branches of greedy layer-skip drafts (branches.py): the tree layout, the tree forward
against plain forwards of each node's own sequence, the verdict, the policy's width choice at
both ends of the cost range, and lossless greedy decoding with siblings accepted."""

from __future__ import annotations

import pytest
import torch
from decoding_models import FAMILIES, tiny_model
from test_decoding_greedy import assert_lossless, hf_greedy

from clasp_ext.decoding import ClaspDecoder, branches, generate
from clasp_ext.decoding.adapter import ModelAdapter
from clasp_ext.decoding.cost_model import CostTable
from clasp_ext.decoding.policy import BRANCH, LAYER_SKIP, CostPolicy

torch.set_num_threads(1)

FLAT = CostTable({1: 1.0, 2: 1.0, 4: 1.02, 9: 1.05, 17: 1.08}, draft_step_s=0.2, dp_s=1.0)
LINEAR = CostTable({1: 1.0, 2: 1.8, 4: 3.4, 9: 7.4}, draft_step_s=0.65, dp_s=8.0)


def test_layout_of_a_tree():
    """Chain of 3 drafts, 2 siblings at draft indices 1 and 2: nodes 0..3 the chain, then
    (d_2's siblings, d_3's siblings); each sibling sits at its draft's position and sees the
    chain before it and itself."""
    alts = torch.tensor([[[10, 11, 12], [20, 21, 22], [30, 31, 32]]])
    tree = branches.build(alts, [1, 2], 2)
    assert tree.depth.tolist() == [0, 1, 2, 3, 2, 2, 3, 3]
    assert tree.sibling_tokens.tolist() == [[20, 21, 30, 31]]
    assert tree.nodes.tolist() == [[-1, -1], [4, 5], [6, 7], [-1, -1]]
    assert tree.first_sibling == 4 and tree.num_siblings == 4
    assert [tree.rank(t) for t in (4, 5, 6, 7)] == [0, 1, 0, 1]
    vis = tree.visible.int().tolist()
    assert vis[3] == [1, 1, 1, 1, 0, 0, 0, 0]  # the chain is causal
    assert vis[5] == [1, 1, 0, 0, 0, 1, 0, 0]  # d_2's sibling: node 0, d_1, itself
    assert vis[6] == [1, 1, 1, 0, 0, 0, 1, 0]  # d_3's sibling: node 0, d_1, d_2, itself


def _logits_with_argmax(tokens: list[int], V: int = 16) -> torch.Tensor:
    x = torch.zeros(1, len(tokens), V)
    for t, tok in enumerate(tokens):
        x[0, t, tok] = 1.0
    return x


@pytest.mark.parametrize(
    ("accepted", "target", "positions", "want"),
    [
        (1, 21, [0, 1, 2], (7, 11)),  # rejected at d_2, its rank-1 sibling (node 7) matches
        (1, 20, [0, 1, 2], (6, 10)),  # rank 0
        (1, 7, [0, 1, 2], (-1, None)),  # no sibling matches
        (3, 21, [0, 1, 2], (-1, None)),  # every draft accepted: nothing to branch
        (1, 21, [0, 2], (-1, None)),  # d_2 had no siblings (a looked-up position)
        (0, 11, [0, 1, 2], (5, 9)),  # rejected at d_1
    ],
)
def test_verdict(accepted, target, positions, want):
    alts = torch.tensor([[[10, 11], [20, 21], [30, 31]]])
    tree = branches.build(alts, positions, 2)
    T = tree.depth.shape[0]
    # node t's argmax is t + 4 (so the extra token names the node it came from)
    logits = _logits_with_argmax([t + 4 for t in range(T)])
    out = torch.full((1, 4), -1, dtype=torch.long)
    out[0, accepted] = target
    got = branches.verdict(tree, logits, torch.tensor([accepted], dtype=torch.int32), out)
    node, extra = got.tolist()
    assert node == want[0]
    if node >= 0:
        assert extra == want[1]


@pytest.mark.parametrize("window", [8, 2])  # 2: the tree is deeper than the sliding window
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_tree_forward_equals_each_nodes_sequence(family, window):
    """Every node's logits from one tree forward equal the full model's on that node's own
    sequence (context, its chain ancestors, itself), past the sliding window too; and after an
    accepted sibling's K/V moves to its position's slot, the next token's forward equals the full
    model's on the sequence with the sibling in it."""
    model = tiny_model(family, layers=4, window=window, seed=3)
    a = ModelAdapter(model)
    gen = torch.Generator().manual_seed(7)
    V = model.config.vocab_size
    ctx = torch.randint(3, V, (1, 20), generator=gen)
    chain = torch.randint(3, V, (1, 4), generator=gen)  # t0, d_1, d_2, d_3
    alts = torch.randint(3, V, (1, 3, 2), generator=gen)
    tree = branches.build(alts, [0, 1, 2], 2)
    cache = a.new_cache(64, batch=1)
    a.forward(ctx, 0, cache)
    n = ctx.shape[1]
    ids = torch.cat([chain, tree.sibling_tokens], 1)
    h, _ = a.forward(ids, n, cache, tree=tree)
    got = a.head(h)[0]
    full = torch.cat([ctx, chain], 1)[0].tolist()
    for t in range(ids.shape[1]):
        if t < chain.shape[1]:
            seq = full[: n + t + 1]
        else:
            d = int(tree.depth[t])
            seq = full[: n + d] + [int(ids[0, t])]
        want = model(torch.tensor([seq])).logits[0, -1]
        torch.testing.assert_close(got[t], want, rtol=1e-4, atol=1e-4, msg=f"node {t}")
    # accept d_1, then d_2's first sibling (node 6): it moves to slot n + 2
    cache.move_slot(0, n + 6, n + 2)
    nxt = torch.randint(3, V, (1, 1), generator=gen)
    h, _ = a.forward(nxt, n + 3, cache)
    seq = full[: n + 2] + [int(ids[0, 6]), int(nxt)]
    want = model(torch.tensor([seq])).logits[0, -1]
    torch.testing.assert_close(a.head(h)[0, -1], want, rtol=1e-4, atol=1e-4)


def _policy(table, accept=0.6, miss=None):
    p = CostPolicy(table, exit_threshold=False)
    p.sources[LAYER_SKIP].accept.p = [accept]
    if miss is not None:
        est = p.sources[BRANCH].accept
        est.p = [miss] * len(est.p)
    return p


def test_width_follows_the_cost_table():
    """Where verify is flat siblings ride along (the widest allowed); where it grows like the
    tokens verified, none; and once they are seen to miss, none on a flat table either."""
    assert _policy(FLAT).branch_width(4, 4, 4, 2) == 2
    assert _policy(FLAT).branch_width(4, 4, 4, 1) == 1
    assert _policy(LINEAR).branch_width(4, 4, 4, 2) == 0
    assert _policy(FLAT, miss=1.0).branch_width(4, 4, 4, 2) == 0
    assert _policy(FLAT).branch_width(4, 0, 0, 2) == 0  # a looked-up draft: no positions
    # every draft accepted for sure: nothing is ever rejected, siblings cannot pay
    assert _policy(FLAT, accept=1.0).branch_width(4, 4, 4, 2) == 0


def test_branch_outcomes_teach_the_miss_estimate():
    """A hit at rank r is "r misses accepted, then one rejected" in the BRANCH source."""
    p = _policy(FLAT)
    before = list(p.sources[BRANCH].accept.p)
    p.observe_rows([(BRANCH, 2, 0, 2)])  # rank 0 hit
    assert p.sources[BRANCH].accept.p[0] < before[0]
    p.observe_rows([(BRANCH, 2, 2, 2)] * 20)  # misses
    assert p.sources[BRANCH].accept.p[0] > 0.9


COST = {"policy": "cost", "cost_table": FLAT}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("width", [1, 2, 3])
@torch.no_grad()
def test_greedy_with_siblings_equals_generate(family, width):
    """Greedy output with siblings equals model.generate (near-ties aside, checked), siblings
    are verified and accepted, and the token count adds up: each round emits its accepted
    drafts, one more, and one more again where a sibling matched."""
    model = tiny_model(family, layers=6, window=8, seed=11)
    gen = torch.Generator().manual_seed(5)
    rounds = hits = 0
    for _ in range(3):
        T = int(torch.randint(4, 24, (1,), generator=gen))
        ids = torch.randint(3, model.config.vocab_size, (1, T), generator=gen)
        want = hf_greedy(model, ids, 30)
        out = generate(
            model,
            ids,
            max_new_tokens=30,
            num_skip_layers=3,
            max_draft=5,
            draft_exit_threshold=0.0,
            lookup_ngram=0,
            eos_token_id=[],
            draft_branches=width,
            **COST,
        )
        assert_lossless(model, out.sequences[0].tolist(), want, T)
        s = out.stats
        assert s.round_tokens == s.accepted + s.branch_hits + s.rounds == 29
        rounds += s.branch_rounds
        hits += s.branch_hits
    assert rounds > 0 and hits > 0


@torch.no_grad()
def test_keep_logits_with_siblings():
    """keep_logits reports, for a token emitted from a sibling, that sibling's verify logits:
    the full model's on the sequence before the token, as for every other token."""
    model = tiny_model("llama", layers=6, seed=11)
    ids = torch.randint(
        3, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2)
    )
    dec = ClaspDecoder(
        model,
        max_new_tokens=30,
        num_skip_layers=3,
        lookup_ngram=0,
        eos_token_id=[],
        draft_exit_threshold=0.0,
        keep_logits=True,
        **COST,
    )
    out = dec.generate(ids)
    assert out.stats.branch_hits > 0
    toks = out.sequences[0].tolist()
    want = model(torch.tensor([toks])).logits[0, ids.shape[1] - 1 : -1]
    torch.testing.assert_close(torch.stack(dec.token_logits), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "setting",
    [
        {"policy": "fixed"},  # today's fixed policy: chains
        {**COST, "temperature": 1.0, "seed": 0},  # sampling: chains (greedy siblings only)
        {**COST, "draft_branches": 0},
        {**COST, "cost_table": LINEAR},  # siblings cost a verify token each: none
    ],
)
@torch.no_grad()
def test_no_siblings_where_they_do_not_apply(setting):
    model = tiny_model("qwen2", layers=6, seed=4)
    ids = torch.randint(
        3, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1)
    )
    out = generate(model, ids, max_new_tokens=20, num_skip_layers=2, eos_token_id=[], **setting)
    assert out.stats.branch_rounds == 0 and out.stats.branch_hits == 0
