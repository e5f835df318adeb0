"""The per-round choice of ``ClaspConfig(policy="cost")``: a plain step, a context-lookup draft of
length k, or a layer-skip draft of at most k tokens, whichever promises the most tokens per second.

A draft whose position i is drafted with probability r_i (a layer-skip draft stops itself at the
exit threshold; a lookup draft always proposes its k tokens) and accepted with probability a_i
(given it was drafted and positions < i were accepted) emits 1 + sum_i r_i prod_{j<=i} a_j tokens
in expectation and costs (sum_i r_i) draft steps (none for a lookup draft) + one verify forward of
that many tokens + 1; a plain step emits 1 token for verify(1). The costs come from the measured
table (cost_model.py); a and r are running estimates per draft source, exponentially weighted from
a prior. On hardware where verify(T) grows like T (a CPU without bf16 matrix units) no draft can
pay and every round is a plain step; where it is flat (a GPU at batch 1) long drafts win as soon as
acceptance is high. The choice only decides what is proposed: the verify pass decides what is
emitted, so output is unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

PLAIN, LAYER_SKIP = "plain", "layer_skip"
# the siblings of a greedy layer-skip draft (branches.py). Its Source counts misses as
# "accepted": position i of its estimate is P(the draft's (i + 2)-th best token at a rejected
# position is not the target's token | the better siblings were not), so a hit at rank r is the
# chain bookkeeping's "r accepted, then rejected" and Source.observe applies unchanged.
BRANCH = "branch"
# lookup drafts by the length n of the n-gram that matched: longer matches are more often right
LONG_LOOKUP, LOOKUP, SHORT_LOOKUP = "long_lookup", "lookup", "short_lookup"  # n >= 3, 2, 1
LOOKUPS = (LONG_LOOKUP, LOOKUP, SHORT_LOOKUP)


def lookup_source(ngram: int) -> str:
    return LONG_LOOKUP if ngram >= 3 else LOOKUP if ngram == 2 else SHORT_LOOKUP


_NGRAM = {LONG_LOOKUP: 3, LOOKUP: 2, SHORT_LOOKUP: 1}  # a match length of each lookup source


# Acceptance priors per position group: (first position, later positions), or one value for all
# positions. Optimistic enough that a source is tried where it can pay, so the estimates can
# learn. A layer-skip draft's positions are alike (one group, so what the first position teaches
# applies to all: a policy that drafts one token learns whether longer drafts would pay). A lookup
# match's first token is often wrong where text does not copy its context (chat, maths: 7 of 62
# accepted on two Spec-Bench prompts), but once it is right the copy tends to go on. A 3-gram
# match (0.6) is tried even where verifying 9 tokens costs ~2.5 steps (fp32 on the AVX-512
# EPYC), so summaries and RAG answers, which copy long spans, get their lookup drafts there; a
# failed try costs one such verify, and two or three failures drop the source. A 2-gram match
# (0.35) is tried where verifying 9 tokens costs up to ~2.3 steps; a single-token match (0.15)
# only where verifying 2 tokens costs at most ~1.1 steps, where a mostly wrong free guess pays.
PRIORS = {
    LONG_LOOKUP: (0.6, 0.85),
    LOOKUP: (0.35, 0.8),
    SHORT_LOOKUP: (0.15, 0.6),
    LAYER_SKIP: (0.8,),
    # misses per sibling rank: tried where a flat verify makes siblings nearly free, written
    # off after a few misses where they cost
    BRANCH: (0.6, 0.85),
}
# P(a layer-skip draft goes on after a token): the exit threshold stops it where the draft is
# unsure, so "at most k tokens" usually drafts fewer than k, and costs that many draft steps.
CONTINUE_PRIOR = (0.7,)
RATE = 0.15  # weight of each new observation once warmed up (about the last 7 rounds matter)
# The first observations of a group weigh 1 / (n + PRIOR_WEIGHT) (the prior counts as this many
# observations): a draft that fails on its first tries is dropped after two or three rounds, not
# seven (each failed round costs a verify of k + 1 tokens for one token).
PRIOR_WEIGHT = 2
# Per round a source is not used, its estimates drift back this much toward the prior: a source
# written off early is retried now and then (text changes), at a bounded cost.
RELAX = 0.01
# A draft must promise this much more than a plain step: rounds with a draft carry host-side work
# the forward timings do not show (lookup, tensors, acceptance bookkeeping).
MIN_GAIN = 1.02
# At batch > 1 the margin is wider. bench_batch at B = 4 (bf16, AVX-512 EPYC, dev prompts of up
# to 670 tokens) found drafted rounds at break-even by the estimates (2.0-2.5 tokens per row for
# 1.9-2.2 plain steps) realise 0.87-0.95x of model.generate's decoding: a batch's rows finish
# at different times and its acceptance, pooled over rows, is less certain than one sequence's
# (bench/results/batch-qwen2.5-coder-1.5b-bf16/before-time-scale).
BATCH_MIN_GAIN = 1.10
# Round times against the table (TimeScale): each observation's ratio is clipped to this range
# (one stray pause must not write off a kind), the first ones weigh 1 / (n + TIME_PRIOR_WEIGHT),
# later ones RATE, and a kind not observed in a round drifts back toward 1 by RELAX (so a kind
# written off by its measured times is retried, as acceptance estimates are).
TIME_RATIO_RANGE = (0.5, 2.0)
TIME_PRIOR_WEIGHT = 4
# While siblings are on, one layer-skip round in this many verifies its chain alone (TimeScale):
# it gives up siblings' expected gain on that round (~5% of its tokens on the AMX Xeon).
CHAIN_PROBE = 8


class Estimate:
    """A running probability per draft position, pooled in groups: position i reads group
    min(i, len(prior) - 1)."""

    def __init__(self, prior: tuple, rate: float = RATE, relax: float = RELAX):
        self.prior = list(prior)
        self.rate, self.relax_rate = rate, relax
        self.p = list(self.prior)
        self.n = [0] * len(self.prior)  # observations per group

    def at(self, i: int) -> float:
        return self.p[min(i, len(self.p) - 1)]

    def update(self, i: int, outcome: bool) -> None:
        g = min(i, len(self.p) - 1)
        self.n[g] += 1
        rate = max(self.rate, 1.0 / (self.n[g] + PRIOR_WEIGHT))
        self.p[g] += rate * ((1.0 if outcome else 0.0) - self.p[g])

    def relax(self) -> None:
        self.p = [p + self.relax_rate * (q - p) for p, q in zip(self.p, self.prior, strict=True)]


class TimeScale:
    """Measured round time over the table's prediction, a running ratio per round kind (plain,
    layer skip, lookup): the table is timed at one context length and without the loop's host
    work, the rounds run at their own. Starts at 1 (the table as measured).

    A drafted kind's ratio is kept relative to the plain rounds': what slows a plain round (a
    longer context than the table's, a busy machine) slows a drafted round's forwards too, so a
    kind seen rarely (layer-skip drafts at batch 8, where most rounds are plain) starts from the
    plain rounds' ratio instead of the table's, and its own rounds teach how much slower or
    faster than that it runs. Seen alone (plain rounds rare, at batch 1), its relative ratio
    carries all. While a base kind learns its level (LEVEL_ROUNDS: until the table's prior
    weighs at most RATE in its ratio, ``prior_left``; 12 rounds), the kinds already timed on
    their own keep their ratios: their rounds measured them, against a base that was still the
    table's guess (on the AVX-512 EPYC, layer-skip rounds timed 1.45x
    the table before any plain round ran, then plain rounds 1.4x: relative to those, layer-skip
    rounds were priced at 2x, and the policy chose plain steps that ran as long as a draft).

    BRANCH: the layer-skip rounds that verified siblings (a token tree), relative to the chain
    rounds' ratio. The table prices a tree as a chain of as many tokens; where its samples of a
    long verify read low (three samples on the 2-core AVX-512 EPYC: verify of 25 tokens 8% above
    8 where the forwards measure 50%), the tree rounds' own times correct the price of siblings
    (``CostPolicy.branch_width``) without touching the chains'. Until a chain round has been
    timed, the tree rounds' ratio stands in for the chains' (BRANCH stays 1: siblings priced as
    the table says), so what slows every round (host work) is not blamed on the siblings; the
    first chain round then replaces that stand-in, and tree rounds teach BRANCH from there. While
    siblings are on, the round after the first tree round and then every CHAIN_PROBE-th
    layer-skip round verify the chain alone (``branch_width``), so that base is measured early
    and stays measured."""

    def __init__(self):
        # PLAIN: the plain rounds' ratio; the others: their ratio over their base's (_BASE)
        self.r = {PLAIN: 1.0, LAYER_SKIP: 1.0, LOOKUP: 1.0, BRANCH: 1.0}
        self.n = dict.fromkeys(self.r, 0)
        self.stand_ins = 0  # tree rounds timed as chains (before any chain round was)

    @staticmethod
    def group(kind: str) -> str:
        return LOOKUP if kind in LOOKUPS else kind

    def __call__(self, kind: str) -> float:
        g = self.group(kind)
        return self.r[g] * (self(_BASE[g]) if g in _BASE else 1.0)

    def observe(self, kind: str, predicted_s: float, actual_s: float) -> None:
        """One round of ``kind``: the table said ``predicted_s``, it took ``actual_s``."""
        g = self.group(kind)
        for other in self.r:  # a tree round is a layer-skip round: the chains' ratio holds
            if other != g and not (g == BRANCH and other == LAYER_SKIP):
                self.r[other] += RELAX * (1.0 - self.r[other])
        if predicted_s <= 0:
            return
        lo, hi = TIME_RATIO_RANGE
        x = min(hi, max(lo, actual_s / predicted_s))
        if g == BRANCH and self.n[LAYER_SKIP] == 0:  # no chain timed yet: the trees stand in
            self.stand_ins += 1
            self._learn(LAYER_SKIP, x / self(PLAIN), self.stand_ins)
            return
        if g in _BASE:
            x /= self(_BASE[g])
        # the kinds timed on their own keep their measured ratios while g learns its level
        held = {}
        if self.n[g] < LEVEL_ROUNDS:
            held = {d: self(d) for d, base in _BASE.items() if base == g and self._timed(d)}
        if g == LAYER_SKIP and self.n[g] == 0 and self.stand_ins > 0:
            self.n[g], self.r[g] = 1, x  # the first chain round replaces the trees' stand-in
        else:
            self.n[g] += 1
            self._learn(g, x, self.n[g])
        for d, ratio in held.items():
            self.r[d] = ratio / self(g)

    def _timed(self, kind: str) -> bool:
        """Whether rounds of ``kind`` have been timed (tree rounds standing in for chains count)."""
        return self.n[kind] > 0 or (kind == LAYER_SKIP and self.stand_ins > 0)

    def _learn(self, g: str, x: float, n: int) -> None:
        """Moves ratio g toward x, the n-th observation weighing ``time_rate(n)``."""
        self.r[g] += time_rate(n) * (x - self.r[g])


# the kind each round kind's time ratio is relative to (TimeScale)
_BASE = {LAYER_SKIP: PLAIN, LOOKUP: PLAIN, BRANCH: LAYER_SKIP}


def time_rate(n: int) -> float:
    """The weight of a kind's n-th round time (TimeScale): 1 / (n + TIME_PRIOR_WEIGHT), at
    least RATE."""
    return max(RATE, 1.0 / (n + TIME_PRIOR_WEIGHT))


def prior_left(n: int) -> float:
    """The weight the table's ratio (1) keeps in a kind's ratio after its first n observations
    (``TimeScale._learn``): 0.8, 0.67, 0.57, then x 0.85 per round (RATE); at most RATE after 12.
    While it is above RATE the kind is still learning its level."""
    left = 1.0
    for i in range(1, n + 1):
        left *= 1.0 - time_rate(i)
    return left


# the rounds a kind takes to learn its level: until then the kinds timed relative to it keep
# their own measured ratios (TimeScale.observe)
LEVEL_ROUNDS = next(n for n in range(1, 100) if prior_left(n) <= RATE)


class Source:
    """What the policy knows about one draft source: P(position i accepted | drafted, positions
    < i accepted) and, for a draft that stops itself (the layer-skip exit threshold), P(it goes
    on after position i | position i drafted)."""

    def __init__(self, prior: tuple, stops: bool):
        self.accept = Estimate(prior)
        self.cont = Estimate(CONTINUE_PRIOR) if stops else None

    def expected(self, k_max: int, ones: bool = False) -> list[tuple[float, float]]:
        """[(E tokens emitted, E tokens drafted) for a draft of at most k = 0..k_max tokens] (every
        position accepted with ``ones``)."""
        out = [(1.0, 0.0)]
        emitted, drafted, reach, run = 1.0, 0.0, 1.0, 1.0
        for i in range(k_max):
            drafted += reach  # position i is drafted when the draft went on past 0..i-1
            run *= 1.0 if ones else self.accept.at(i)
            emitted += reach * run
            out.append((emitted, drafted))
            if self.cont is not None:
                reach *= self.cont.at(i)
        return out

    def observe(self, drafted: int, accepted: int, k_max: int) -> None:
        """Positions < ``accepted`` were accepted, position ``accepted`` (if drafted) rejected,
        later ones untested. The draft went on after positions < drafted - 1 and stopped itself
        after the last one if that came before ``k_max``."""
        for i in range(min(drafted, accepted + 1)):
            self.accept.update(i, i < accepted)
        if self.cont is not None:
            for i in range(drafted - 1):
                self.cont.update(i, True)
            if 0 < drafted < k_max:
                self.cont.update(drafted - 1, False)

    def relax(self) -> None:
        self.accept.relax()
        if self.cont is not None:
            self.cont.relax()


@dataclass
class Choice:
    kind: str  # PLAIN, LAYER_SKIP or one of LOOKUPS
    k: int  # draft length (lookup) or most draft tokens (layer skip); 0 for a plain step
    rate: float  # expected tokens per second
    seconds: float = 0.0  # the round's expected seconds (rate x seconds = E tokens emitted)


class CostPolicy:
    """Chooses each round's draft from a ``CostTable`` and the acceptance seen so far.

    ``exit_threshold``: whether layer-skip drafts stop themselves (draft_exit_threshold > 0).
    ``dp_s_per_round``: the skip-set DP's cost spread over the layer-skip rounds it serves
    (dp_s / update_interval), charged to each layer-skip option."""

    def __init__(
        self,
        table,
        exit_threshold: bool = True,
        dp_s_per_round: float = 0.0,
        online_costs: bool = True,
    ):
        self.table = table
        self.online_costs = online_costs
        self.dp_s_per_round = dp_s_per_round
        self.sources = {
            kind: Source(prior, stops=exit_threshold and kind == LAYER_SKIP)
            for kind, prior in PRIORS.items()
        }
        # fed by the loops' observe_time; one ratio per round kind, whatever the batch size and
        # draft length (host work that grows with them is averaged in)
        self.time_scale = TimeScale()
        self.tree_rounds = 0  # rounds that verified siblings since the last chain-alone one

    def cost(self, kind: str, drafted: float, rows: int = 1) -> float:
        """Expected seconds of a round that drafts ``drafted`` tokens (an expectation): the
        table's, scaled by the rounds' measured times where ``scale_times`` is on; a layer-skip
        round of ``rows`` sequences also pays each one's share of its DP re-runs."""
        scale = self.time_scale(kind) if self.scale_times else 1.0
        dp = self.dp_s_per_round * rows if kind == LAYER_SKIP else 0.0
        return self.table_s(kind, drafted, drafted) * scale + dp

    def table_s(self, kind: str, k: float, steps: float) -> float:
        """A round's seconds by the table: ``steps`` draft steps (layer skip) and a verify of
        k + 1 tokens."""
        if kind == PLAIN:
            return self.table.verify(1)
        draft = steps * self.table.draft_step_s if kind in (LAYER_SKIP, BRANCH) else 0.0
        return draft + self.table.verify(k + 1)

    @property
    def scale_times(self) -> bool:
        """Whether the loop's measured round times scale the table (a measured table only)."""
        return self.online_costs and self.table.measured

    def observe_time(self, kind: str, k: int, steps: int, seconds: float) -> None:
        """A round's draft and verify time (not the DP's): ``k`` tokens verified after the first,
        ``steps`` draft steps run."""
        if kind in (BRANCH, LAYER_SKIP):
            self.tree_rounds = self.tree_rounds + 1 if kind == BRANCH else 0
        if self.scale_times:
            self.time_scale.observe(kind, self.table_s(kind, k, steps), seconds)

    def choose(
        self, k_max: int, lookup_len: int = 0, layer_skip: bool = True, lookup_kind: str = LOOKUP
    ) -> Choice:
        """One sequence's round (``choose_rows`` with one row): a plain step; the first
        1..``lookup_len`` looked-up tokens of a ``lookup_kind`` match; a layer-skip draft of at
        most 1..``k_max`` tokens (when ``layer_skip``)."""
        looked = [([0] * lookup_len, _NGRAM[lookup_kind])]
        best = self.choose_rows([k_max], k_max if layer_skip else 0, looked)
        return dataclasses.replace(best, kind=lookup_kind) if best.kind == LOOKUP else best

    def choose_rows(
        self,
        caps: list[int],
        k_layer_skip: int,
        looked: list[tuple[list[int], int]],
        sources: list[dict] | None = None,
    ) -> Choice:
        """The round of B = len(caps) sequences with the most expected tokens per second summed
        over them (the one choice rule, for one sequence and for batches): a plain step; a
        layer-skip draft of at most k <= ``k_layer_skip`` tokens for every row (row b never past
        its ``caps[b]``; the draft runs while any row goes on); or a lookup round, row b proposing
        up to k tokens of its own match ``looked[b]`` = (tokens, n-gram length), no draft forward.
        ``sources``: each row's estimates (None: the pooled ones for every row). A draft must
        beat a plain step by MIN_GAIN (BATCH_MIN_GAIN for batches). Returns kind LOOKUP for any
        lookup round."""
        B = len(caps)
        plain_s = self.cost(PLAIN, 0)
        plain = B / plain_s
        best = Choice(PLAIN, 0, plain, plain_s)
        floor = plain * (MIN_GAIN if B == 1 else BATCH_MIN_GAIN)
        srcs = sources or [self.sources] * B
        if k_layer_skip > 0:
            # (E emitted, E drafted) per row, from its own estimates, for drafts of at most k
            es = [src[LAYER_SKIP].expected(k_layer_skip) for src in srcs]
            for k in range(1, k_layer_skip + 1):  # a row near its end drafts only up to its cap
                emitted = sum(e[min(k, cap)][0] for e, cap in zip(es, caps, strict=True))
                seconds = self.cost(LAYER_SKIP, batch_draft_steps(es, caps, k), B)
                if emitted / seconds > max(floor, best.rate):
                    best = Choice(LAYER_SKIP, k, emitted / seconds, seconds)
        lens = [len(t) for t, _ in looked]
        if any(lens):
            per_row = [
                src[lookup_source(n)].expected(len(t))
                for src, (t, n) in zip(srcs, looked, strict=True)
            ]
            for k in range(1, max(lens) + 1):
                emitted = sum(e[min(k, len(e) - 1)][0] for e in per_row)
                seconds = self.cost(LOOKUP, k)
                if emitted / seconds > max(floor, best.rate):
                    best = Choice(LOOKUP, k, emitted / seconds, seconds)
        return best

    def seconds_lost(self, chosen: Choice, with_layer_skip: Choice) -> float:
        """What a round run as ``chosen`` (no skip set yet) loses against the round the estimates
        would choose with one, ``with_layer_skip``: the seconds its expected tokens take at its
        rate minus at the better one (0 where layer skip would not be chosen)."""
        if with_layer_skip.rate <= chosen.rate or chosen.seconds <= 0:
            return 0.0
        return chosen.seconds * (1.0 - chosen.rate / with_layer_skip.rate)

    def branch_width(
        self, k: int, positions: int, steps: int, width_max: int, sources: dict | None = None
    ) -> int:
        """Siblings per layer-skip position (branches.py) for a greedy round of one sequence that
        drafted k tokens, its last ``positions`` by layer skip in ``steps`` draft steps: the width
        <= ``width_max`` with the most expected tokens per second (0: verify the chain alone).
        Siblings cost verify tokens only (the draft is spent); they pay one token when the chain
        is rejected at a layer-skip position and the target's token is among its siblings.
        ``sources``: the sequence's estimates (None: the pooled ones)."""
        if positions <= 0 or width_max <= 0:
            return 0
        src = sources or self.sources
        acc, miss = src[LAYER_SKIP].accept, src[BRANCH].accept
        emitted, reach, rejected = 1.0 + (k - positions), 1.0, 0.0  # the prefix taken as accepted
        for i in range(positions):
            rejected += reach * (1.0 - acc.at(i))
            reach *= acc.at(i)
            emitted += reach

        def scale(w: int) -> float:  # a tree round's measured ratio (TimeScale), a chain's
            return self.time_scale(BRANCH if w else LAYER_SKIP) if self.scale_times else 1.0

        def rate(w: int, hit: float) -> float:  # cost()'s round time, verifying the siblings too
            seconds = self.table_s(LAYER_SKIP, k + positions * w, steps) * scale(w)
            return (emitted + rejected * hit) / (seconds + self.dp_s_per_round)

        best, best_rate, none = 0, rate(0, 0.0), 1.0
        for w in range(1, width_max + 1):
            none *= miss.at(w - 1)
            r = rate(w, 1.0 - none)
            if r > best_rate:
                best, best_rate = w, r
        # the chain alone this round, so its time ratio stays measured (TimeScale): right after
        # the first tree round, then every CHAIN_PROBE-th layer-skip round
        untimed = self.time_scale.n[LAYER_SKIP] == 0
        if best and self.scale_times and self.tree_rounds >= (1 if untimed else CHAIN_PROBE - 1):
            return 0
        return best

    def may_choose(self, kind: str, k_max: int) -> bool:
        """Whether a draft of this kind beats a plain step at the current estimates. Called at the
        start (the priors) it says whether the kind can ever be chosen: its estimates move only
        when it is chosen and otherwise drift back to the prior. If not, the loop need not prepare
        it (no skip-set DP for a draft that never runs)."""
        if kind == LAYER_SKIP:
            return self.choose(k_max).kind == LAYER_SKIP
        return self.choose(0, k_max, layer_skip=False, lookup_kind=kind).kind == kind

    def observe(self, kind: str, drafted: int, accepted: int, k_max: int = 0) -> None:
        """The round's outcome: ``drafted`` tokens proposed by a draft allowed ``k_max``."""
        self.observe_rows([(kind, drafted, accepted, k_max)])

    def observe_rows(self, outcomes: list[tuple[str, int, int, int]]) -> None:
        """One round's outcomes, one (kind, drafted, accepted, k_max) per sequence (a batch):
        each observed source learns from each; the sources no row drew from relax once."""
        observe_sources(self.sources, outcomes)

    def row_sources(self) -> dict[str, Source]:
        """A copy of the pooled estimates for one sequence of a batch, which then learns from
        that sequence's rounds only (``observe_sources``): pooled over the rows, the estimates
        weigh a row whose drafts run long over one whose drafts fail at once."""
        return copy.deepcopy(self.sources)


def observe_sources(sources: dict[str, Source], outcomes: list[tuple[str, int, int, int]]):
    """``outcomes`` (kind, drafted, accepted, k_max) into ``sources``; the sources not drawn from
    relax once."""
    seen = set()
    for kind, drafted, accepted, k_max in outcomes:
        if kind in sources and drafted > 0:
            sources[kind].observe(drafted, accepted, k_max)
            seen.add(kind)
    for source, est in sources.items():
        if source not in seen:
            est.relax()


def batch_draft_steps(expected: list[list[tuple[float, float]]], caps: list[int], k: int) -> float:
    """Expected draft steps of a batch's layer-skip draft of at most k tokens: position i is
    drafted while any row goes on (rows independent), row b at position i with the probability
    its (E emitted, E drafted) table ``expected[b]`` implies, and never past its ``caps[b]``."""
    steps = 0.0
    for i in range(k):
        none = 1.0
        for e, cap in zip(expected, caps, strict=True):
            if i < cap:
                none *= 1.0 - (e[i + 1][1] - e[i][1])
        steps += 1.0 - none
    return steps
