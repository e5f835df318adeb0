"""The measured cost table (cost_model.py) and the per-round policy of ClaspConfig(policy="cost")
(policy.py): choices at both ends of the hardware range, the running acceptance estimates, the
disk cache, calibration on a tiny model, and lossless greedy output under the policy."""

from __future__ import annotations

import json
import math

import pytest
import torch
from decoding_models import FAMILIES, tiny_model
from test_decoding_greedy import assert_lossless, hf_greedy
from test_decoding_lookup import prompt_that_repeats_its_continuation

from clasp_ext import timing
from clasp_ext.decoding import ClaspDecoder, generate
from clasp_ext.decoding import cost_model as cm
from clasp_ext.decoding.cost_model import CostTable
from clasp_ext.decoding.policy import (
    BRANCH,
    CHAIN_PROBE,
    LAYER_SKIP,
    LEVEL_ROUNDS,
    LONG_LOOKUP,
    LOOKUP,
    PLAIN,
    RATE,
    SHORT_LOOKUP,
    CostPolicy,
    lookup_source,
    prior_left,
)

torch.set_num_threads(1)
pytestmark = pytest.mark.measured_cost_table

MAX_DRAFT = 8
# verify(T) in units of one step
FLAT = CostTable({1: 1.0, 2: 1.0, 4: 1.02, 9: 1.05}, draft_step_s=0.2, dp_s=1.0)  # GPU, AMX CPU
LINEAR = CostTable({1: 1.0, 2: 1.8, 4: 3.4, 9: 7.4}, draft_step_s=0.65, dp_s=8.0)  # AVX2 bf16
FP32_CPU = CostTable({1: 1.0, 2: 1.13, 4: 1.4, 9: 2.1}, draft_step_s=0.65, dp_s=3.0)


@pytest.fixture(autouse=True)
def _cache_dir(monkeypatch, tmp_path):
    """Cost tables go to a test folder and the in-memory cache starts empty."""
    monkeypatch.setenv("CLASP_CACHE", str(tmp_path))
    monkeypatch.delenv("CLASP_COST_TABLES", raising=False)
    monkeypatch.setattr(cm, "_MEMORY", {})


def policy(table, acceptance=None, dp_per_round=0.0, cont=None):
    """A policy with acceptance ``{source: a}`` at every position; layer-skip drafts go on after
    each token with probability ``cont`` (None: they never stop themselves, threshold 0)."""
    p = CostPolicy(table, exit_threshold=cont is not None, dp_s_per_round=dp_per_round)
    for kind, a in (acceptance or {}).items():
        est = p.sources[kind].accept
        est.p = [a] * len(est.p)
    if cont is not None:
        p.sources[LAYER_SKIP].cont.p = [cont]
    return p


def test_table_interpolates():
    t = CostTable({1: 1.0, 2: 0.8, 4: 3.0, 8: 5.0}, 0.1, 0.0)
    assert t.verify(1) == 1.0
    assert t.verify(2) == 0.8  # a measured dip is kept (a 1-token GEMV path can be slower)
    assert t.verify(3) == pytest.approx(1.9)
    assert t.verify(6) == pytest.approx(4.0)
    assert t.verify(10) == pytest.approx(6.0)  # extrapolated along the last segment
    assert CostTable({1: 1.0, 4: 0.9}, 0.1, 0.0).verify(9) == 0.9  # never downward
    # such a dip makes a one-token draft cheaper than a plain step: worth it at any acceptance
    dip = policy(CostTable({1: 1.0, 2: 0.8, 9: 1.1}, 0.6, 1.0), {LOOKUP: 0.05})
    assert dip.choose(MAX_DRAFT, lookup_len=3).kind == LOOKUP
    with pytest.raises(ValueError, match="verify_s"):
        CostTable({2: 1.0}, 0.1, 0.0)


def test_flat_verify_cost_drafts_long_at_high_acceptance():
    p = policy(FLAT, {LOOKUP: 0.95, LAYER_SKIP: 0.95}, dp_per_round=1.0 / 8)
    c = p.choose(MAX_DRAFT, lookup_len=0)
    assert (c.kind, c.k) == (LAYER_SKIP, MAX_DRAFT)
    c = p.choose(MAX_DRAFT, lookup_len=6)  # a free draft beats one that costs draft steps
    assert (c.kind, c.k) == (LOOKUP, 6)
    assert p.choose(3, lookup_len=0).k == 3  # never past the round's limit
    # at lower acceptance the layer-skip draft gets shorter, then stops paying
    assert 0 < policy(FLAT, {LAYER_SKIP: 0.7}).choose(MAX_DRAFT, 0).k < MAX_DRAFT
    assert policy(FLAT, {LAYER_SKIP: 0.15}).choose(MAX_DRAFT, 0).kind == PLAIN
    # a lookup draft costs no draft steps: even a mediocre one pays when verify is flat
    assert policy(FLAT, {LOOKUP: 0.3, LAYER_SKIP: 0.1}).choose(MAX_DRAFT, 4).kind == LOOKUP


def test_linear_verify_cost_prefers_plain_steps():
    p = policy(LINEAR)  # the priors
    assert p.choose(MAX_DRAFT, lookup_len=8).kind == PLAIN
    assert not p.may_choose(LAYER_SKIP, MAX_DRAFT)  # never chosen: no DP needed
    assert policy(FLAT).may_choose(LAYER_SKIP, MAX_DRAFT)
    assert policy(LINEAR, {LAYER_SKIP: 1.0}).choose(MAX_DRAFT, 0).kind == PLAIN
    assert policy(LINEAR, {LOOKUP: 0.5}).choose(MAX_DRAFT, 8).kind == PLAIN
    assert policy(LINEAR, {LOOKUP: 0.99}).choose(MAX_DRAFT, 8).kind == LOOKUP  # a copied span
    # in between (fp32 on such a CPU): short layer-skip drafts only when acceptance is high
    c = policy(FP32_CPU, {LAYER_SKIP: 0.9}).choose(MAX_DRAFT, 0)
    assert c.kind == LAYER_SKIP and c.k <= 4
    assert policy(FP32_CPU, {LAYER_SKIP: 0.4}).choose(MAX_DRAFT, 0).kind == PLAIN


def test_running_estimates_follow_observations():
    p = policy(FP32_CPU, {LAYER_SKIP: 0.9})
    assert p.choose(MAX_DRAFT, 0).kind == LAYER_SKIP
    est = p.sources[LAYER_SKIP].accept
    p.observe(LAYER_SKIP, drafted=4, accepted=3, k_max=4)  # 3 accepted, the 4th rejected
    # one pooled group for all positions; weights 1/3, 1/4, 1/5, 1/6: 0.9 -> .93 -> .95 -> .96 -> .8
    assert est.n == [4] and est.p[0] == pytest.approx(0.8)
    lookup = p.sources[LOOKUP].accept  # two groups: the first position, the rest
    p.observe(LOOKUP, drafted=6, accepted=2)
    assert lookup.n == [1, 2] and lookup.p[0] > lookup.prior[0]
    fresh = policy(LINEAR, {LOOKUP: 0.99})  # a lookup that fails twice is dropped
    assert fresh.choose(MAX_DRAFT, 8).kind == LOOKUP
    fresh.observe(LOOKUP, drafted=8, accepted=0)
    fresh.observe(LOOKUP, drafted=8, accepted=0)
    assert fresh.choose(MAX_DRAFT, 8).kind == PLAIN
    for _ in range(20):  # the draft keeps failing at its first token
        p.observe(LAYER_SKIP, drafted=2, accepted=0, k_max=8)
    assert est.p[0] < 0.1
    assert p.choose(MAX_DRAFT, 0).kind == PLAIN
    # unused sources drift back toward their prior (so they are retried some time)
    lookup.p = [0.0, 0.0]
    p.observe(PLAIN, 0, 0)
    assert 0.0 < lookup.p[0] < lookup.prior[0]
    assert [e for e, _ in p.sources[LOOKUP].expected(3, ones=True)] == [1.0, 2.0, 3.0, 4.0]


def test_exit_threshold_makes_long_drafts_cheap_in_expectation():
    """A draft that stops itself costs the draft steps it takes, not k's: the expected tokens and
    cost follow the learned chance that it goes on."""
    stopping = policy(FLAT, {LAYER_SKIP: 0.9}, cont=0.4).choose(MAX_DRAFT, 0)
    assert (stopping.kind, stopping.k) == (LAYER_SKIP, MAX_DRAFT)
    # it drafts ~1.7 tokens on average, so expects fewer tokens per round than a full-length one
    assert stopping.rate < policy(FLAT, {LAYER_SKIP: 0.9}).choose(MAX_DRAFT, 0).rate
    src = policy(FLAT, cont=0.7).sources[LAYER_SKIP]
    e = src.expected(4)
    assert e[1] == (pytest.approx(1.8), 1.0)  # one token drafted, accepted at 0.8
    assert e[2][1] == pytest.approx(1.7)  # the second drafted when the first went on
    src.observe(drafted=2, accepted=2, k_max=8)  # went on after the first, stopped after the 2nd
    assert src.cont.n == [2] and src.cont.p[0] < 0.7 + 0.5 * 0.3
    src.observe(drafted=8, accepted=3, k_max=8)  # ran to the limit: no stop observed
    assert src.cont.n == [9]


def test_disk_cache_round_trips_and_is_keyed_by_setup(tmp_path, monkeypatch):
    model = tiny_model("llama", layers=3)
    dec = ClaspDecoder(model, policy="cost", num_skip_layers=1, max_draft=3)
    table = dec.cost_table
    path = tmp_path / "cost_tables" / f"{cm.key_of(table.setup)}.json"
    assert table.path == str(path) and path.exists()
    on_disk = json.loads(path.read_text())["verify_s"]
    assert on_disk == {str(k): v for k, v in table.verify_s.items()}
    assert table.setup["num_layers"] == 3 and table.setup["dtype"] == "float32"

    measure = cm.calibrate

    def no_calibration(*a, **k):
        raise AssertionError("calibrated again instead of reading the cache")

    monkeypatch.setattr(cm, "calibrate", no_calibration)
    assert ClaspDecoder(model, policy="cost", num_skip_layers=1, max_draft=3).cost_table is table
    monkeypatch.setattr(cm, "_MEMORY", {})  # a new process: read back from disk
    again = ClaspDecoder(model, policy="cost", num_skip_layers=1, max_draft=3).cost_table
    assert again.verify_s == table.verify_s and again.setup == table.setup
    assert again.draft_step_s == table.draft_step_s and again.path == table.path
    # a shorter longest verify reads the same table; a longer one measures it again, up to it
    shorter = ClaspDecoder(model, policy="cost", num_skip_layers=1, max_draft=2, max_lookup=2)
    assert shorter.cost_table is again
    with pytest.raises(AssertionError, match="calibrated again"):
        ClaspDecoder(model, policy="cost", num_skip_layers=1, max_draft=3, max_lookup=20)
    monkeypatch.setattr(cm, "calibrate", measure)
    longer = ClaspDecoder(model, policy="cost", num_skip_layers=1, max_draft=3, max_lookup=20)
    assert longer.cost_table is shorter.cost_table and max(shorter.cost_table.verify_s) == 21
    monkeypatch.setattr(cm, "calibrate", no_calibration)
    # another setup is another key (and would be measured)
    for other in ({"num_skip_layers": 2}, {"draft_weights": "int8"}):
        with pytest.raises(AssertionError, match="calibrated again"):
            ClaspDecoder(model, policy="cost", **{"num_skip_layers": 1, "max_draft": 3, **other})
    with pytest.raises(AssertionError, match="calibrated again"):
        ClaspDecoder(model.to(torch.bfloat16), policy="cost", num_skip_layers=1, max_draft=3)
    assert ClaspDecoder(model, max_draft=3, policy="fixed").cost_table is None  # measures nothing


def test_calibration_on_tiny_model_is_fast_and_sane(tmp_path, monkeypatch):
    monkeypatch.setattr(cm, "_MEMORY", {})  # no table of another test
    monkeypatch.setenv("CLASP_COST_TABLES", str(tmp_path))
    model = tiny_model("qwen2", layers=4)
    dec = ClaspDecoder(model, policy="cost", num_skip_layers=2, max_draft=MAX_DRAFT, max_lookup=4)
    t = dec.cost_table
    # the longest verify is measured: a layer-skip draft of 8 with 2 siblings per token
    longest = 1 + MAX_DRAFT * 3
    assert list(t.verify_s) == [1, 2, 4, 8, longest]
    # decoders of the same setup with shorter rounds read that table
    chains = ClaspDecoder(
        model, policy="cost", num_skip_layers=2, max_draft=MAX_DRAFT, max_lookup=4, draft_branches=0
    )
    assert chains.cost_table is t
    # alone, chains measure up to their longest round: a lookup of 16 (17 tokens) here
    monkeypatch.setattr(cm, "_MEMORY", {})
    monkeypatch.setenv("CLASP_COST_TABLES", str(tmp_path / "alone"))
    lookup = ClaspDecoder(model, policy="cost", num_skip_layers=2, max_draft=4, draft_branches=0)
    assert list(lookup.cost_table.verify_s) == [1, 2, 4, 8, 17]
    assert all(s > 0 for s in t.verify_s.values()) and t.draft_step_s > 0 and t.dp_s > 0
    # monotone-ish: timing noise aside, more tokens do not cost much less
    assert t.verify_s[longest] > 0.5 * t.verify_s[1]
    assert t.draft_step_s < 2 * t.verify_s[longest]
    assert t.calibration_s < 5.0
    assert "verify ms" in t.describe()


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_cost_policy_is_lossless(family):
    model = tiny_model(family, layers=6, seed=5)
    ids = prompt_that_repeats_its_continuation(model)  # a lookup draft is there at round 1
    want = hf_greedy(model, ids, 28)
    kw = dict(max_new_tokens=28, eos_token_id=[], num_skip_layers=2, max_draft=5)
    for table in (FLAT, LINEAR, None):  # None: measured on this model
        out = generate(model, ids, policy="cost", cost_table=table, draft_exit_threshold=0.0, **kw)
        assert_lossless(model, out.sequences[0].tolist(), want, ids.shape[1])
        s = out.stats
        assert s.plain_rounds + s.lookup_rounds + s.layer_skip_rounds == s.rounds
        assert s.round_tokens == s.accepted + s.branch_hits + s.rounds
        assert sum(s.lookup_lengths.values()) == s.lookup_rounds
        assert sum(s.layer_skip_lengths.values()) == s.layer_skip_rounds
        if table is LINEAR:  # nothing can pay: plain steps only, and no DP was run
            assert s.plain_rounds == s.rounds and s.drafted == 0 and s.dp_runs == 0
        if table is FLAT:
            assert s.layer_skip_rounds > 0 and s.lookup_rounds > 0


def test_policy_is_validated():
    model = tiny_model("llama", layers=2)
    with pytest.raises(ValueError, match="policy must be one of"):
        generate(model, torch.tensor([[3, 4]]), policy="greedy")


def test_longer_matches_are_tried_where_shorter_ones_are_not():
    """Where verifying costs ~2 steps at once (fp32 on the AVX-512 EPYC: 1, 2.09, 2.08, 2.47 for
    1, 2, 4, 9 tokens), a 3-gram match's copy is tried, a 2-gram's or a 1-gram's is not; where
    verifying 2 tokens is cheaper than 1 (bf16 there), even a 1-gram guess pays."""
    fp32 = CostTable({1: 1.0, 2: 2.09, 4: 2.08, 9: 2.47}, draft_step_s=0.58, dp_s=1.9)
    p = policy(fp32)
    assert p.choose(MAX_DRAFT, 8, lookup_kind=LONG_LOOKUP).kind == LONG_LOOKUP
    assert p.choose(MAX_DRAFT, 8, lookup_kind=LOOKUP).kind == PLAIN
    assert p.choose(MAX_DRAFT, 8, lookup_kind=SHORT_LOOKUP).kind == PLAIN
    bf16 = CostTable({1: 1.0, 2: 0.79, 4: 0.87, 9: 1.03}, draft_step_s=0.24, dp_s=0.9)
    assert policy(bf16).choose(0, 8, lookup_kind=SHORT_LOOKUP).kind == SHORT_LOOKUP
    assert [lookup_source(n) for n in (1, 2, 3, 5)] == [SHORT_LOOKUP, LOOKUP, LONG_LOOKUP] + [
        LONG_LOOKUP
    ]


def test_round_times_scale_a_measured_table_only():
    """online_costs: the rounds' measured times scale a measured table per round kind
    (TimeScale); a synthetic table, or online_costs=False, is used as given. Layer-skip rounds
    that measure twice the table turn a draft into plain steps."""
    measured = CostTable(dict(FLAT.verify_s), FLAT.draft_step_s, FLAT.dp_s, repeats=3)
    assert measured.measured and not FLAT.measured
    for table, online, scaled in (
        (FLAT, True, False),
        (measured, False, False),
        (measured, True, True),
    ):
        pol = CostPolicy(table, exit_threshold=False, online_costs=online)
        before = pol.cost(LAYER_SKIP, 4)
        assert pol.choose(MAX_DRAFT).kind == LAYER_SKIP
        for _ in range(60):
            pol.observe_time(LAYER_SKIP, 4, 4, 2.0 * pol.table_s(LAYER_SKIP, 4, 4))
        assert pol.cost(LAYER_SKIP, 4) == pytest.approx(2 * before if scaled else before, rel=0.02)
        assert pol.cost(PLAIN, 0) == pytest.approx(table.verify(1))
        assert (pol.choose(MAX_DRAFT).kind == PLAIN) == scaled


def test_kinds_timed_before_the_plain_rounds_keep_their_ratio():
    """Layer-skip rounds timed 1.45x the table before any plain round ran, then plain rounds 1.4x
    (the AVX-512 EPYC, bench/results/README.md): layer-skip rounds stay priced at 1.45x, not
    1.45 x 1.4 (at 2x, plain steps were chosen where drafts ran as fast); a kind not yet timed
    follows the plain rounds, and once those have learned their level, a change of it carries
    over to the kinds relative to them."""
    assert prior_left(11) > RATE >= prior_left(12) and LEVEL_ROUNDS == 12
    table = CostTable(dict(FLAT.verify_s), FLAT.draft_step_s, FLAT.dp_s, repeats=3)
    pol = CostPolicy(table, exit_threshold=False)
    for _ in range(30):
        pol.observe_time(LAYER_SKIP, 4, 4, 1.45 * pol.table_s(LAYER_SKIP, 4, 4))
    assert pol.time_scale(LAYER_SKIP) == pytest.approx(1.45, rel=0.01)
    for _ in range(30):
        pol.observe_time(PLAIN, 0, 0, 1.4 * pol.table_s(PLAIN, 0, 0))
    assert pol.time_scale(PLAIN) == pytest.approx(1.4, rel=0.01)
    assert pol.time_scale(LAYER_SKIP) == pytest.approx(1.45, rel=0.03)  # not 1.6 nor 2.0
    assert pol.time_scale(LOOKUP) == pytest.approx(pol.time_scale(PLAIN))
    assert pol.choose(MAX_DRAFT).kind == LAYER_SKIP
    before = pol.time_scale(LAYER_SKIP) / pol.time_scale(PLAIN)
    for _ in range(40):  # the machine slows down: plain rounds 2x the table
        pol.observe_time(PLAIN, 0, 0, 2.0 * pol.table_s(PLAIN, 0, 0))
    assert pol.time_scale(LAYER_SKIP) == pytest.approx(2.0 * before, rel=0.05)


def test_tree_rounds_keep_their_own_time_ratio():
    """Rounds that verified siblings are timed against the table as their own kind (BRANCH,
    relative to the chain rounds): where the table read a long verify low (25 tokens 8% above 9)
    and the tree rounds take 1.5x what it says while chains take what it says, siblings stop
    being chosen and the chains' ratio is untouched."""
    table = CostTable({1: 1.0, 2: 1.0, 4: 1.0, 9: 1.0, 25: 1.08}, 0.1, 1.0, repeats=3)
    pol = CostPolicy(table, exit_threshold=False)
    assert pol.branch_width(8, 8, 8, 2) > 0  # nearly free by the table
    for _ in range(30):
        pol.observe_time(LAYER_SKIP, 8, 8, pol.table_s(LAYER_SKIP, 8, 8))
        pol.observe_time(BRANCH, 24, 8, 1.5 * pol.table_s(LAYER_SKIP, 24, 8))
    assert pol.time_scale(LAYER_SKIP) == pytest.approx(1.0, abs=0.02)
    assert pol.time_scale(BRANCH) == pytest.approx(1.5, rel=0.03)
    assert pol.branch_width(8, 8, 8, 2) == 0
    assert pol.choose(MAX_DRAFT).kind == LAYER_SKIP  # the chains still pay


def test_siblings_leave_a_chain_round_to_measure_their_base():
    """While siblings are on (a measured table), every CHAIN_PROBE-th layer-skip round verifies
    the chain alone, so the chains' time ratio stays measured: tree and chain rounds that both
    run 1.2x the table (host work) leave siblings on; with a synthetic table no probing."""
    table = CostTable({1: 1.0, 2: 1.0, 4: 1.0, 9: 1.0, 25: 1.08}, 0.1, 1.0, repeats=3)
    pol = CostPolicy(table, exit_threshold=False)
    widths = []
    for _ in range(6 * CHAIN_PROBE):
        w = pol.branch_width(8, 8, 8, 2)
        widths.append(w)
        kind, verified = (BRANCH, 8 + 8 * w) if w else (LAYER_SKIP, 8)
        pol.observe_time(kind, verified, 8, 1.2 * pol.table_s(LAYER_SKIP, verified, 8))
    # the second round probes the chain, then every CHAIN_PROBE-th
    assert widths[:3] == [widths[0], 0, widths[0]] and widths[0] > 0
    assert widths.count(0) == 6 and all(w > 0 for w in widths[2 : CHAIN_PROBE + 1])
    assert pol.time_scale(LAYER_SKIP) == pytest.approx(1.2, rel=0.05)
    assert pol.time_scale(BRANCH) == pytest.approx(1.2, rel=0.05)
    synthetic = CostPolicy(FLAT, exit_threshold=False)
    for _ in range(2 * CHAIN_PROBE):
        synthetic.observe_time(BRANCH, 24, 8, 1.0)
    assert synthetic.branch_width(8, 8, 8, 2) > 0


def test_online_costs_is_validated():
    model = tiny_model("llama", layers=2)
    with pytest.raises(ValueError, match="online_costs must be True or False"):
        generate(model, torch.tensor([[3, 4]]), online_costs="yes")


def test_interrupted_verify_samples_are_capped():
    """A verify of fewer tokens (past the first) never costs more than one of more: a spike (the
    3.89-step verify of 2 tokens one calibration read on a shared VM) is capped, a dip kept."""
    spiky = {1: 1.0, 2: 3.89, 4: 1.73, 8: 1.44, 25: 2.81}
    assert cm.without_spikes(spiky) == {1: 1.0, 2: 1.44, 4: 1.44, 8: 1.44, 25: 2.81}
    dip = {1: 1.0, 2: 0.8, 4: 0.9, 8: 1.2}
    assert cm.without_spikes(dip) == dip
    slow_one = {1: 3.0, 2: 1.0, 4: 1.1}  # a plain step above a 2-token verify: a real dip shape
    assert cm.without_spikes(slow_one) == slow_one


def test_calibration_interleaves_and_keeps_each_lengths_fastest_call(monkeypatch):
    """The verifies of every length and the draft step are timed in rounds that rotate their
    order (a drift of the machine's speed hits all alike), and each keeps its fastest call: two
    interrupted calls change nothing. A call over two plain steps is timed twice only."""
    model = tiny_model("llama", layers=3)
    dec = ClaspDecoder(model, policy="fixed", num_skip_layers=1)
    a, ran = dec.adapter, []
    forward = a.forward

    def recording(ids, *args, skip=None, **kw):
        ran.append("draft" if skip is not None else ids.shape[1])
        return forward(ids, *args, skip=skip, **kw)

    monkeypatch.setattr(a, "forward", recording)
    timed = []

    def fake_timed(fn, device):  # seconds by what the call ran, +5 on two calls
        n = len(ran)
        fn()
        name = ran[n] if len(ran) > n else "dp"
        timed.append(name)
        s = 0.3 if name == "draft" else 0.5 if name == "dp" else 1.0 + 0.1 * name
        return s + (5.0 if len(timed) in (2, 8) else 0.0)

    monkeypatch.setattr(timing, "_timed", fake_timed)
    t = cm.calibrate(a, dec.draft_head, 1, 9, context=8, repeats=3)
    assert t.verify_s == pytest.approx({1: 1.1, 2: 1.2, 4: 1.4, 9: 1.9})
    assert t.draft_step_s == pytest.approx(0.3) and t.dp_s == pytest.approx(0.5)
    # round 1; round 2 rotated by one (its T = 9 interrupted); round 3 by two, without T = 2,
    # whose first call (interrupted: 6.2 s) was over two plain steps
    rounds = [[1, 2, 4, 9, "draft"], [2, 4, 9, "draft", 1], [4, 9, "draft", 1]]
    assert timed[:14] == [x for r in rounds for x in r]


def _deferred(model, table, **kw):
    """A decoder whose first skip-set search waits until it pays (first_dp="auto"), layer-skip
    drafts only, at most 4 tokens, no exit threshold, 24 tokens without EOS."""
    kw = {
        "policy": "cost",
        "cost_table": table,
        "first_dp": "auto",
        "lookup_ngram": 0,
        "num_skip_layers": 2,
        "max_draft": 4,
        "draft_exit_threshold": 0.0,
        "max_new_tokens": 24,
        "eos_token_id": [],
        **kw,
    }
    return ClaspDecoder(model, **kw)


@pytest.mark.parametrize("dp_steps", [0.5, 2.0, 1000.0])
@torch.no_grad()
def test_deferred_search_runs_once_the_plain_rounds_lost_its_cost(dp_steps):
    """first_dp="auto" (the ski-rental rule): no search at prefill; each plain round adds what it
    loses against the layer-skip draft the estimates promise (FLAT: a 4-token draft at the prior
    acceptance emits ~3.4 tokens for ~1.8 steps), and the search runs after the round where the
    losses reach the table's DP cost; a DP that costs more than the whole answer could save never
    runs. Output equals model.generate either way."""
    model = tiny_model("qwen2", layers=6, seed=5)
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    table = CostTable(dict(FLAT.verify_s), FLAT.draft_step_s, dp_s=dp_steps)
    pol = policy(table)
    lost = pol.seconds_lost(pol.choose(0, layer_skip=False), pol.choose(4))
    assert 0.3 < lost < 0.6  # a plain round at FLAT costs 1 step where the draft needs ~0.55
    rounds = math.ceil(dp_steps / lost - 1e-9)  # plain rounds before the search
    dec = _deferred(model, table)
    out = dec.generate(ids)
    s = out.stats
    assert_lossless(model, out.sequences[0].tolist(), hf_greedy(model, ids, 24), ids.shape[1])
    if rounds < 23:
        assert s.dp_runs == 1 and s.first_dp_token == 1 + rounds
        assert s.plain_rounds >= rounds and s.layer_skip_rounds > 0
    else:  # 24 tokens never earn it back
        assert s.dp_runs == 0 and s.first_dp_token == -1 and s.plain_rounds == s.rounds


@torch.no_grad()
def test_rounds_that_lookup_carries_lose_nothing():
    """A lookup round that beats the layer-skip round the estimates promise loses nothing, so
    while lookup drafts carry the answer the search waits: on a prompt the model copies, the DP
    runs later than with lookup off (FLAT, DP = 2 steps), after lookup rounds. Where verifying
    costs like T steps (LINEAR) nothing can pay and no DP runs; with policy="fixed", "auto" is
    "prefill"."""
    model = tiny_model("qwen2", layers=6, seed=5)
    ids = prompt_that_repeats_its_continuation(model)
    table = CostTable(dict(FLAT.verify_s), FLAT.draft_step_s, dp_s=2.0)
    pol = policy(table)
    looked = pol.choose(0, 8, layer_skip=False, lookup_kind=LONG_LOOKUP)
    assert looked.kind == LONG_LOOKUP
    assert pol.seconds_lost(looked, pol.choose(4, 8, lookup_kind=LONG_LOOKUP)) == 0.0
    alone = _deferred(model, table).generate(ids).stats
    copied = _deferred(model, table, lookup_ngram=3).generate(ids).stats
    assert alone.dp_runs == copied.dp_runs == 1 and alone.lookup_rounds == 0
    assert copied.first_dp_token > alone.first_dp_token and copied.lookup_rounds > 0
    s = _deferred(model, LINEAR).generate(ids).stats
    assert s.dp_runs == 0 and s.plain_rounds == s.rounds
    fixed = _deferred(model, None, policy="fixed").generate(ids).stats
    assert fixed.dp_runs == 1 and fixed.first_dp_token == 0 and fixed.layer_skip_rounds > 0


@torch.no_grad()
def test_deferred_search_in_a_batch_runs_once_for_the_batch():
    """Two rows, no skip set: their rounds' losses add up, one row searches, and both then draft
    with the batch's set (the other row rides it without a DP of its own); rows lossless."""
    from clasp_ext.decoding import BatchDecoder

    model = tiny_model("qwen2", layers=6, seed=3)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (6, 11)]
    table = CostTable(dict(FLAT.verify_s), FLAT.draft_step_s, dp_s=1.0)
    dec = BatchDecoder(
        model,
        max_batch=2,
        max_new_tokens=20,
        eos_token_id=[],
        max_cache_len=96,
        policy="cost",
        cost_tables={1: table, 2: table},
        first_dp="auto",
        lookup_ngram=0,
        num_skip_layers=2,
        max_draft=3,
        draft_exit_threshold=0.0,
    )
    for p in prompts:
        dec.add(torch.tensor(p))
    done = sorted(dec.run(), key=lambda f: f.request_id)
    assert dec.stats.dp_runs == 1 and dec.stats.layer_skip_rounds > 0
    assert sorted(f.stats.dp_runs for f in done) == [0, 1]
    for f, p in zip(done, prompts, strict=True):
        assert f.stats.layer_skip_rounds > 0
        assert_lossless(model, f.tokens, hf_greedy(model, torch.tensor([p]), 20), len(p))
