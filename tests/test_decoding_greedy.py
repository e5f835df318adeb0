"""Greedy CLaSp output equals model.generate(do_sample=False) (SPEC section 4)."""

from __future__ import annotations

import pytest
import torch
from decoding_models import FAMILIES, tiny_model

from clasp_ext.decoding import ClaspDecoder, generate
from clasp_ext.decoding.config import DEFAULT_MAX_LOOKUP
from clasp_ext.decoding.cost_model import CostTable

torch.set_num_threads(1)

NEAR_TIE = 1e-4

# Per-round policies: "cost" with a table where verify is flat and a draft step nearly free, so
# the policy drafts (layer skip and lookup) and its length choices run through the loop.
POLICIES = {
    "fixed": {"policy": "fixed"},
    "cost": {"policy": "cost", "cost_table": CostTable({1: 1.0, 16: 1.0}, 0.05, 0.1)},
}


def hf_greedy(model, ids, max_new_tokens, eos=None):
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0 if eos is not None else max_new_tokens,
        eos_token_id=eos,
        pad_token_id=0,
    )
    return out[0].tolist()


def assert_lossless(model, got: list[int], want: list[int], prompt_len: int):
    """Equal, or the first difference is a near-tie of the full model (checked, not skipped)."""
    if got == want:
        return
    i = next((j for j, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
    assert i is not None, f"lengths differ: {len(got)} vs {len(want)}"
    assert i >= prompt_len
    with torch.no_grad():
        logits = model(torch.tensor([got[:i]])).logits[0, -1].float()
    top2 = torch.topk(logits, 2).values
    gap = float(top2[0] - top2[1])
    assert gap < NEAR_TIE, f"divergence at step {i - prompt_len} is not a near-tie (gap {gap:.3g})"


SETTINGS = [
    # M, max_draft, threshold, interval, strategy
    (1, 1, 0.0, 1, "dp"),
    (2, 4, 0.3, 2, "dp"),
    (3, 6, 0.0, 3, "dp"),
    (4, 3, 0.6, 1, "dp"),
    (2, 5, 0.2, 4, "static"),
    (3, 4, 0.1, 2, "importance"),
    (2, 4, 0.0, 1, "random"),
    (None, 3, 0.0, 1, [1, 4]),
]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("setting", range(len(SETTINGS)))
@torch.no_grad()
def test_greedy_equals_generate(family, setting, policy):
    M, max_draft, thr, interval, strategy = SETTINGS[setting]
    model = tiny_model(family, layers=6, window=8, seed=setting)
    gen = torch.Generator().manual_seed(100 + setting)
    for trial in range(2):
        T = int(torch.randint(1, 20, (1,), generator=gen))
        ids = torch.randint(3, model.config.vocab_size, (1, T), generator=gen)
        n_new = 24 + 7 * trial
        want = hf_greedy(model, ids, n_new)
        out = generate(
            model,
            ids,
            num_skip_layers=M,
            max_draft=max_draft,
            draft_exit_threshold=thr,
            update_interval=interval,
            skip_strategy=strategy,
            max_new_tokens=n_new,
            eos_token_id=[],
            seed=trial,
            **POLICIES[policy],
        )
        got = out.sequences[0].tolist()
        assert len(got) == T + n_new
        assert_lossless(model, got, want, T)
        s = out.stats
        assert s.new_tokens == n_new
        assert s.round_tokens == n_new - 1
        assert s.round_tokens == s.accepted + s.branch_hits + s.rounds
        # a lookup draft may be longer than max_draft (up to max_lookup)
        assert 0 <= s.accepted <= s.drafted <= max(max_draft, DEFAULT_MAX_LOOKUP) * s.rounds
        if M:
            assert len(s.skip_layers) == M
        # one verify read per round, one per draft token only with an exit threshold, one per DP
        assert s.max_round_host_syncs <= (max_draft if thr > 0 else 0) + 2


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@torch.no_grad()
def test_greedy_eager_attention(family):
    model = tiny_model(family, attn="eager", layers=5, window=6, seed=7)
    ids = torch.randint(
        3, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3)
    )
    want = hf_greedy(model, ids, 30)
    out = generate(model, ids, num_skip_layers=2, max_draft=4, max_new_tokens=30, eos_token_id=[])
    assert_lossless(model, out.sequences[0].tolist(), want, 9)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_eos_and_max_new_tokens_exact(family, policy):
    pol = POLICIES[policy]
    model = tiny_model(family, layers=6, seed=11)
    ids = torch.randint(
        3, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(4)
    )
    free = hf_greedy(model, ids, 30)[6:]
    # an EOS that first appears mid-generation: generation stops right after it
    firsts = [i for i, t in enumerate(free) if t not in free[:i]]
    eos = free[firsts[min(2, len(firsts) - 1)]]
    stop = free.index(eos)
    want = hf_greedy(model, ids, 30, eos=eos)
    assert len(want) == 6 + stop + 1
    for max_draft in (1, 3, 8):
        out = generate(
            model,
            ids,
            max_new_tokens=30,
            eos_token_id=eos,
            max_draft=max_draft,
            num_skip_layers=2,
            draft_exit_threshold=0.0,
            **pol,
        )
        assert_lossless(model, out.sequences[0].tolist(), want, 6)
        assert out.sequences[0].tolist().count(eos) == 1
    # list of EOS ids, and exact max_new_tokens for every small budget
    out = generate(
        model, ids, max_new_tokens=30, eos_token_id=[12345 % 256, eos], max_draft=5, **pol
    )
    assert out.sequences[0, -1].item() == eos
    for n in (0, 1, 2, 3, 5, 9):
        out = generate(model, ids, max_new_tokens=n, eos_token_id=[], max_draft=4, **pol)
        assert out.sequences.shape == (1, 6 + n)
        assert out.sequences[0, 6:].tolist() == free[:n]


@torch.no_grad()
def test_decoder_step_api_and_streaming():
    model = tiny_model("qwen2", layers=4, seed=3)
    ids = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(9))
    want = hf_greedy(model, ids, 20)
    chunks = []
    dec = ClaspDecoder(model, max_new_tokens=20, eos_token_id=[], callback=chunks.append)
    first = dec.prefill(ids)
    assert len(first) == 1
    steps = [first]
    while not dec.finished:
        steps.append(dec.step())
    assert dec.step() == []
    assert sum(steps, []) == want[5:]
    assert sum(chunks, []) == want[5:]
    assert dec.sequences[0].tolist() == want
    # reusable after reset / a second prefill
    dec.reset()
    dec.prefill(ids)
    while not dec.finished:
        dec.step()
    assert dec.sequences[0].tolist() == want


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_low_precision_runs(dtype):
    """bf16/fp16 models decode (the DP states and kernels take the model dtype); greedy equality
    is only promised in fp32, so this checks the first tokens and the bookkeeping."""
    model = tiny_model("gemma3", layers=4, dtype=dtype, seed=2)
    ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    want = hf_greedy(model, ids, 12)
    out = generate(model, ids, max_new_tokens=12, eos_token_id=[], max_draft=3, update_interval=1)
    assert out.sequences.shape == (1, 20)
    assert out.sequences[0, :9].tolist() == want[:9]
    s = generate(model, ids, max_new_tokens=12, eos_token_id=[], temperature=0.9, top_p=0.9, seed=1)
    assert s.sequences.shape == (1, 20)


@torch.no_grad()
def test_update_interval_and_strategies_schedule():
    model = tiny_model("llama", layers=6, seed=4)
    ids = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(2))
    want = hf_greedy(model, ids, 30)
    runs = {}
    for strategy, interval in [("dp", 1), ("dp", 3), ("static", 1), ("importance", 2)]:
        out = generate(
            model,
            ids,
            max_new_tokens=30,
            eos_token_id=[],
            num_skip_layers=3,
            skip_strategy=strategy,
            update_interval=interval,
            max_draft=3,
            policy="fixed",  # every round ages the skip set (with "cost" only layer-skip rounds)
        )
        assert_lossless(model, out.sequences[0].tolist(), want, 7)
        s = out.stats
        runs[(strategy, interval)] = (s.dp_runs, s.rounds)
        assert len(s.importance) == 6 and len(s.skip_layers) == 3
    dp1, r1 = runs[("dp", 1)]
    assert dp1 == r1  # at prefill, then after every round but the last
    dp3, r3 = runs[("dp", 3)]
    assert dp3 == 1 + (r3 - 1) // 3
    assert runs[("static", 1)][0] == 1
    imp, ri = runs[("importance", 2)]
    assert imp == 1 + (ri - 1) // 2
    for strategy in ("random", [0, 2, 5]):
        s = generate(
            model,
            ids,
            max_new_tokens=30,
            eos_token_id=[],
            num_skip_layers=3,
            skip_strategy=strategy,
            seed=0,
        ).stats
        assert s.dp_runs == 0 and len(s.skip_layers) == 3
    assert s.skip_layers == [0, 2, 5]


@torch.no_grad()
def test_transformers_streamer_protocol():
    class Recorder:
        def __init__(self):
            self.puts, self.ends = [], 0

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ends += 1

    model = tiny_model("mistral", layers=4, seed=1)
    ids = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(1))
    rec = Recorder()
    out = generate(model, ids, max_new_tokens=12, eos_token_id=[], streamer=rec)
    assert rec.puts[0] == ids.tolist()  # the prompt first, like model.generate
    assert sum(rec.puts[1:], []) == out.sequences[0, 5:].tolist()
    assert rec.ends == 1


@pytest.mark.parametrize("strategy", ["dp", "static", "importance"])
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_first_search_on_the_first_output_token(family, strategy):
    """first_dp="first_round": no skip set at prefill; round 1 runs without a layer-skip draft and
    the first search targets the first output token; output still equals model.generate."""
    model = tiny_model(family, layers=6, window=8, seed=2)
    ids = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(4))
    want = hf_greedy(model, ids, 20)
    dec = ClaspDecoder(
        model,
        num_skip_layers=2,
        max_draft=4,
        draft_exit_threshold=0.0,
        max_new_tokens=20,
        eos_token_id=[],
        lookup_ngram=0,
        skip_strategy=strategy,
        first_dp="first_round",
        policy="fixed",  # round 1 is a plain step; later rounds draft by layer skip
    )
    dec.prefill(ids)
    assert dec.stats.dp_runs == 0 and dec.stats.skip_layers == []
    dec.step()
    assert dec.stats.layer_skip_rounds == 0 and dec.stats.plain_rounds == 1
    assert dec.stats.dp_runs == 1 and len(dec.stats.skip_layers) == 2
    while not dec.finished:
        dec.step()
    assert dec.stats.layer_skip_rounds > 0
    assert_lossless(model, dec.tokens, want, ids.shape[1])
    with pytest.raises(ValueError, match="first_dp must be one of"):
        ClaspDecoder(model, first_dp="later")
