"""The decoding methods the end-to-end benchmark compares, each a function
``run(model, ids, ctx) -> MethodResult`` on one prompt, all greedy.

A method spec on the command line is a name, optionally with ClaspConfig overrides after a colon:
``clasp``, ``clasp-static``, ``clasp:num_skip_layers=10,max_draft=4``. The ``clasp*`` methods run
this library; ``ar``, ``pld`` and ``early-exit`` run transformers' own ``generate``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

from transformers import GenerationConfig
from transformers.generation import candidate_generator as hf_candidates

import clasp_ext


@dataclass
class Context:
    """What every method of one prompt shares."""

    max_new_tokens: int
    eos_token_id: list[int]
    pad_token_id: int | None
    prompt_index: int  # seeds clasp-random, so its skip set is fixed per prompt
    early_exit_layer: int  # transformers' assistant_early_exit: layers the draft runs


@dataclass
class MethodResult:
    new_tokens: list[int]
    wall_s: float
    rounds: int | None = None  # verify forwards after the prefill
    drafted: int | None = None
    draft_steps: int | None = None  # layer-skip draft forwards (lookup drafts run none)
    accepted: int | None = None
    round_tokens: int | None = None  # tokens emitted by those rounds
    dp_runs: int | None = None
    dp_runs_time_s: float | None = None
    first_dp_token: int | None = None  # new tokens before the first DP (0: at prefill; -1: none)
    times: dict = field(default_factory=dict)  # prefill/draft/verify/dp/other seconds (clasp)
    skip_layers: list | None = None
    host_syncs_per_round: float | None = None
    round_kinds: dict | None = None  # rounds per kind: plain / lookup / short_lookup / layer_skip
    low_bit_bytes: int | None = None  # memory of the int8 draft copies (draft_weights="int8")
    # rounds that verified siblings of the draft (branches.py), and those where one matched
    branch_rounds: int | None = None
    branch_hits: int | None = None
    # ar only: seconds from the call to each new token (e2e_report.speedup compares an output a
    # near-tie made shorter or longer against ar's time to as many tokens)
    token_times: list | None = None


# ---------------------------------------------------------------- transformers' methods
def _hf_config(ctx: Context, **extra) -> GenerationConfig:
    # An explicit config: the model's own generation_config may ask for sampling or a repetition
    # penalty (Qwen2.5-Instruct does); every method here is plain greedy.
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=ctx.max_new_tokens,
        eos_token_id=ctx.eos_token_id or None,
        pad_token_id=ctx.pad_token_id,
        **extra,
    )


class _CandidateCounter:
    """Counts the rounds and drafted tokens of transformers' assisted generation by wrapping the
    candidate generator's ``get_candidates`` (transformers reports neither)."""

    def __init__(self, cls):
        self.cls = cls
        self.rounds = 0
        self.drafted = 0

    @contextlib.contextmanager
    def active(self):
        original = self.cls.get_candidates
        counter = self

        def counting(gen, input_ids, *args, **kwargs):
            cand, logits = original(gen, input_ids, *args, **kwargs)
            counter.rounds += 1
            counter.drafted += cand.shape[1] - input_ids.shape[1]
            return cand, logits

        self.cls.get_candidates = counting
        try:
            yield self
        finally:
            self.cls.get_candidates = original


class _TokenClock:
    """A transformers streamer that only notes when each new token arrives (the first ``put`` is
    the prompt)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if self._prompt_seen:
            self.times.extend([time.perf_counter() - self.start] * max(1, value.numel()))
        self._prompt_seen = True

    def end(self):
        pass


def _run_hf(model, ids, ctx: Context, counter_cls=None, clock=False, **extra) -> MethodResult:
    cfg = _hf_config(ctx, **extra)
    counter = _CandidateCounter(counter_cls) if counter_cls else None
    with counter.active() if counter else contextlib.nullcontext():
        t = time.perf_counter()
        streamer = _TokenClock() if clock else None
        out = model.generate(ids, generation_config=cfg, streamer=streamer)
        wall = time.perf_counter() - t
    new = out[0, ids.shape[1] :].tolist()
    r = MethodResult(new_tokens=new, wall_s=wall)
    if streamer is not None and len(streamer.times) == len(new):
        r.token_times = [round(x, 5) for x in streamer.times]
    if counter is not None:
        r.rounds = counter.rounds
        r.drafted = counter.drafted
        r.round_tokens = len(new)  # assisted generation has no separate prefill token
        r.accepted = max(0, len(new) - counter.rounds)
    return r


def run_ar(model, ids, ctx):
    return _run_hf(model, ids, ctx, clock=True)


def run_pld(model, ids, ctx):
    # transformers' documented example value; max_matching_ngram_size keeps its default (2)
    return _run_hf(
        model,
        ids,
        ctx,
        counter_cls=hf_candidates.PromptLookupCandidateGenerator,
        prompt_lookup_num_tokens=10,
    )


def run_early_exit(model, ids, ctx):
    return _run_hf(
        model,
        ids,
        ctx,
        counter_cls=hf_candidates.EarlyExitCandidateGenerator,
        assistant_early_exit=ctx.early_exit_layer,
    )


# ---------------------------------------------------------------- this library
def _run_clasp(model, ids, ctx: Context, **overrides) -> MethodResult:
    t = time.perf_counter()
    dec = clasp_ext.ClaspDecoder(
        model,
        max_new_tokens=ctx.max_new_tokens,
        eos_token_id=ctx.eos_token_id,
        temperature=0.0,
        **overrides,
    )
    out = dec.generate(ids)
    wall = time.perf_counter() - t
    s = out.stats
    return MethodResult(
        new_tokens=out.sequences[0, ids.shape[1] :].tolist(),
        wall_s=wall,
        rounds=s.rounds,
        drafted=s.drafted,
        draft_steps=s.draft_steps,
        accepted=s.accepted,
        round_tokens=s.round_tokens,
        dp_runs=s.dp_runs,
        first_dp_token=s.first_dp_token,
        times=dict(
            prefill=s.time_prefill,
            draft=s.time_draft,
            verify=s.time_verify,
            dp=s.time_dp,
            other=s.time_other,
            total=s.time_total,
        ),
        skip_layers=list(s.skip_layers),
        host_syncs_per_round=s.host_syncs_per_round,
        round_kinds=dict(
            plain=s.plain_rounds,
            lookup=s.lookup_rounds - s.short_lookup_rounds,
            short_lookup=s.short_lookup_rounds,
            layer_skip=s.layer_skip_rounds,
        ),
        low_bit_bytes=dec.low_bit_bytes,
        branch_rounds=s.branch_rounds,
        branch_hits=s.branch_hits,
    )


BUILTIN = {
    "ar": (run_ar, {}),
    "clasp": (_run_clasp, {}),  # the library's defaults
    "clasp-fixed": (_run_clasp, {"policy": "fixed"}),  # every round drafts, up to max_draft
    "clasp-cost": (_run_clasp, {"policy": "cost"}),  # per-round choice from the cost table
    "clasp-int8": (_run_clasp, {"draft_weights": "int8"}),  # drafts on int8 weight copies
    "clasp-int4": (_run_clasp, {"draft_weights": "int4"}),  # drafts on int4 weight copies
    "clasp-layerskip": (_run_clasp, {"lookup_ngram": 0}),  # layer-skip drafts alone
    "clasp-chain": (_run_clasp, {"draft_branches": 0}),  # no siblings: chain drafts only
    "clasp-static": (_run_clasp, {"skip_strategy": "static"}),
    "clasp-importance": (_run_clasp, {"skip_strategy": "importance"}),
    "clasp-random": (_run_clasp, {"skip_strategy": "random"}),
    # every round verifies one token: this library's own loop with no speculation, which
    # separates the loop's overhead from the gain of speculation
    "clasp-nodraft": (_run_clasp, {"max_draft": 0, "num_skip_layers": 0}),
    # layer-skip drafts alone that skip the skip set's MLP blocks only (issue 9 item 6's first
    # measurement, against clasp-fixed:draft_weights=original,lookup_ngram=0)
    "clasp-mlpskip": (
        _run_clasp,
        {"skip_unit": "mlp", "draft_weights": "original", "policy": "fixed", "lookup_ngram": 0},
    ),
    "pld": (run_pld, {}),
    "early-exit": (run_early_exit, {}),
}


def _parse_value(v: str):
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    if v in ("True", "False"):
        return v == "True"
    if "+" in v:  # an explicit skip list: 3+7+11
        return [int(x) for x in v.split("+")]
    return v


def parse_method(spec: str):
    """'clasp:num_skip_layers=10,max_draft=4' -> (label, function, overrides)."""
    name, _, rest = spec.partition(":")
    if name not in BUILTIN:
        raise SystemExit(f"bench_e2e: unknown method {name!r}; known: {', '.join(BUILTIN)}")
    fn, overrides = BUILTIN[name]
    overrides = dict(overrides)
    if rest:
        if fn is not _run_clasp:
            raise SystemExit(f"bench_e2e: only clasp methods take overrides, got {spec!r}")
        for item in rest.split(","):
            k, eq, v = item.partition("=")
            if not eq:
                raise SystemExit(f"bench_e2e: override {item!r} in {spec!r} is not key=value")
            overrides[k] = _parse_value(v)
        clasp_ext.ClaspConfig().replace(**overrides)  # unknown names fail here, before any run
    return spec, fn, overrides


def early_exit_layer(num_layers: int, clasp_overrides: dict) -> int:
    """The exit layer whose draft runs as many layers as the default CLaSp draft: L - M."""
    cfg = clasp_ext.ClaspConfig().replace(**clasp_overrides).resolved(num_layers)
    return num_layers - cfg.num_skip_layers


def median_run(runs: list[MethodResult]) -> MethodResult:
    """The run with the median wall time (of an even count, the faster middle one): its tokens
    and statistics stand for the method on that prompt (bench_e2e --repeats)."""
    if not runs:
        raise ValueError("median_run: no runs")
    return sorted(runs, key=lambda r: r.wall_s)[(len(runs) - 1) // 2]


def run_method(fn, overrides, model, ids, ctx) -> MethodResult:
    if fn is _run_clasp:
        if overrides.get("skip_strategy") == "random":
            overrides = dict(overrides, seed=ctx.prompt_index)
        return fn(model, ids, ctx, **overrides)
    return fn(model, ids, ctx)
