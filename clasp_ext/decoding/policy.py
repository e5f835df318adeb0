"""The per-round choice of ``ClaspConfig(policy="cost")``: a plain step, a context-lookup draft of
length k, or a layer-skip draft of at most k tokens, whichever promises the most tokens per second.

A draft of k tokens whose position i is accepted with probability a_i (given positions < i were)
emits 1 + sum_{j<=k} prod_{i<=j} a_i tokens in expectation and costs k draft steps (none for a
lookup draft) + one verify forward of k + 1 tokens; a plain step emits 1 token for verify(1). The
costs come from the measured table (cost_model.py); the a_i are running estimates per draft source
and position, exponentially weighted from a prior. On hardware where verify(T) grows like T (a
CPU without bf16 matrix units) no draft can pay and every round is a plain step; where it is flat
(a GPU at batch 1) long drafts win as soon as acceptance is high. The choice only decides what is
proposed: the verify pass decides what is emitted, so output is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

PLAIN, LOOKUP, LAYER_SKIP = "plain", "lookup", "layer_skip"

# Priors, (first position, later positions): optimistic enough that a source is tried where it
# can pay, so the estimates can learn. With the exit threshold a layer-skip draft stops where it
# is unsure, and the tokens it does propose are mostly accepted. A lookup match's first token is
# often wrong (a 2-3 token n-gram recurs by chance in chat and maths: 7 of 62 accepted on two
# Spec-Bench prompts), but once it is right the copy tends to go on. With 0.35 a lookup draft is
# tried where verifying 9 tokens costs up to ~2.3 steps, not where it costs more.
PRIORS = {LOOKUP: (0.35, 0.8), LAYER_SKIP: (0.8, 0.8)}
RATE = 0.15  # weight of each new observation once warmed up (about the last 7 rounds matter)
# The first observations of a position weigh 1 / (n + PRIOR_WEIGHT) (the prior counts as this
# many observations): a draft that fails on its first tries is dropped after two or three rounds,
# not seven (each failed round costs a verify of k + 1 tokens for one token).
PRIOR_WEIGHT = 2
# Per round a source is not used, its estimates drift back this much toward the prior: a source
# written off early is retried now and then (text changes), at a bounded cost.
RELAX = 0.01
# A draft must promise this much more than a plain step: rounds with a draft carry host-side work
# the forward timings do not show (lookup, tensors, acceptance bookkeeping).
MIN_GAIN = 1.02


class Acceptance:
    """Running P(draft position i accepted | positions < i accepted), i = 0..max_len-1."""

    def __init__(self, max_len: int, prior: tuple, rate: float = RATE, relax: float = RELAX):
        self.prior = ([prior[0]] + [prior[1]] * (max_len - 1))[:max_len]
        self.rate, self.relax_rate = rate, relax
        self.p = list(self.prior)
        self.n = [0] * max_len  # observations per position

    def observe(self, drafted: int, accepted: int) -> None:
        """Positions < accepted were accepted; position ``accepted`` (if drafted) was rejected;
        later positions were not tested and keep their estimate."""
        for i in range(min(drafted, accepted + 1, len(self.p))):
            self.n[i] += 1
            rate = max(self.rate, 1.0 / (self.n[i] + PRIOR_WEIGHT))
            self.p[i] += rate * ((1.0 if i < accepted else 0.0) - self.p[i])

    def relax(self) -> None:
        self.p = [p + self.relax_rate * (q - p) for p, q in zip(self.p, self.prior, strict=True)]

    def expected_tokens(self, k_max: int, ones: bool = False) -> list[float]:
        """[E(tokens) for k = 0..k_max]: 1 + sum_{j<=k} prod_{i<=j} a_i (a_i = 1 with ``ones``)."""
        out, run = [1.0], 1.0
        for i in range(min(k_max, len(self.p))):
            run *= 1.0 if ones else self.p[i]
            out.append(out[-1] + run)
        return out


@dataclass
class Choice:
    kind: str  # PLAIN, LOOKUP or LAYER_SKIP
    k: int  # draft length (lookup) or most draft tokens (layer skip); 0 for a plain step
    rate: float  # expected tokens per second


class CostPolicy:
    """Chooses each round's draft from a ``CostTable`` and the acceptance seen so far.

    ``dp_s_per_round``: the skip-set DP's cost spread over the layer-skip rounds it serves
    (dp_s / update_interval), charged to each layer-skip option."""

    def __init__(self, table, max_draft: int, dp_s_per_round: float = 0.0):
        self.table = table
        self.dp_s_per_round = dp_s_per_round
        self.acceptance = {kind: Acceptance(max_draft, prior) for kind, prior in PRIORS.items()}

    def _cost(self, kind: str, k: int) -> float:
        if kind == PLAIN:
            return self.table.verify(1)
        draft = k * self.table.draft_step_s + self.dp_s_per_round if kind == LAYER_SKIP else 0.0
        return draft + self.table.verify(k + 1)

    def _best(self, kind: str, k_max: int, ones: bool = False) -> Choice:
        e = self.acceptance[kind].expected_tokens(k_max, ones)
        rates = [(e[k] / self._cost(kind, k), k) for k in range(1, len(e))]
        rate, k = max(rates, default=(0.0, 0))
        return Choice(kind, k, rate)

    def choose(self, k_max: int, lookup_len: int, layer_skip: bool = True) -> Choice:
        """The best of: a plain step; a lookup draft of 1..min(lookup_len, k_max) of the looked-up
        tokens; a layer-skip draft of at most 1..k_max tokens (when ``layer_skip``)."""
        best = Choice(PLAIN, 0, 1.0 / self._cost(PLAIN, 0))
        floor = best.rate * MIN_GAIN
        options = []
        if lookup_len > 0:
            options.append(self._best(LOOKUP, min(lookup_len, k_max)))
        if layer_skip:
            options.append(self._best(LAYER_SKIP, k_max))
        for c in options:
            if c.k > 0 and c.rate > max(floor, best.rate):
                best = c
        return best

    def may_choose(self, kind: str, k_max: int) -> bool:
        """Whether a draft of this kind beats a plain step at the current estimates. Called at the
        start (the priors) it says whether the kind can ever be chosen: its estimates move only
        when it is chosen and otherwise drift back to the prior. If not, the loop need not prepare
        it (no skip-set DP for a draft that never runs)."""
        return self._best(kind, k_max).rate > self.choose(0, 0).rate * MIN_GAIN

    def observe(self, kind: str, drafted: int, accepted: int) -> None:
        for source, est in self.acceptance.items():
            if source == kind and drafted > 0:
                est.observe(drafted, accepted)
            else:
                est.relax()
