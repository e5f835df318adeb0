"""bench/bench_sublayer_dp.py's pieces on tiny fp32 models: the knapsack DP over attention and MLP
blocks (its set costs exactly the budget, and the score it reports is the cosine of the draft
that set runs), the teacher-forced draft (with nothing skipped: the full model's logits) and the
tau it reads off."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from decoding_models import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_sublayer_dp as sub  # noqa: E402

from clasp_ext.decoding.adapter import ModelAdapter  # noqa: E402

torch.set_num_threads(1)


def prefilled(family="llama", layers=6, prompt=12, window=8):
    model = tiny_model(family, layers=layers, window=window)
    adapter = ModelAdapter(model)
    ids = torch.randint(3, 256, (1, prompt), generator=torch.Generator().manual_seed(1))
    cache = adapter.new_cache(64)
    with torch.no_grad():
        _, hs = adapter.forward(ids, 0, cache, keep_hidden="last")
    return model, adapter, sub.Blocks(adapter), ids, cache, torch.cat(hs, 1)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("costs,budget", [((1, 1), 5), ((1, 3), 8), ((2, 1), 7)])
def test_knapsack_set_costs_the_budget_and_scores_its_own_draft(family, costs, budget):
    model, adapter, blocks, ids, cache, target = prefilled(family)
    L, P = adapter.num_layers, ids.shape[1]
    c = list(costs) * L
    a, m, score = sub.knapsack_skip_search(adapter, blocks, cache, target, P - 1, 40, c, budget)
    assert sum(costs[0] for x in a if x) + sum(costs[1] for x in m if x) == budget
    # the draft that set runs, for the target token over the same cache: its final state's
    # cosine with the full model's is what the DP reported (the DP's state is that very chain)
    with torch.no_grad():
        h = sub.draft_hidden(adapter, blocks, None, cache, ids[0, -1:], [P - 1], 40, a, m)
        want = F.cosine_similarity(
            adapter.final_norm(h)[0, 0].float(), adapter.final_norm(target[:, L]).float()[0], dim=0
        )
    assert score == pytest.approx(float(want), abs=1e-5)
    assert score < 1.0


def test_knapsack_never_skips_a_block_dearer_than_the_budget():
    _, adapter, blocks, ids, cache, target = prefilled()
    L, P = adapter.num_layers, ids.shape[1]
    a, m, _ = sub.knapsack_skip_search(adapter, blocks, cache, target, P - 1, 40, [9, 1] * L, 3)
    assert not any(a) and sum(m) == 3
    a, m, score = sub.knapsack_skip_search(adapter, blocks, cache, target, P - 1, 40, [1, 1] * L, 0)
    assert not any(a) and not any(m) and score == pytest.approx(1.0, abs=1e-5)


def test_teacher_forced_draft_without_skips_is_the_full_model():
    model, adapter, blocks, ids, cache, _ = prefilled(window=4)  # a window that binds
    P = ids.shape[1]
    out = torch.randint(3, 256, (6,), generator=torch.Generator().manual_seed(2))
    full = torch.cat([ids[0], out])
    with torch.no_grad():
        adapter.forward(out[None], P, cache)  # the output's K/V after the prompt's
        none = [False] * adapter.num_layers
        positions = list(range(P - 1, full.shape[0] - 1))
        h = sub.draft_hidden(
            adapter, blocks, None, cache, full[P - 1 : -1], positions, 40, none, none
        )
        ref = model(full[None]).logits[0, P - 1 : -1]
    torch.testing.assert_close(adapter.head(h)[0], ref, atol=1e-4, rtol=1e-4)


def test_tau_is_the_mean_correct_run_from_each_start_plus_one():
    acc, tau = sub.accuracy([True, True, False, True], max_draft=8)
    # runs from each start: 2, 1, 0, 1 -> 1 + each
    assert acc == 0.75 and tau == pytest.approx((3 + 2 + 1 + 2) / 4)
    assert sub.accuracy([True] * 5, max_draft=2)[1] == pytest.approx(
        (3 + 3 + 3 + 3 + 2) / 5
    )  # runs 5..1 capped at 2
