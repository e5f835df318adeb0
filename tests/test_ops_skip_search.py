"""skip_search_step / skip_search_backtrack: against the reference, against a straightforward
Python implementation of SPEC.md section 2 over a whole random model, and against brute force."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import LAYOUTS, assert_same_as_cpu_kernel, strided_rows, strided_view
from tolerances import FLOAT_DTYPES, assert_scores_close

import clasp_ext
from clasp_ext import reference

# (layer, M): first layer, layer < M, layer == M, layer > M, M = 0 (and M = 0 at layer 0).
STEP_CASES = ((0, 0), (0, 3), (2, 5), (4, 4), (7, 3), (5, 0), (1, 1))


def _step_inputs(B, M, layer, d, dtype, device):
    n_keep = min(layer, M)
    prev = torch.randn(B, M + 1, d, device=device).to(dtype)
    # Rows of prev past min(i - 1, M) = min(layer, M) are unreachable: the op must ignore them.
    prev[:, n_keep + 1 :] = float("nan")
    target = torch.randn(B, d, device=device).to(dtype)
    # Half of the keep candidates lie next to the target (cosine ~0.999: keep must win there),
    # the others are random (either choice).
    computed = torch.randn(B, n_keep, d, device=device)
    near = torch.rand(B, n_keep, 1, device=device) < 0.5
    near_value = target[:, None].float() + 0.03 * target.float().norm(dim=-1)[:, None, None] * (
        computed / computed.norm(dim=-1, keepdim=True)
    )
    computed = torch.where(near, near_value, computed).to(dtype)
    return prev, computed, target, near[..., 0]


def _check_step_against_reference(prev, computed, target, layer, dtype, device):
    out = clasp_ext.skip_search_step(prev, computed, target, layer)
    ref = reference.skip_search_step(prev, computed, target, layer)
    nxt, choice, score = out
    B, W, d = prev.shape
    assert nxt.shape == (B, W, d) and nxt.dtype == prev.dtype and nxt.is_contiguous()
    assert choice.shape == (B, W) and choice.dtype == torch.uint8
    assert score.shape == (B, W) and score.dtype == torch.float32
    assert torch.equal(choice, ref[1]), "choices differ from the reference"
    # States are copies of inputs: bitwise equal (NaN-free, unreachable rows zero).
    assert torch.equal(nxt, ref[0]), "next states differ from the reference"
    assert_scores_close(score, ref[2], "cosine", dtype)
    assert_same_as_cpu_kernel(
        device, clasp_ext.skip_search_step, (prev, computed, target, layer), out, (0, 1)
    )
    return out


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
# No d = 1: every 1-d pair of candidates is an exact tie (cosines +-1) that rounding may break
# either way, so choices would not be comparable (ties of identical vectors are tested below).
@pytest.mark.parametrize("d", (7, 640, 4097))
@pytest.mark.parametrize("layer,M", STEP_CASES)
@pytest.mark.parametrize("B", (1, 3))
def test_step_matches_reference(device, dtype, d, layer, M, B):
    prev, computed, target, near = _step_inputs(B, M, layer, d, dtype, device)
    nxt, choice, score = _check_step_against_reference(prev, computed, target, layer, dtype, device)
    i, n_keep = layer + 1, min(layer, M)
    reach = min(i, M)
    # The cell structure of SPEC section 2, independent of the reference.
    assert torch.equal(nxt[:, 0], target)  # g(i, 0) = h_i
    assert (choice[:, 0] == 0).all()
    if reach > n_keep:  # g(i, i) = g(i-1, i-1): forced skip
        assert (choice[:, i] == 1).all()
        assert torch.equal(nxt[:, i], prev[:, i - 1])
    assert (choice[:, reach + 1 :] == 0).all()
    assert (nxt[:, reach + 1 :] == 0).all()
    assert torch.isneginf(score[:, reach + 1 :]).all()
    assert torch.isfinite(score[:, : reach + 1]).all()
    assert (choice[:, 1 : n_keep + 1][near] == 0).all(), "a near-perfect keep lost"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_step_non_contiguous(device, dtype, layout):
    layer, M, d = 6, 4, 640
    prev, computed, target, _ = _step_inputs(3, M, layer, d, dtype, device)
    expected = clasp_ext.skip_search_step(prev, computed, target, layer)
    args = (strided_view(prev, layout), strided_view(computed, layout), strided_rows(target))
    assert not any(a.is_contiguous() for a in args)
    out = clasp_ext.skip_search_step(*args, layer)
    for got, want in zip(out, expected, strict=True):
        assert torch.equal(got, want)
    _check_step_against_reference(*args, layer, dtype, device)


def test_step_ties_go_to_skip(device):
    """keep == skip (same vector): every compared cell chooses skip."""
    layer, M, d = 5, 4, 64
    prev, _, target, _ = _step_inputs(2, M, layer, d, torch.float32, device)
    computed = prev[:, :M].clone()  # computed[:, j-1] (keep) == prev[:, j-1] (skip)
    _, choice, _ = _check_step_against_reference(
        prev, computed, target, layer, torch.float32, device
    )
    assert (choice[:, 1:] == 1).all()


def test_step_keep_wins_when_strictly_better(device):
    layer, M, d = 5, 4, 64
    prev, _, target, _ = _step_inputs(2, M, layer, d, torch.float32, device)
    computed = target[:, None].expand(2, M, d).clone()  # cosine 1 with the target
    computed[0, 1] *= 3.0  # scaling keeps the cosine: still strictly better than random skips
    nxt, choice, score = _check_step_against_reference(
        prev, computed, target, layer, torch.float32, device
    )
    assert (choice[:, 1:] == 0).all()
    assert torch.equal(nxt[:, 1:], computed)


def test_step_nan_resolves_to_skip(device):
    """NaN on either side makes the rule choose skip (total order), like the reference."""
    layer, M, d = 3, 3, 16
    prev, computed, target, _ = _step_inputs(1, M, layer, d, torch.float32, device)
    computed[0, 0] = float("nan")  # NaN keep at j = 1
    prev[0, 1] = float("nan")  # NaN skip at j = 2
    computed[0, 1] = target[0]  # ... even against a perfect keep
    nxt, choice, score = clasp_ext.skip_search_step(prev, computed, target, layer)
    ref = reference.skip_search_step(prev, computed, target, layer)
    assert choice[0, 1] == 1 and choice[0, 2] == 1
    assert torch.equal(choice, ref[1])
    torch.testing.assert_close(nxt, ref[0], atol=0, rtol=0, equal_nan=True)
    assert torch.isnan(score[0, 2])


@pytest.mark.parametrize("B,L,M", ((1, 1, 0), (3, 6, 2), (5, 12, 7), (2, 9, 9), (4, 3, 1)))
@pytest.mark.parametrize("strided", (False, True))
def test_backtrack_matches_reference(device, B, L, M, strided):
    # Arbitrary tables, including non-zero values other than 1 ("nonzero = skip").
    choices = torch.randint(0, 3, (B, 2 * L, 2 * (M + 1)), dtype=torch.uint8, device=device)
    # Any strides are accepted for the choice table, the last dimension's included.
    choices = choices[:, ::2, ::2] if strided else choices[:, :L, : M + 1].contiguous()
    assert choices.shape == (B, L, M + 1)
    assert choices.is_contiguous() != (strided and L * (M + 1) > 1)
    for num_skip in range(min(M, L) + 1):
        mask = clasp_ext.skip_search_backtrack(choices, num_skip)
        assert mask.shape == (B, L) and mask.dtype == torch.bool
        assert torch.equal(mask, reference.skip_search_backtrack(choices, num_skip))
        assert_same_as_cpu_kernel(
            device, clasp_ext.skip_search_backtrack, (choices, num_skip), mask, (0,)
        )


def _valid_choice_table(B, L, M, device):
    """A table the DP could produce: random compare cells, forced skips at j == i <= M."""
    ch = torch.zeros(B, L, M + 1, dtype=torch.uint8)
    for row in range(L):
        i = row + 1
        for j in range(1, min(i, M) + 1):
            ch[:, row, j] = 1 if j == i else torch.randint(0, 2, (B,), dtype=torch.uint8)
    return ch.to(device)


@pytest.mark.parametrize("L,M", ((1, 1), (5, 0), (5, 2), (8, 7), (16, 8), (40, 13)))
def test_backtrack_skips_exactly_num_skip(device, L, M):
    choices = _valid_choice_table(16, L, M, device)
    for num_skip in range(M + 1):
        mask = clasp_ext.skip_search_backtrack(choices, num_skip)
        assert (mask.sum(dim=1) == num_skip).all()


def test_backtrack_empty(device):
    assert clasp_ext.skip_search_backtrack(
        torch.zeros(2, 0, 1, dtype=torch.uint8, device=device), 0
    ).shape == (2, 0)
    assert clasp_ext.skip_search_backtrack(
        torch.zeros(0, 4, 3, dtype=torch.uint8, device=device), 2
    ).shape == (0, 4)


# ---- a whole random "model" --------------------------------------------------------------------


class RandomModel:
    """L residual layers x + update * tanh(W_i x + b_i) standing in for decoder layers, and an
    RMSNorm-like final norm with a non-trivial weight. Computed in float64 and rounded to the
    state dtype, so batched and per-vector calls give the same values bit for bit."""

    def __init__(self, L: int, d: int, dtype: torch.dtype, device: str, update: float = 1.0):
        self.L, self.d, self.dtype, self.update = L, d, dtype, update
        kw = {"dtype": torch.float64, "device": device}
        self.W = [torch.randn(d, d, **kw) * (1.5 / math.sqrt(d)) for _ in range(L)]
        self.b = [0.3 * torch.randn(d, **kw) for _ in range(L)]
        self.norm_w = 1.0 + 0.5 * torch.randn(d, **kw)

    def layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        x64 = x.double()
        return (x64 + self.update * torch.tanh(x64 @ self.W[i].T + self.b[i])).to(self.dtype)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        x64 = x.double()
        rms = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (x64 * rms * self.norm_w).to(self.dtype)

    def trajectory(self, h0: torch.Tensor) -> torch.Tensor:
        """h_0..h_L of the full model: [B, L+1, d]."""
        hs = [h0.to(self.dtype)]
        for i in range(self.L):
            hs.append(self.layer(i, hs[-1]))
        return torch.stack(hs, dim=1)

    def draft_final(self, h0: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """N(h'_L) of the draft models with skip masks `skip` [C, L]: [C, B, d]."""
        x = h0.to(self.dtype).expand(skip.shape[0], *h0.shape)
        for i in range(self.L):
            x = torch.where(skip[:, i, None, None], x, self.layer(i, x))
        return self.norm(x)

    def draft_final_per_sequence(self, h0: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """N(h'_L) with one skip mask per sequence, skip [B, L]: [B, d]."""
        x = h0.to(self.dtype)
        for i in range(self.L):
            x = torch.where(skip[:, i, None], x, self.layer(i, x))
        return self.norm(x)


def run_dp_with_ops(model: RandomModel, h: torch.Tensor, M: int):
    """The DP driven by the ops: skip_search_step for layers 0..L-1 (final-norm rule at i = L),
    then skip_search_backtrack. Returns (mask [B, L], states [L+1 x [B, M+1, d]], choices
    [B, L, M+1], scores [L x [B, M+1]])."""
    B, L1, d = h.shape
    L = L1 - 1
    prev = torch.zeros(B, M + 1, d, dtype=h.dtype, device=h.device)
    prev[:, 0] = h[:, 0]  # g(0, 0) = h_0; g(0, j > 0) unreachable
    states, choices, scores = [prev], [], []
    for layer in range(L):
        n_keep = min(layer, M)
        computed = model.layer(layer, prev[:, 1 : n_keep + 1])  # f_layer(g(i-1, k+1)), k < l
        target = h[:, layer + 1]
        if layer == L - 1:  # i = L: compare what the lm_head would see
            prev, computed, target = model.norm(prev), model.norm(computed), model.norm(target)
        prev, choice, score = clasp_ext.skip_search_step(prev, computed, target, layer)
        states.append(prev)
        choices.append(choice)
        scores.append(score)
    table = torch.stack(choices, dim=1)
    return clasp_ext.skip_search_backtrack(table, M), states, table, scores


def spec_dp(model: RandomModel, h: torch.Tensor, M: int):
    """SPEC.md section 2, literally, for one sequence h [L+1, d]: g(i, j) in a dict, explicit
    keep/skip comparison (ties to skip), backtracking through the stored choices."""
    L = h.shape[0] - 1

    def cos(x, y):
        return F.cosine_similarity(x.double(), y.double(), dim=0, eps=1e-8).item()

    g = {(0, 0): h[0]}
    choice: dict[tuple[int, int], bool] = {}
    score: dict[tuple[int, int], float] = {}
    for i in range(1, L + 1):
        view = model.norm if i == L else (lambda x: x)  # final norm on both sides at i = L
        target = view(h[i])
        g[(i, 0)] = h[i]
        score[(i, 0)] = cos(target, target)
        for j in range(1, min(i, M) + 1):
            skip = g[(i - 1, j - 1)]
            if j == i:  # everything so far skipped
                g[(i, j)], choice[(i, j)] = skip, True
                score[(i, j)] = cos(view(skip), target)
                continue
            keep = model.layer(i - 1, g[(i - 1, j)])
            c_keep, c_skip = cos(view(keep), target), cos(view(skip), target)
            take_skip = not (c_keep > c_skip)
            g[(i, j)] = skip if take_skip else keep
            choice[(i, j)] = take_skip
            score[(i, j)] = c_skip if take_skip else c_keep
    mask = [False] * L
    j = M
    for i in range(L, 0, -1):
        if j > 0 and choice[(i, j)]:
            mask[i - 1] = True
            j -= 1
    return g, choice, score, mask


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("L,M", ((1, 0), (3, 2), (6, 0), (6, 3), (12, 5), (12, 11), (20, 8)))
def test_model_dp_matches_spec(device, dtype, L, M):
    B, d = 3, 24
    model = RandomModel(L, d, dtype, device)
    h = model.trajectory(torch.randn(B, d, device=device) + 0.2)
    mask, states, table, scores = run_dp_with_ops(model, h, M)
    for b in range(B):
        g, choice, score, spec_mask = spec_dp(model, h[b], M)
        assert mask[b].tolist() == spec_mask, f"sequence {b}: skip mask differs from the spec"
        assert int(mask[b].sum()) == M
        for (i, j), take_skip in choice.items():
            assert int(table[b, i - 1, j]) == int(take_skip), f"choice ({i}, {j}) of sequence {b}"
        for (i, j), state in g.items():
            if i == 0:
                continue
            want = model.norm(state) if i == L else state
            assert torch.equal(states[i][b, j], want), f"state g({i}, {j}) of sequence {b}"
            assert scores[i - 1][b, j].item() == pytest.approx(score[(i, j)], abs=2e-6)
    assert_same_as_cpu_kernel(device, clasp_ext.skip_search_backtrack, (table, M), mask, (0,))


# (L, M) with L <= 10 for exhaustive search over all C(L, M) skip sets.
BRUTE_FORCE_CASES = ((4, 1), (5, 2), (6, 3), (8, 2), (8, 4), (9, 6), (10, 3), (10, 5), (10, 8))


# Per-layer update size: "strong" layers (|update| ~ |h|) and "residual" ones that nudge the
# stream like the decoder layers of a trained LLM.
@pytest.mark.parametrize("kind,update", (("strong", 1.0), ("residual", 0.25)))
def test_dp_vs_brute_force(device, report, kind, update):
    """The DP's set against the best of all C(L, M) sets by the final cosine (after the norm).
    The DP keeps one state per cell, so it is not guaranteed optimal: the match rate is reported;
    it must beat a uniformly random set on average, and its final cosine is the DP's own score."""
    B, d = 48, 16
    matches = trials = beats_random = 0
    dp_total = random_total = 0.0
    lines = []
    for L, M in BRUTE_FORCE_CASES:
        model = RandomModel(L, d, torch.float32, device, update)
        h = model.trajectory(torch.randn(B, d, device=device) + 0.2)
        mask, _, _, scores = run_dp_with_ops(model, h, M)
        assert (mask.sum(dim=1) == M).all()

        sets = list(itertools.combinations(range(L), M))
        all_masks = torch.zeros(len(sets), L, dtype=torch.bool, device=device)
        for c, s in enumerate(sets):
            all_masks[c, list(s)] = True
        target = model.norm(h[:, L]).double()
        final = F.cosine_similarity(
            model.draft_final(h[:, 0], all_masks).double(), target, dim=-1
        )  # [C, B]
        dp_final = F.cosine_similarity(
            model.draft_final_per_sequence(h[:, 0], mask).double(), target, dim=-1
        )  # [B]
        # The DP's mask reproduces g(L, M): its final cosine is the DP's score of cell (L, M).
        torch.testing.assert_close(dp_final.float(), scores[-1][:, M], atol=2e-6, rtol=0)
        best = final.max(dim=0).values
        case_matches = int((dp_final >= best - 1e-9).sum())
        assert (dp_final <= best + 1e-9).all()  # brute force covers the DP's set
        matches += case_matches
        trials += B
        dp_total += dp_final.sum().item()
        random_total += final.mean(dim=0).sum().item()
        beats_random += int((dp_final >= final.mean(dim=0)).sum())
        lines.append(
            f"  L={L:2d} M={M}: DP optimal in {case_matches}/{B}; mean final cos DP "
            f"{dp_final.mean():.4f}, best {best.mean():.4f}, random set {final.mean():.4f}"
        )
    report(
        f"DP vs brute force ({device}, {kind} layers): DP set optimal in {matches}/{trials} "
        f"= {100 * matches / trials:.1f}% of trials; at least the random-set mean in "
        f"{beats_random}/{trials}; mean final cos DP {dp_total / trials:.4f} vs random set "
        f"{random_total / trials:.4f}"
    )
    for line in lines:
        report(line)
    assert dp_total / trials > random_total / trials, "DP worse than a random set on average"
