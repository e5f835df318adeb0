"""Batched CLaSp (batch.py): every row is lossless on its own, whatever the batch around it."""

from __future__ import annotations

import pytest
import torch
from decoding_models import FAMILIES, tiny_model
from test_decoding_greedy import assert_lossless
from test_decoding_sampling import assert_matches, exact_marginals

from clasp_ext.decoding import BatchDecoder, ClaspConfig, generate, generate_batch, process_logits
from clasp_ext.decoding.cost_model import CostTable

torch.set_num_threads(1)

# verify flat and draft steps nearly free at every batch size: rounds draft, so the batched draft
# and verify paths run (the measured tables decide only the lengths)
FLAT = {b: CostTable({1: 1.0, 16: 1.0}, 0.05, 0.0) for b in range(1, 9)}
POLICIES = ("fixed", "cost")


def prompts_for(seed: int, n: int, vocab: int = 256) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        T = int(torch.randint(1, 24, (1,), generator=g))
        out.append(torch.randint(3, vocab, (T,), generator=g).tolist())
    # a prompt that repeats itself, so context lookup drafts (and the cascade) run too
    out[0] = (out[0] * 3)[:30]
    return out


def assert_prefix_lossless(model, got: list[int], want: list[int], prompt_len: int):
    """Lossless over the common length (one side ran without EOS or to another limit)."""
    m = min(len(got), len(want))
    assert_lossless(model, got[:m], want[:m], prompt_len)


@torch.no_grad()
def hf_alone(model, prompt: list[int], max_new: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new
    )
    return out[0].tolist()


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_rows_equal_their_own_generate(family, policy):
    """6 requests through 3 rows (so rows join and leave mid-run), EOS on: every row equals
    model.generate on its prompt alone, and stops at its own EOS / length."""
    model = tiny_model(family, layers=6, window=8, seed=3)
    prompts = prompts_for(7, 6)
    lengths = [20, 5, 28, 1, 16, 24]
    want = [hf_alone(model, p, n) for p, n in zip(prompts, lengths, strict=True)]
    streamed: dict[int, list[int]] = {}
    dec = BatchDecoder(
        model,
        max_batch=3,
        policy=policy,
        num_skip_layers=2,
        max_cache_len=96,
        cost_tables=FLAT,
        callback=lambda rid, toks: streamed.setdefault(rid, []).extend(toks),
    )
    for p, n in zip(prompts, lengths, strict=True):
        dec.add(torch.tensor(p), max_new_tokens=n)
    done = dec.run()
    assert [f.request_id for f in done] == list(range(6))
    for f, w, p in zip(done, want, prompts, strict=True):
        assert_lossless(model, f.tokens, w, len(p))
        assert streamed.get(f.request_id, []) == f.new_tokens
    assert dec.idle and dec.active == 0
    s = dec.stats
    assert s.rounds > 0 and max(s.batch_sizes) == 3
    assert sum(f.stats.accepted for f in done) > 0  # drafts were accepted in batches
    assert sum(f.stats.drafted for f in done) > sum(f.stats.accepted for f in done)  # and rejected


@pytest.mark.parametrize("policy", POLICIES)
@torch.no_grad()
def test_logits_processor_per_row(policy):
    """A logits processor applies to each row's own tokens (drafts, verify rows, the first
    token): every row equals model.generate with the same processors on its prompt alone."""
    from transformers.generation import (
        LogitsProcessorList,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )

    model = tiny_model("qwen2", layers=6, seed=6)
    prompts = prompts_for(13, 5)
    kw = dict(do_sample=False, max_new_tokens=18, repetition_penalty=1.4, no_repeat_ngram_size=2)
    want = [
        model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p)).long(), **kw)
        for p in prompts
    ]
    proc = LogitsProcessorList(
        [RepetitionPenaltyLogitsProcessor(1.4), NoRepeatNGramLogitsProcessor(2)]
    )
    dec = BatchDecoder(
        model,
        max_batch=3,
        policy=policy,
        num_skip_layers=2,
        max_new_tokens=18,
        max_cache_len=96,
        cost_tables=FLAT,
        logits_processor=proc,
    )
    for p in prompts:
        dec.add(torch.tensor(p))
    done = dec.run()
    for f, w, p in zip(done, want, prompts, strict=True):
        assert_lossless(model, f.tokens, w[0].tolist(), len(p))
    assert sum(f.stats.drafted for f in done) > 0  # processed drafts were verified


class ForceByLength:
    """Forces a token that depends on the sequence length only: a draft scored with the right
    context proposes exactly what the verify pass (scored alike) emits."""

    def __call__(self, input_ids, scores):
        out = torch.full_like(scores, float("-inf"))
        out[:, 3 + (7 * input_ids.shape[1]) % 200] = 0.0
        return out


@torch.no_grad()
def test_logits_processor_contexts_per_row():
    """Each row's draft and verify positions are scored with that row's own context, at its own
    length: with a processor that forces a length-dependent token, every layer-skip draft token
    is accepted (one position off anywhere and they would be rejected), per-request processors
    (``add(logits_processor=)``) included."""
    model = tiny_model("llama", layers=6, seed=6)
    prompts = prompts_for(17, 4)
    dec = BatchDecoder(
        model,
        max_batch=3,
        policy="fixed",
        lookup_ngram=0,
        num_skip_layers=2,
        max_draft=4,
        max_new_tokens=14,
        eos_token_id=[],
        logits_processor=ForceByLength(),
    )
    for i, p in enumerate(prompts):
        dec.add(torch.tensor(p), logits_processor=ForceByLength() if i % 2 else None)
    done = dec.run()
    for f, p in zip(done, prompts, strict=True):
        want = [3 + (7 * n) % 200 for n in range(len(p), len(p) + 14)]
        assert f.new_tokens == want
        assert f.stats.drafted > 0 and f.stats.accepted == f.stats.drafted
    with pytest.raises(TypeError, match="logits_processor must be callable"):
        dec.add(torch.tensor(prompts[0]), logits_processor=[ForceByLength()])


@torch.no_grad()
def test_requests_join_while_others_decode():
    """Requests added between rounds join without disturbing the rows already decoding."""
    model = tiny_model("llama", layers=6, seed=4)
    prompts = prompts_for(11, 5)
    want = [hf_alone(model, p, 18) for p in prompts]
    dec = BatchDecoder(
        model,
        max_batch=4,
        max_new_tokens=18,
        num_skip_layers=2,
        max_cache_len=96,
        cost_tables=FLAT,
        eos_token_id=[],
    )
    done, added = [], 0
    for r in range(200):
        if added < len(prompts) and r % 3 == 0:  # one joins every third round
            dec.add(torch.tensor(prompts[added]))
            added += 1
        done += dec.step()
        if dec.idle and added == len(prompts):
            break
    assert sorted(f.request_id for f in done) == list(range(5))
    for f in done:
        # eos_token_id=[]: no EOS, so model.generate's output is compared up to 18 tokens
        w = want[f.request_id]
        n = len(prompts[f.request_id])
        assert_prefix_lossless(model, f.tokens, w, n)
        assert len(f.new_tokens) == 18


@pytest.mark.parametrize("family", ("qwen2", "gemma3"))
@torch.no_grad()
def test_generate_batch_left_padded(family):
    """generate(model, ids [B, T], attention_mask=...) with left padding: like model.generate on
    the padded batch, row by row (each equal to that prompt alone, pads after EOS)."""
    model = tiny_model(family, layers=6, window=8, seed=5)
    prompts = prompts_for(13, 4)
    T = max(map(len, prompts))
    ids = torch.zeros(4, T, dtype=torch.long)
    mask = torch.zeros(4, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p) :] = torch.tensor(p)
        mask[b, T - len(p) :] = 1
    out = generate(model, ids, attention_mask=mask, max_new_tokens=20, num_skip_layers=2)
    seqs = out.sequences
    assert seqs.shape[0] == 4 and torch.equal(seqs[:, :T], ids)
    for b, p in enumerate(prompts):
        want = hf_alone(model, p, 20)
        new = seqs[b, T:].tolist()
        got = p + new[: len(want) - len(p)]
        assert_lossless(model, got, want, len(p))
        assert all(x == model.generation_config.pad_token_id for x in new[len(want) - len(p) :])


@torch.no_grad()
def test_sampled_rows_have_the_model_distribution():
    """Sampling in batches: the first three tokens of a prompt's rows follow the full model's
    distribution exactly (chi-square), while other prompts share the batch and rows join and
    leave at different times."""
    V = 8
    model = tiny_model("llama", layers=4, vocab=V, seed=5)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    prompt, other = [3, 1, 4], [1, 0, 1, 2, 1, 3, 1, 4, 1, 5, 1]
    dec = BatchDecoder(
        model,
        max_batch=4,
        skip_strategy=[1, 2],
        max_draft=2,
        draft_exit_threshold=0.0,
        policy="fixed",
        temperature=1.0,
        eos_token_id=[],
        lookup_ngram=2,
        seed=99,
    )
    N = 1200
    mine = set()
    for i in range(N):
        mine.add(dec.add(torch.tensor(prompt), max_new_tokens=3))
        if i % 3 == 0:
            dec.add(torch.tensor(other), max_new_tokens=1 + i % 5)
    done = dec.run()
    counts = torch.zeros(3, V, dtype=torch.long)
    drafted = accepted = 0
    for f in done:
        if f.request_id in mine:
            for i, t in enumerate(f.new_tokens):
                counts[i, t] += 1
            drafted += f.stats.drafted
            accepted += f.stats.accepted
    assert counts.sum() == 3 * N
    assert min(accepted, drafted - accepted) > 0.1 * drafted, (accepted, drafted)
    exact = exact_marginals(
        model, torch.tensor([prompt]), V, lambda x: process_logits(x, 1.0, 0, 1.0)
    )
    for i in range(3):
        assert_matches(counts[i], exact[i], f"token {i + 1}")


@torch.no_grad()
def test_cache_rows_stay_put():
    """The round's KV buffers and per-row lengths / last tokens keep their shapes and addresses
    from round to round, through joins and leaves (a row that leaves hands its slot to the last
    live row)."""
    model = tiny_model("mistral", layers=4, seed=6)
    dec = BatchDecoder(model, max_batch=3, max_new_tokens=6, max_cache_len=64, cost_tables=FLAT)
    for p in prompts_for(17, 7):
        dec.add(torch.tensor(p), max_new_tokens=int(3 + len(p) % 5))

    def layout():  # the K/V buffers and the per-row device state a round reads and writes
        bufs = [*dec.cache.keys, *dec.cache.values, dec._lens, dec._last]
        return [(t.data_ptr(), tuple(t.shape)) for t in bufs]

    def state_matches_host():  # compaction moved each row's device state with its sequence
        B = dec.active
        assert dec._lens[:B].tolist() == [s.committed for s in dec.rows]
        assert dec._last[:B, 0].tolist() == [s.tokens[-1] for s in dec.rows]

    dec.step()
    before = layout()
    state_matches_host()
    while not dec.idle:
        dec.step()
        assert layout() == before
        state_matches_host()


def test_add_takes_a_list_of_ids_as_a_tokenizer_gives_them():
    """Serving code passes a tokenizer's list of ints (or a tensor on any device: add only reads
    the values); the request decodes as the same prompt given as a tensor."""
    model = tiny_model("llama", layers=4, seed=1)
    prompt = prompts_for(3, 1)[0]
    outs = []
    for given in (prompt, torch.tensor(prompt, dtype=torch.int32)):
        dec = BatchDecoder(model, max_batch=1, max_cache_len=64, cost_tables=FLAT)
        dec.add(given, max_new_tokens=8)
        outs.append(dec.run()[0].tokens)
    assert outs[0] == outs[1] == hf_alone(model, prompt, 8)
    dec = BatchDecoder(model, max_batch=1, max_cache_len=64, cost_tables=FLAT)
    with pytest.raises(TypeError, match="int64"):
        dec.add([1.5, 2.0], max_new_tokens=4)
    with pytest.raises(ValueError, match="empty prompt"):
        dec.add([], max_new_tokens=4)


def test_batch_errors():
    model = tiny_model("llama", layers=4, seed=1)
    with pytest.raises(ValueError, match="max_batch"):
        BatchDecoder(model, max_batch=0)
    dec = BatchDecoder(model, max_batch=2, max_cache_len=32, cost_tables=FLAT)
    with pytest.raises(ValueError, match="needs .* cache slots"):
        dec.add(torch.arange(3, 30), max_new_tokens=16)
    with pytest.raises(ValueError, match="batch size 2"):
        dec.add(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        dec.add(torch.tensor([5, 1000]))
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="padding inside"):
        generate(model, ids, attention_mask=torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="all padding"):
        generate(model, ids, attention_mask=torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="shape of input_ids"):
        generate(model, ids, attention_mask=torch.ones(2, 3))
    with pytest.raises(TypeError, match="ClaspConfig"):
        generate_batch(model, ids, config={"max_draft": 2})
    with pytest.raises(ValueError, match="batch_skip_rule must be one of"):
        BatchDecoder(model, max_batch=2, batch_skip_rule="union")
    assert isinstance(ClaspConfig(), ClaspConfig)


@pytest.mark.parametrize("rule", ["vote", "agreed"])
@torch.no_grad()
def test_batch_skip_rules(rule):
    """The shared skip set from the rows' DP masks: "vote" skips the M layers most rows skip,
    "agreed" only those every row skips; rows stay lossless either way."""
    model = tiny_model("llama", layers=8, seed=12)
    prompts = prompts_for(21, 3)
    dec = BatchDecoder(
        model,
        max_batch=3,
        max_new_tokens=12,
        num_skip_layers=3,
        policy="fixed",
        eos_token_id=[],
        batch_skip_rule=rule,
    )
    for p in prompts:
        dec.add(torch.tensor(p))
    dec.step()  # all three join
    masks = [s.skip for s in dec.rows]
    votes = [sum(m[i] for m in masks) for i in range(8)]
    if rule == "agreed":
        want = [v == 3 for v in votes]
    else:
        top = sorted(range(8), key=lambda i: (-votes[i], i))[:3]
        want = [i in top for i in range(8)]
    assert dec.skip == want
    assert sum(dec.skip) <= 3
    done = dec.run()
    for f, p in zip(done, prompts, strict=True):
        assert_prefix_lossless(model, f.tokens, hf_alone(model, p, 12), len(p))


def decode_lossless(model, prompts, **kw) -> BatchDecoder:
    """The prompts through a 3-row BatchDecoder (24 tokens each, 2 layers skipped, no EOS; ``kw``
    on top), every row checked against model.generate on its prompt alone. Returns the decoder."""
    dec = BatchDecoder(
        model,
        max_batch=3,
        max_new_tokens=24,
        num_skip_layers=2,
        max_cache_len=96,
        eos_token_id=[],
        **kw,
    )
    for p in prompts:
        dec.add(torch.tensor(p))
    for f, p in zip(dec.run(), prompts, strict=True):
        assert_prefix_lossless(model, f.tokens, hf_alone(model, p, 24), len(p))
    return dec


@torch.no_grad()
def test_batch_policy_follows_the_cost_table():
    """policy="cost" in batches: where verify cost grows like the tokens verified (a CPU without
    bf16 matrix units, or a large batch) every round is a plain batched step; where it is flat,
    rounds draft, by layer skip and by context lookup (the repeating prompt)."""
    model = tiny_model("llama", layers=6, seed=9)
    prompts = prompts_for(21, 3)
    linear = {b: CostTable({1: 1.0, 32: 32.0}, 0.5, 0.0) for b in range(1, 4)}
    runs = {}
    for name, tables in (("linear", linear), ("flat", FLAT)):
        runs[name] = decode_lossless(model, prompts, cost_tables=tables).stats
    assert runs["linear"].plain_rounds == runs["linear"].rounds
    assert runs["linear"].draft_steps == 0
    flat = runs["flat"]
    assert flat.draft_steps > 0  # layer-skip draft forwards ran
    assert (
        flat.layer_skip_rounds > 0
        and flat.lookup_rounds + flat.layer_skip_rounds > flat.rounds // 2
    )


@torch.no_grad()
def test_batch_drafts_stop_at_the_exit_threshold():
    """policy="cost" in batches: a layer-skip draft stops once no row's draft token is sure
    (draft_exit_threshold), and the policy learns how far drafts go.
    A threshold no draft reaches: one draft step per layer-skip round; none: longer drafts."""
    from clasp_ext.decoding.policy import CONTINUE_PRIOR, LAYER_SKIP

    model = tiny_model("llama", layers=6, seed=9)
    prompts = prompts_for(21, 3)
    stats = {}
    for thr in (1.0, 0.0):
        dec = decode_lossless(
            model, prompts, cost_tables=FLAT, lookup_ngram=0, draft_exit_threshold=thr
        )
        stats[thr] = dec.stats
        cont = dec.policy.sources[LAYER_SKIP].cont
        if thr > 0:
            assert cont.at(0) < CONTINUE_PRIOR[0]  # it learnt that drafts stop
        else:
            assert cont is None  # no threshold: drafts run to their length
    never = stats[1.0]
    assert never.layer_skip_rounds > 0 and never.draft_steps == never.layer_skip_rounds
    assert stats[0.0].draft_steps > stats[0.0].layer_skip_rounds


@torch.no_grad()
def test_batch_draft_stops_when_no_row_goes_on(monkeypatch):
    """The stop rule of a batched layer-skip draft: a row stops at its first unsure draft token
    (or EOS) or at its allowed length and stays stopped; the draft stops when no row goes on (a
    row that fell below the threshold does not keep it going when its next token is sure)."""
    import clasp_ext.decoding.batch as batch

    model = tiny_model("llama", layers=4, seed=9)
    dec = BatchDecoder(
        model, max_batch=2, policy="fixed", num_skip_layers=1, draft_exit_threshold=0.5
    )
    for p in ([5, 6, 7], [8, 9, 10, 11]):
        dec.add(torch.tensor(p), max_new_tokens=20)
    dec._admit()
    top1 = {}
    calls = []

    def fake_step(config, forward, head, tokens, start, cache, skip, gens, **kw):
        j = len(calls)
        calls.append(j)
        return torch.full((2, 1), 3 + j), None, torch.tensor([top1[0][j], top1[1][j]]), None

    monkeypatch.setattr(batch, "draft_step", fake_step)
    t0, starts = dec._last[:2], dec._lens[:2].clone()

    def steps(rows, allowed):
        top1[0], top1[1] = rows
        calls.clear()
        drafts, _, _ = dec._draft(t0, starts, 20, 4, [[], []], None, allowed=allowed)
        assert drafts.shape == (2, len(calls))
        return len(calls)

    # row 0 sure, then unsure, then sure again; row 1 unsure at once: stops after 2 steps
    assert steps(([0.9, 0.1, 0.9, 0.9], [0.1, 0.9, 0.9, 0.9]), [4, 4]) == 2
    assert steps(([0.9, 0.9, 0.9, 0.9], [0.1, 0.1, 0.1, 0.1]), [4, 4]) == 4  # one row goes on
    assert steps(([0.9, 0.9, 0.9, 0.9], [0.1, 0.1, 0.1, 0.1]), [2, 4]) == 2  # ... to its length
    dec._eos_ids = torch.tensor([4])  # the second draft token (id 4) is an EOS: both stop
    assert steps(([0.9, 0.9, 0.9, 0.9], [0.9, 0.9, 0.9, 0.9]), [4, 4]) == 2


@torch.no_grad()
def test_batch_policy_scales_the_table_by_measured_round_times():
    """The batched policy times its rounds against a measured table (policy.TimeScale, per round
    kind; synthetic tables are used as given): drafted rounds that measure far slower than the
    table says turn the rounds plain, an unobserved kind follows the plain rounds' ratio, and a
    kind's own excess drifts back while it is not observed."""
    from clasp_ext.decoding.policy import LAYER_SKIP, LOOKUP, PLAIN, TimeScale

    ts = TimeScale()
    for _ in range(40):
        ts.observe(LAYER_SKIP, 0.1, 0.15)
    assert ts(LAYER_SKIP) == pytest.approx(1.5, rel=0.02) and ts(PLAIN) == 1.0
    ts.observe(PLAIN, 0.1, 1e3)  # a stray pause: clipped, not a write-off
    assert 1.0 < ts(PLAIN) <= 2.0 and ts(LOOKUP) == pytest.approx(ts(PLAIN))
    for _ in range(300):
        ts.observe(PLAIN, 0.1, 0.1)
    assert ts(LAYER_SKIP) == pytest.approx(1.0, abs=0.05)  # drifted back while unobserved
    # plain rounds 1.7x the table (a long context, a busy machine): a draft kind not yet seen
    # is expected at that ratio too, and its own rounds (1.4x) then set it
    ts = TimeScale()
    for _ in range(40):
        ts.observe(PLAIN, 0.1, 0.17)
    assert ts(LAYER_SKIP) == pytest.approx(1.7, rel=0.02) == ts(LOOKUP)
    for _ in range(40):
        ts.observe(LAYER_SKIP, 0.1, 0.14)
        ts.observe(PLAIN, 0.1, 0.17)
    assert ts(LAYER_SKIP) == pytest.approx(1.4, rel=0.03)
    model = tiny_model("llama", layers=6, seed=9)
    flat = {b: CostTable({1: 1.0, 16: 1.0}, 0.05, 0.0, repeats=1) for b in (1, 2)}
    assert flat[1].measured and not FLAT[1].measured
    dec = BatchDecoder(
        model, max_batch=2, max_new_tokens=8, num_skip_layers=2, cost_tables=flat, eos_token_id=[]
    )
    for p in prompts_for(5, 2):
        dec.add(torch.tensor(p))
    dec.step()
    caps, looked = [6, 6], [([], 0), ([], 0)]
    assert dec._choose(2, caps, looked)[0] == LAYER_SKIP  # verify flat: a draft pays
    dec.policy.time_scale.r[LAYER_SKIP] = 10.0  # layer-skip rounds measured 10x the table
    assert dec._choose(2, caps, looked) == (PLAIN, 0)


def test_batch_draft_steps_run_while_any_row_goes_on():
    """The batched draft's expected steps: position i runs while some row goes on (a row stops at
    its first unsure token, and never drafts past its cap)."""
    from clasp_ext.decoding.policy import (
        CONTINUE_PRIOR,
        LAYER_SKIP,
        PRIORS,
        Source,
        batch_draft_steps,
    )

    goes_on, stops = Source(PRIORS[LAYER_SKIP], stops=True), Source(PRIORS[LAYER_SKIP], stops=True)
    goes_on.cont.p, stops.cont.p = [1.0], [0.0]
    k = 5
    e_on, e_stop = goes_on.expected(k), stops.expected(k)
    assert batch_draft_steps([e_on, e_stop], [k, k], k) == pytest.approx(k)
    assert batch_draft_steps([e_stop, e_stop], [k, k], k) == pytest.approx(1.0)
    assert batch_draft_steps([e_on, e_stop], [2, k], k) == pytest.approx(2.0)  # the cap
    half = Source(PRIORS[LAYER_SKIP], stops=True)
    half.cont.p = [0.5]
    e = half.expected(3)  # two rows, each on with 1, 0.5, 0.25: 1 + 0.75 + 0.4375
    assert batch_draft_steps([e, e], [3, 3], 3) == pytest.approx(2.1875)
    assert CONTINUE_PRIOR[0] < 1.0
    no_stop = Source(PRIORS[LAYER_SKIP], stops=False).expected(4)  # no exit threshold: all k
    assert batch_draft_steps([no_stop] * 3, [4] * 3, 4) == pytest.approx(4.0)


@torch.no_grad()
def test_batch_rows_keep_their_own_acceptance_estimates():
    """Each row starts from the batch's pooled estimates when it joins and then learns from its
    own rounds only; the round's choice sums the rows' own expectations, so a row whose drafts
    fail no longer counts as if it accepted what the others do."""
    from clasp_ext.decoding.policy import LAYER_SKIP, PLAIN

    model = tiny_model("llama", layers=6, seed=9)
    # one draft token: pays if both rows accept it (2 x 1.8 tokens for 1.5 steps), not if one
    # row never does (1.8 + 1.0 = 2.8 tokens < 1.5 x 2 x BATCH_MIN_GAIN)
    table = CostTable({1: 1.0, 2: 1.5, 32: 60.0}, 1e-6, 0.0)
    dec = BatchDecoder(
        model, max_batch=2, num_skip_layers=2, max_draft=1, cost_tables={1: table, 2: table}
    )
    for p in prompts_for(7, 2):
        dec.add(torch.tensor(p))
    dec._admit()
    a, b = dec.rows
    assert a.sources is not b.sources and a.sources is not dec.policy.sources
    assert a.sources[LAYER_SKIP].accept.p == dec.policy.sources[LAYER_SKIP].accept.p
    dec.skip = [True, True] + [False] * 4
    caps, looked = [6, 6], [([], 0), ([], 0)]
    assert dec._choose(2, caps, looked, [a.sources, b.sources]) == (LAYER_SKIP, 1)
    b.sources[LAYER_SKIP].accept.p = [0.0]  # row b's drafts fail
    assert dec._choose(2, caps, looked, [a.sources, b.sources]) == (PLAIN, 0)
    assert dec._choose(2, caps, looked) == (LAYER_SKIP, 1)  # pooled: still the prior for both


def test_batch_margin_is_wider_than_batch_one():
    """A draft that promises 6% more than a plain step runs at batch 1 (MIN_GAIN) but not at
    batch 2 (BATCH_MIN_GAIN): drafting at break-even lost 5-13% to model.generate in batches."""
    from clasp_ext.decoding.policy import BATCH_MIN_GAIN, LAYER_SKIP, MIN_GAIN, PLAIN

    # one draft token at the layer-skip prior (0.8): 1.8 tokens for 1.7 steps = 1.059x
    table = CostTable({1: 1.0, 2: 1.7, 32: 60.0}, 1e-6, 0.0)
    assert MIN_GAIN < 1.8 / 1.7 < BATCH_MIN_GAIN
    model = tiny_model("llama", layers=6, seed=9)
    dec = BatchDecoder(model, max_batch=2, num_skip_layers=2, cost_tables={1: table, 2: table})
    dec.skip = [True, True] + [False] * 4
    assert dec._choose(1, [6], [([], 0)]) == (LAYER_SKIP, 1)
    assert dec._choose(2, [6, 6], [([], 0), ([], 0)]) == (PLAIN, 0)


@pytest.mark.parametrize("rule", ["vote", "agreed"])
def test_shared_skip_rules_from_given_masks(rule):
    """batch_skip_rule on hand-made row masks: "vote" the M layers most rows skip (ties to the
    lower layer), "agreed" only the layers every row skips."""
    model = tiny_model("llama", layers=6, seed=1)
    dec = BatchDecoder(
        model, max_batch=3, num_skip_layers=2, batch_skip_rule=rule, cost_tables=FLAT
    )

    class Row:
        def __init__(self, layers):
            self.skip = [i in layers for i in range(6)]

    dec.rows = [Row({1, 4}), Row({1, 3}), Row({1, 4})]
    want = {1, 4} if rule == "vote" else {1}
    assert dec._shared_skip() == [i in want for i in range(6)]
    dec.rows = [Row({2, 5}), Row({3, 4})]  # no layer has a majority: ties to the lower layers
    want = {2, 3} if rule == "vote" else set()
    assert dec._shared_skip() == [i in want for i in range(6)]


def test_cost_tables_between_powers_of_two_are_interpolated():
    """Tables are measured at batch 1, 2, 4, ... (on construction, so no round pays for one) and
    interpolated between: a batch whose rows finish one by one never triggers a measurement."""
    model = tiny_model("llama", layers=4, seed=1)
    tables = {
        1: CostTable({1: 1.0, 17: 2.0}, 0.2, 0.0),
        2: CostTable({1: 1.0, 17: 3.0}, 0.2, 0.0),
        4: CostTable({1: 2.0, 17: 9.0}, 0.4, 0.0),
    }
    dec = BatchDecoder(model, max_batch=3, cost_tables=tables)
    t3 = dec._table(3)
    assert t3.verify_s == {1: 1.5, 17: 6.0} and t3.draft_step_s == pytest.approx(0.3)
    assert sorted(dec.cost_tables) == [1, 2, 3, 4]


@torch.no_grad()
def test_max_lookup_and_unsupported_batching(monkeypatch):
    """max_lookup=0 turns context lookup off in batches as at batch 1; a model whose ragged
    self-check failed is refused for batches with the reason (batch-1 decoding still works)."""
    from clasp_ext.decoding import ClaspDecoder, UnsupportedModelError
    from clasp_ext.decoding.adapter import ModelAdapter

    model = tiny_model("qwen2", layers=4, seed=2)
    dec = BatchDecoder(
        model,
        max_batch=2,
        max_new_tokens=12,
        num_skip_layers=0,
        max_lookup=0,
        lookup_ngram=3,
        max_cache_len=64,
        cost_tables=FLAT,
        eos_token_id=[],
    )
    for p in prompts_for(5, 3):
        dec.add(torch.tensor(p))
    dec.run()
    assert dec.stats.lookup_rounds == 0 and dec.stats.plain_rounds == dec.stats.rounds

    other = tiny_model("llama", layers=4, seed=12)
    monkeypatch.setattr(ModelAdapter, "_ragged_error", lambda self: "rows differ (test)")
    with pytest.raises(UnsupportedModelError, match="batched decoding .* rows differ"):
        BatchDecoder(other, cost_tables=FLAT)
    assert ClaspDecoder(other, max_new_tokens=2).generate(
        torch.tensor([[5, 6]])
    ).sequences.shape == (1, 4)


def rows_decoder(model, prompts, max_new: int, **kw) -> BatchDecoder:
    """A BatchDecoder with a row per prompt, each queued: policy "fixed" unless ``kw`` says
    otherwise (with "cost", the FLAT tables), drafts of up to 3 tokens, no EOS."""
    kw = {"policy": "fixed", "max_draft": 3, **kw}
    if kw["policy"] == "cost":
        kw.setdefault("cost_tables", FLAT)
    dec = BatchDecoder(
        model,
        max_batch=len(prompts),
        max_new_tokens=max_new,
        eos_token_id=[],
        max_cache_len=96,
        **kw,
    )
    for p in prompts:
        dec.add(torch.tensor(p))
    return dec


@pytest.mark.parametrize("strategy", ["dp", "importance"])
@torch.no_grad()
def test_batch_rows_search_again_every_update_interval(strategy):
    """skip_strategy "dp" / "importance" in batches: each row searches at join and again after
    every update_interval rounds (policy="fixed": every round ages its mask), on its own row;
    rows stay lossless and the batch's set follows the rows' new masks."""
    model = tiny_model("llama", layers=6, seed=4)
    prompts = prompts_for(11, 3)
    dec = rows_decoder(
        model, prompts, 20, num_skip_layers=2, skip_strategy=strategy, update_interval=2
    )
    done = dec.run()
    for f, p in zip(done, prompts, strict=True):
        assert_lossless(model, f.tokens, hf_alone(model, p, 20), len(p))
        s = f.stats
        # at join, then after every second round but the one that finished it
        assert s.dp_runs == 1 + (s.rounds - 1) // 2
        assert len(s.importance) == 6 and len(s.skip_layers) == 2
    assert dec.stats.dp_runs == sum(f.stats.dp_runs for f in done)
    assert dec.stats.time_dp > 0


@torch.no_grad()
def test_batch_first_search_on_the_first_output_token():
    """first_dp="first_round" in batches: a row searches after its first round (no skip set
    before: a lone row's first round is a plain step), then drafts with its set."""
    model = tiny_model("qwen2", layers=6, seed=2)
    prompts = prompts_for(3, 2)
    dec = rows_decoder(
        model, prompts, 16, num_skip_layers=2, lookup_ngram=0, first_dp="first_round"
    )
    dec.step()  # both join without a set, and round 1 is plain
    assert dec.stats.plain_rounds == 1 and dec.stats.dp_runs == 2 and sum(dec.skip) == 2
    done = dec.run()
    for f, p in zip(done, prompts, strict=True):
        assert_lossless(model, f.tokens, hf_alone(model, p, 16), len(p))
        assert f.stats.dp_runs == 1 and f.stats.layer_skip_rounds > 0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@torch.no_grad()
def test_batch_keeps_the_full_models_logits_per_token(temperature):
    """keep_logits: row b's token_logits[i] is the full model's raw logits for the position
    before its i-th new token (what output_scores reports), whatever the rows around it."""
    model = tiny_model("mistral", layers=4, seed=5)
    prompts = prompts_for(13, 3)
    dec = rows_decoder(
        model, prompts, 10, policy="cost", temperature=temperature, seed=1, keep_logits=True
    )
    for f in dec.run():
        assert len(f.token_logits) == len(f.new_tokens) == 10
        want = model(torch.tensor([f.tokens])).logits[0, f.prompt_len - 1 : -1].float()
        torch.testing.assert_close(torch.stack(f.token_logits), want, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_claspdecoder_is_the_batched_loop_with_one_row():
    """ClaspDecoder runs BatchDecoder with one row: same tokens, rounds, drafts and acceptance
    as a one-row BatchDecoder on the same prompt and settings."""
    from clasp_ext.decoding import ClaspDecoder

    model = tiny_model("gemma3", layers=6, window=8, seed=6)
    prompt = prompts_for(17, 1)[0]
    kw = dict(max_new_tokens=24, eos_token_id=[], num_skip_layers=2, max_draft=4)
    out = ClaspDecoder(model, cost_table=FLAT[1], **kw).generate(torch.tensor([prompt]))
    dec = BatchDecoder(model, max_batch=1, cost_tables=FLAT, max_cache_len=96, **kw)
    dec.add(torch.tensor(prompt))
    (f,) = dec.run()
    assert out.sequences[0].tolist() == f.tokens
    a, b = out.stats, f.stats
    names = ("rounds", "drafted", "draft_steps", "accepted", "lookup_rounds", "layer_skip_rounds")
    for name in names:
        assert getattr(a, name) == getattr(b, name), name
    assert a.layer_skip_rounds > 0 and a.lookup_rounds > 0  # both draft kinds ran
    # one row: its draft forwards are the loop's; lookup drafts run none (so fewer forwards than
    # tokens drafted)
    assert a.draft_steps == dec.stats.draft_steps > 0
    assert a.draft_steps < a.drafted
