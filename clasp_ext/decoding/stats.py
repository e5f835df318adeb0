"""Round statistics: per sequence (``ClaspStats``, what ``generate`` returns as ``.stats``) and per
batched decoder (``BatchStats``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class ClaspStats:
    rounds: int = 0
    drafted: int = 0
    # layer-skip draft forwards of its rounds (a lookup draft runs none; a batch's draft step
    # counts for every row in it)
    draft_steps: int = 0
    accepted: int = 0
    new_tokens: int = 0
    round_tokens: int = 0  # tokens emitted by verify rounds (excludes the prefill token)
    dp_runs: int = 0  # skip-set searches ("dp", "static", "importance"), at join and re-runs
    first_dp_token: int = -1  # new tokens emitted before its first search (0: at prefill; -1: none)
    lookup_rounds: int = 0  # rounds whose draft came from context lookup (no draft forward)
    short_lookup_rounds: int = 0  # of those, drafts from a single-token match ("cost" only)
    layer_skip_rounds: int = 0  # rounds with a layer-skip draft
    plain_rounds: int = 0  # rounds with no draft: one ordinary decoding step
    branch_rounds: int = 0  # rounds that verified siblings of a layer-skip draft (branches.py)
    branch_hits: int = 0  # of those, rounds where a sibling matched: one more token
    # draft length chosen per round -> number of rounds (layer skip: the most tokens allowed; the
    # exit threshold may stop it earlier, see drafted)
    lookup_lengths: dict = field(default_factory=dict)
    layer_skip_lengths: dict = field(default_factory=dict)
    skip_layers: list = field(default_factory=list)  # the skip set its drafts ran with, last
    importance: list = field(default_factory=list)  # per layer, at the last search's target
    host_syncs: int = 0  # all device->host reads (prefill included)
    round_host_syncs: int = 0  # those made inside verify rounds (draft + verify + DP)
    max_round_host_syncs: int = 0
    # seconds while this sequence was decoded (a batch's rounds count for each of its rows)
    time_prefill: float = 0.0
    time_draft: float = 0.0
    time_verify: float = 0.0
    time_dp: float = 0.0
    time_total: float = 0.0

    @property
    def time_other(self) -> float:
        return max(
            0.0,
            self.time_total - self.time_prefill - self.time_draft - self.time_verify - self.time_dp,
        )

    @property
    def tau(self) -> float:
        """Mean tokens emitted per verify round (the paper's mean accepted length)."""
        return self.round_tokens / self.rounds if self.rounds else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def host_syncs_per_round(self) -> float:
        return self.round_host_syncs / self.rounds if self.rounds else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(
            tau=self.tau,
            acceptance_rate=self.acceptance_rate,
            host_syncs_per_round=self.host_syncs_per_round,
            time_other=self.time_other,
        )
        return d


@dataclass
class BatchStats:
    rounds: int = 0
    row_rounds: int = 0  # sum over rounds of the live rows
    new_tokens: int = 0
    prefills: int = 0
    dp_runs: int = 0
    plain_rounds: int = 0
    lookup_rounds: int = 0  # rounds where the rows proposed context matches only
    layer_skip_rounds: int = 0
    draft_steps: int = 0  # layer-skip draft forwards ([B, 1] each)
    draft_lengths: dict = field(default_factory=dict)  # k -> rounds
    batch_sizes: dict = field(default_factory=dict)  # B -> rounds
    time_prefill: float = 0.0
    time_draft: float = 0.0
    time_verify: float = 0.0
    time_dp: float = 0.0
    time_total: float = 0.0
    graphs_captured: int = 0  # CUDA graphs captured so far (cuda_graphs=True)

    @property
    def mean_batch(self) -> float:
        return self.row_rounds / self.rounds if self.rounds else 0.0


def count(hist: dict, k: int) -> None:
    hist[k] = hist.get(k, 0) + 1
