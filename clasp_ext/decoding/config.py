"""ClaspConfig: the knobs of SPEC section 3 plus generation limits, validated with clear errors."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from clasp_ext.decoding.layer_search import STRATEGIES
from clasp_ext.decoding.low_bit import DRAFT_WEIGHTS

# Defaults chosen by the sweeps in bench/sweep_qwen.sh (Qwen2.5-Coder-1.5B-Instruct bf16, CPU, one
# Spec-Bench prompt per category group; bench/results/sweep{1,2,3}-*): every knob was compared in
# one process against model.generate. The exit threshold mattered most: 0.3 -> 0.6 lifted the
# geometric-mean speedup from 0.58-0.70x to 0.97x (it stops drafts the model is unsure of, and
# on general text most are); with it, skipping 10 of 28 layers (ratio 0.35) beat 5, 7, 12 and 14,
# and 0.75 beat 0.6 and 0.9 at that M (1.08x vs 1.04x / 1.00x). max_draft 5 or 12 and
# update_interval 1, 16 or 32 were no better than 8 and 8. The draft head over 32,768 ids (4.5 ms
# instead of 24 ms per draft token) was faster than the full 151,936-entry head on 5 of 6 prompts
# in stage 3 and 4 of 6 in stage 1, at the same acceptance within noise.
DEFAULT_SKIP_RATIO = 0.35
DEFAULT_DRAFT_EXIT_THRESHOLD = 0.75
DEFAULT_MAX_NEW_TOKENS = 128
# Draft head over the first 32,768 token ids plus the context's (see draft_head.py).
DEFAULT_DRAFT_VOCAB_SIZE = 32768
# Context-lookup drafts before the layer-skip draft (lookup.py): on the 12-prompt Spec-Bench sample
# (bench/results/e2e-qwen2.5-coder-1.5b-bf16-lookup) 1.32x over model.generate against 1.10x
# without, ahead or level on 10 of 12 prompts (2.45x on summarization).
DEFAULT_LOOKUP_NGRAM = 3
# A looked-up continuation costs no draft steps, so it may be longer than a layer-skip draft: 16,
# where transformers' prompt lookup proposes 10 (its documented value); with policy="cost" the
# length actually verified is chosen from the cost table and the acceptance seen so far.
DEFAULT_MAX_LOOKUP = 16
POLICIES = ("fixed", "cost")
# the skip set a batch shares (batch.py): "vote" skips the M layers most live rows' DPs skip;
# "agreed" skips only the layers every live row's DP skips (each layer some row keeps runs)
BATCH_SKIP_RULES = ("vote", "agreed")
SKIP_UNITS = ("layer", "mlp")  # what a draft skips in a layer of its skip set
FIRST_DP = ("prefill", "first_round", "auto")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class ClaspConfig:
    """Settings of one CLaSp generation.

    ``None`` means "take it from ``model.generation_config`` where it has one, else the default":
    temperature/top_k/top_p come from the generation config only when it sets ``do_sample=True``
    (otherwise decoding is greedy); ``eos_token_id`` and ``max_new_tokens`` come from it when set.
    Pass ``eos_token_id=[]`` to disable EOS.
    """

    num_skip_layers: int | None = None  # M; exclusive with skip_ratio
    skip_ratio: float | None = None  # M = round(skip_ratio * L); default 0.35 when neither is set
    max_draft: int = 8
    draft_exit_threshold: float = DEFAULT_DRAFT_EXIT_THRESHOLD
    update_interval: int = 8
    # where the first skip-set search targets: "prefill" = the prompt's last token (before any
    # output); "first_round" = the first output token, after one round drafted without layer skip
    # (lookup or a plain step), as KnapSpec's CLaSp baseline does; "auto" (policy="cost"; with
    # "fixed" it is "prefill"): once the rounds run without a skip set have lost the DP's
    # measured cost (the ski-rental rule, BatchDecoder._defer_search), so short answers and
    # answers that lookup drafts carry need not pay for it
    first_dp: str = "prefill"
    draft_vocab_size: int | None = None  # draft lm_head over the first N ids + context; 0 = all
    lookup_ngram: int = DEFAULT_LOOKUP_NGRAM  # draft by context lookup first (lookup.py); 0 = off
    max_lookup: int = DEFAULT_MAX_LOOKUP  # most tokens a lookup draft proposes
    temperature: float | None = None  # 0 = greedy
    top_k: int | None = None  # 0 = off
    top_p: float | None = None  # 1.0 = off
    max_new_tokens: int | None = None
    eos_token_id: int | list[int] | None = None
    seed: int | None = None
    # "static": one DP, at prefill. On the 12 dev prompts (bf16, AVX-512 EPYC, int8 drafts) it beat
    # re-running the DP every update_interval rounds ("dp"), 1.79x against 1.60x, ahead in 4 of 6
    # groups, with the DP at 2.2% of the time instead of 5.2%; KnapSpec's side-by-side found the
    # same at 64 tokens. first_dp="first_round" was not better (1.52x).
    skip_strategy: str | Sequence[int] = "static"
    max_cache_len: int | None = None  # total cache slots; None = sized for the request
    # "cost": each round picks a plain step, a lookup or a layer-skip draft and its length by
    # expected tokens per second from a measured cost table (policy.py, cost_model.py).
    # "fixed": every round drafts (lookup if it matches, else layer skip) up to max_draft.
    # "cost" is the default: level with "fixed" where verifying 16 tokens costs ~1.5 steps (bf16
    # on the AVX-512 EPYC, 12 dev prompts: 1.67x vs 1.69x with int8 drafts, 1.45x vs 1.34x
    # without) and ahead where verify costs more (fp32 there; bench/results/README.md).
    policy: str = "cost"
    # "int8" / "int4": draft steps run on low-bit copies of the kept layers' linear weights and of
    # the draft head (low_bit.py); verify keeps the model's weights, so the output is unchanged.
    # "auto" (low_bit.auto_kind): int4 where the first layers' linears at one token measured
    # >= 1.2x faster with it than with int8 (bf16 on the AMX Xeon: 1.5x), else int8 where that
    # measured >= 1.25x faster than the model's weights (bf16 on the AVX2 EPYC), else the weights
    # (fp32 on the AMX Xeon: both kernels slower than fp32).
    draft_weights: str = "auto"
    # batches only: how the rows' skip sets become the one the batch drafts with (BATCH_SKIP_RULES)
    batch_skip_rule: str = "vote"
    # policy="cost": scale the measured cost table by the rounds' own measured times, per round
    # kind (policy.TimeScale: the table is timed at one context length, without the loop's host
    # work); off = the table as measured
    online_costs: bool = True
    # CUDA only: the batched loop's draft steps and verify replay captured CUDA graphs
    # (cuda_graphs.py: one per decoder layer for drafts, one per padded verify length) instead of
    # launching every kernel from Python; batch 1 runs through the batched loop too
    cuda_graphs: bool = False
    # policy="cost", greedy, one sequence: verify up to this many of the draft's next-best tokens
    # beside each layer-skip draft token (branches.py; the policy picks 0..this per round by the
    # cost table: where verify is flat they ride along nearly free); 0 = chains only. bf16 on the
    # AMX Xeon, 12 dev prompts (bench/results/e2e-qwen2.5-coder-1.5b-bf16-amx/): 0 / 1 / 2 =
    # 1.79x / 1.86x / 1.84x of model.generate in one run, 0 / 2 = 1.84x / 1.94x in another
    draft_branches: int = 2
    # What a draft skips in each layer of its skip set (SKIP_UNITS): "layer", the whole layer
    # (SPEC section 1); "mlp", only its MLP block, its attention still runs (KnapSpec's sublayer
    # view: an MLP holds ~88% of a Qwen2.5-1.5B layer's weight bytes, its attention the context).
    # The DP still chooses the layers as whole-layer skips. Measured slower than "layer" so far
    # (Xeon without AMX, bf16, 12 dev prompts: 1.42x with 10 whole layers, 1.29x / 1.22x with 16 /
    # 20 MLPs; 6 prompts: 1.51x against 1.45x with 10 MLPs; bench/results/README.md): a sublayer
    # DP may change that. Eager rounds only (no cuda_graphs).
    skip_unit: str = "layer"

    @classmethod
    def of(cls, config: ClaspConfig | None, **overrides) -> ClaspConfig:
        """What the decoders take: ``config`` (None = the defaults) with keyword overrides."""
        if config is None:
            config = cls()
        elif not isinstance(config, cls):
            raise TypeError(f"clasp_ext: config must be a ClaspConfig, got {type(config).__name__}")
        return config.replace(**overrides) if overrides else config

    def replace(self, **overrides) -> ClaspConfig:
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(
                f"clasp_ext: unknown ClaspConfig field(s) {unknown}; valid: {sorted(names)}"
            )
        return dataclasses.replace(self, **overrides)

    # ------------------------------------------------------------------ resolution
    def resolved(self, num_layers: int, generation_config=None) -> ClaspConfig:
        """A copy with every ``None`` filled in and all values validated (raises ValueError)."""
        gc = generation_config
        c = dataclasses.replace(self)
        do_sample = bool(getattr(gc, "do_sample", False)) if gc is not None else False
        if c.temperature is None:
            t = getattr(gc, "temperature", None) if do_sample else None
            c.temperature = float(t) if t is not None else (1.0 if do_sample else 0.0)
        if c.top_k is None:
            k = getattr(gc, "top_k", None) if do_sample else None
            c.top_k = int(k) if k is not None else 0
        if c.top_p is None:
            p = getattr(gc, "top_p", None) if do_sample else None
            c.top_p = float(p) if p is not None else 1.0
        if c.max_new_tokens is None:
            m = getattr(gc, "max_new_tokens", None) if gc is not None else None
            c.max_new_tokens = int(m) if m is not None else DEFAULT_MAX_NEW_TOKENS
        if c.draft_vocab_size is None:
            c.draft_vocab_size = DEFAULT_DRAFT_VOCAB_SIZE
        if c.eos_token_id is None:
            e = getattr(gc, "eos_token_id", None) if gc is not None else None
            c.eos_token_id = [] if e is None else e
        if _is_int(c.eos_token_id):
            c.eos_token_id = [c.eos_token_id]
        c.eos_token_id = list(c.eos_token_id)

        # skip set size
        strategy = c.skip_strategy
        if isinstance(strategy, str):
            if strategy not in STRATEGIES:
                raise ValueError(
                    f"clasp_ext: skip_strategy must be one of {STRATEGIES} or a list of layer "
                    f"indices, got {strategy!r}"
                )
        else:
            try:
                layers = list(strategy)
            except TypeError:
                raise ValueError(
                    f"clasp_ext: skip_strategy must be one of {STRATEGIES} or a list of layer "
                    f"indices, got {strategy!r}"
                ) from None
            if not all(_is_int(i) for i in layers):
                raise ValueError(f"clasp_ext: skip_strategy layer indices must be ints: {layers}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"clasp_ext: skip_strategy has repeated layers: {layers}")
            bad = [i for i in layers if not 0 <= i < num_layers]
            if bad:
                raise ValueError(
                    f"clasp_ext: skip_strategy layers {bad} out of range [0, {num_layers})"
                )
            if c.num_skip_layers is not None and c.num_skip_layers != len(layers):
                raise ValueError(
                    f"clasp_ext: num_skip_layers={c.num_skip_layers} contradicts the explicit "
                    f"skip list of {len(layers)} layers"
                )
            c.skip_strategy = sorted(layers)
            c.num_skip_layers = len(layers)
        if c.num_skip_layers is not None and c.skip_ratio is not None:
            raise ValueError("clasp_ext: set num_skip_layers or skip_ratio, not both")
        if c.num_skip_layers is None:
            ratio = DEFAULT_SKIP_RATIO if c.skip_ratio is None else c.skip_ratio
            if not _is_real(ratio) or not 0.0 <= ratio < 1.0:
                raise ValueError(f"clasp_ext: skip_ratio must be in [0, 1), got {ratio!r}")
            c.num_skip_layers = min(int(round(ratio * num_layers)), num_layers - 1)
        if not _is_int(c.num_skip_layers) or not 0 <= c.num_skip_layers < num_layers:
            raise ValueError(
                f"clasp_ext: num_skip_layers must be an int in [0, {num_layers}) for a model with "
                f"{num_layers} layers, got {c.num_skip_layers!r}"
            )
        c.validate()
        return c

    def validate(self) -> None:
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"clasp_ext: {msg}")

        need(
            _is_int(self.max_draft) and self.max_draft >= 0,
            f"max_draft must be an int >= 0, got {self.max_draft!r}",
        )
        need(
            _is_real(self.draft_exit_threshold) and 0.0 <= self.draft_exit_threshold <= 1.0,
            f"draft_exit_threshold must be in [0, 1], got {self.draft_exit_threshold!r}",
        )
        need(
            self.draft_vocab_size is None
            or (_is_int(self.draft_vocab_size) and self.draft_vocab_size >= 0),
            f"draft_vocab_size must be an int >= 0 (0 = the full vocabulary), got "
            f"{self.draft_vocab_size!r}",
        )
        need(
            _is_int(self.lookup_ngram) and (self.lookup_ngram == 0 or self.lookup_ngram >= 2),
            f"lookup_ngram must be 0 (off) or an int >= 2, got {self.lookup_ngram!r}",
        )
        need(
            _is_int(self.max_lookup) and self.max_lookup >= 0,
            f"max_lookup must be an int >= 0, got {self.max_lookup!r}",
        )
        need(
            _is_int(self.update_interval) and self.update_interval >= 1,
            f"update_interval must be an int >= 1, got {self.update_interval!r}",
        )
        need(
            _is_real(self.temperature)
            and math.isfinite(self.temperature)
            and self.temperature >= 0,
            f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}",
        )
        need(
            _is_int(self.top_k) and self.top_k >= 0,
            f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}",
        )
        need(
            _is_real(self.top_p) and 0.0 < self.top_p <= 1.0,
            f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}",
        )
        need(
            _is_int(self.max_new_tokens) and self.max_new_tokens >= 0,
            f"max_new_tokens must be an int >= 0, got {self.max_new_tokens!r}",
        )
        need(
            all(_is_int(e) and e >= 0 for e in self.eos_token_id),
            f"eos_token_id must be an int >= 0 or a list of them, got {self.eos_token_id!r}",
        )
        need(
            self.policy in POLICIES,
            f"policy must be one of {POLICIES}, got {self.policy!r}",
        )
        need(
            self.first_dp in FIRST_DP,
            f"first_dp must be one of {FIRST_DP}, got {self.first_dp!r}",
        )
        need(
            self.draft_weights in DRAFT_WEIGHTS,
            f"draft_weights must be one of {DRAFT_WEIGHTS}, got {self.draft_weights!r}",
        )
        need(
            _is_int(self.draft_branches) and self.draft_branches >= 0,
            f"draft_branches must be an int >= 0, got {self.draft_branches!r}",
        )
        need(
            isinstance(self.online_costs, bool),
            f"online_costs must be True or False, got {self.online_costs!r}",
        )
        need(
            isinstance(self.cuda_graphs, bool),
            f"cuda_graphs must be True or False, got {self.cuda_graphs!r}",
        )
        need(
            self.skip_unit in SKIP_UNITS,
            f"skip_unit must be one of {SKIP_UNITS}, got {self.skip_unit!r}",
        )
        need(
            not (self.cuda_graphs and self.skip_unit == "mlp"),
            "skip_unit='mlp' runs eager rounds only (the CUDA graphs capture whole layers); "
            "use skip_unit='layer' with cuda_graphs=True",
        )
        need(
            self.batch_skip_rule in BATCH_SKIP_RULES,
            f"batch_skip_rule must be one of {BATCH_SKIP_RULES}, got {self.batch_skip_rule!r}",
        )
        need(self.seed is None or _is_int(self.seed), f"seed must be an int, got {self.seed!r}")
        need(
            self.max_cache_len is None or (_is_int(self.max_cache_len) and self.max_cache_len > 0),
            f"max_cache_len must be a positive int, got {self.max_cache_len!r}",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def cache_headroom(self) -> int:
        """Cache slots past a sequence's last token that a round may write: the longest draft
        plus its first token, or the DP's candidates, plus one."""
        return max(self.max_round_draft, self.num_skip_layers) + 2

    @property
    def max_round_draft(self) -> int:
        """The most draft tokens one round can propose, by either source."""
        return max(self.max_draft, self.max_lookup if self.lookup_ngram else 0)
