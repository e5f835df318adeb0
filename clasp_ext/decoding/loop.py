"""The CLaSp decoding loop (SPEC section 1): draft with the skip set, one verify forward per round,
greedy or speculative-sampling acceptance on the ops, the skip-set DP every ``update_interval``
rounds. Batch size 1.

Lossless by construction: every committed token is chosen by ``clasp.verify_greedy`` /
``clasp.verify_sample`` from the logits of the full-model verify forward, which runs every layer
over [t0, drafts] against the K/V the full model wrote for all earlier positions (the draft's K/V at
the draft positions are overwritten by the verify pass before anything reads them). The draft only
decides what is proposed. ``ModelAdapter.self_check`` refuses a model whose layer-by-layer forward
does not reproduce the model's own logits.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from clasp_ext.decoding.adapter import ModelAdapter
from clasp_ext.decoding.config import ClaspConfig
from clasp_ext.decoding.cost_model import CostTable, get_cost_table
from clasp_ext.decoding.draft_head import DraftHead
from clasp_ext.decoding.inputs import check_token_ids
from clasp_ext.decoding.kv_cache import ClaspKVCache
from clasp_ext.decoding.layer_search import (
    SEARCHED,
    explicit_skip_mask,
    random_skip_mask,
    searched_skip_mask,
)
from clasp_ext.decoding.lookup import LookupIndex
from clasp_ext.decoding.low_bit import int8_draft_for
from clasp_ext.decoding.phases import (
    accept,
    apply_processor,
    cut_at_stop,
    draft_step,
    first_token,
)
from clasp_ext.decoding.policy import (
    LAYER_SKIP,
    LOOKUP,
    LOOKUPS,
    PLAIN,
    SHORT_LOOKUP,
    CostPolicy,
    lookup_source,
)


@dataclass
class ClaspStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    new_tokens: int = 0
    round_tokens: int = 0  # tokens emitted by verify rounds (excludes the prefill token)
    dp_runs: int = 0
    lookup_rounds: int = 0  # rounds whose draft came from context lookup (no draft forward)
    short_lookup_rounds: int = 0  # of those, drafts from a single-token match ("cost" only)
    layer_skip_rounds: int = 0  # rounds with a layer-skip draft
    plain_rounds: int = 0  # rounds with no draft: one ordinary decoding step
    # draft length chosen per round -> number of rounds (layer skip: the most tokens allowed; the
    # exit threshold may stop it earlier, see drafted)
    lookup_lengths: dict = field(default_factory=dict)
    layer_skip_lengths: dict = field(default_factory=dict)
    skip_layers: list = field(default_factory=list)
    importance: list = field(default_factory=list)  # per layer, at the last DP target
    host_syncs: int = 0  # all device->host reads (prefill included)
    round_host_syncs: int = 0  # those made inside verify rounds (draft + verify + DP)
    max_round_host_syncs: int = 0
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
class ClaspOutput:
    sequences: Tensor  # [1, prompt + new] like model.generate
    stats: ClaspStats


def _count(hist: dict, k: int) -> None:
    hist[k] = hist.get(k, 0) + 1


class ClaspDecoder:
    """Stateful CLaSp decoder for one sequence: ``prefill(ids)`` then ``step()`` until
    ``finished``; ``reset()`` makes it reusable (also after an error).

    ``logits_processor``: an optional ``(input_ids [1, n], scores [1, V] float32) -> scores``,
    transformers' ``LogitsProcessor`` protocol, applied to the full model's next-token logits at
    every position it scores (prefill, each verify row, with that position's prefix) and alike to
    each layer-skip draft token's, before temperature/top-k/top-p. It must be a pure function of
    its inputs: positions are scored out of order and rejected drafts are scored too. Output stays
    exactly that of sampling (or argmax) from the processed full model. ``keep_logits``: collect
    the full model's raw float32 logits [V] behind each emitted token in ``token_logits`` (for
    ``output_scores``); both are off by default and cost nothing then.

    With ``policy="cost"``, ``cost_table`` is the measured cost table the per-round policy uses
    (``cost_model.get_cost_table``: measured on first use per setup, then cached in memory and on
    disk); pass one to override it. It is exposed as ``self.cost_table`` (None with "fixed").
    """

    def __init__(
        self,
        model,
        config: ClaspConfig | None = None,
        *,
        callback=None,
        streamer=None,
        logits_processor=None,
        keep_logits: bool = False,
        cost_table: CostTable | None = None,
        **overrides,
    ):
        config = ClaspConfig.of(config, **overrides)
        self.model = model
        self.adapter = ModelAdapter(model)
        self.config = config.resolved(
            self.adapter.num_layers, getattr(model, "generation_config", None)
        )
        if self.config.cuda_graphs:
            raise ValueError(
                "clasp_ext: cuda_graphs=True runs in the batched loop: use BatchDecoder, or "
                "clasp_ext.generate(model, input_ids, cuda_graphs=True) (any batch size, 1 too)"
            )
        self.callback = callback
        self.streamer = streamer
        self.logits_processor = logits_processor
        self.keep_logits = keep_logits
        self.device = self.adapter.device
        c = self.config
        self.int8_draft = int8_draft_for(self.adapter, c.draft_weights, c.num_skip_layers)
        int8_head = self.int8_draft is not None
        self.draft_head = DraftHead(self.adapter, c.draft_vocab_size, int8=int8_head)
        self.cost_table = cost_table
        if c.policy == "cost" and cost_table is None:
            self.calibrate()
        self.cache: ClaspKVCache | None = None
        self.generator = torch.Generator(device=self.device)
        self.generator.seed()  # no seed: one nondeterministic stream across prefills
        self.reset()

    def calibrate(self, refresh: bool = False) -> CostTable:
        """This setup's cost table (cost_model.get_cost_table: from memory, else disk, else
        measured; ``refresh`` measures again), kept as ``self.cost_table``."""
        c = self.config
        self.cost_table = get_cost_table(
            self.adapter,
            self.draft_head,
            c.num_skip_layers,
            c.max_round_draft + 1,
            int8_draft=self.int8_draft,
            refresh=refresh,
        )
        return self.cost_table

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        c = self.config
        self.tokens: list[int] = []
        self.lookup = LookupIndex(c.lookup_ngram)
        self.token_logits: list[Tensor] = []  # with keep_logits: one [V] row per emitted token
        self.prompt_len = 0
        self.finished = True
        self._prefilled = False
        self._t0_dev: Tensor | None = None
        self._eos = set(c.eos_token_id)
        self.stats = ClaspStats()
        self.skip = [False] * self.adapter.num_layers
        self._rounds_since_dp = 0
        self._skip_pending = False  # first_dp="first_round": no skip set until round 1 ends
        self.policy = None  # fresh acceptance estimates per sequence
        self._layer_skip_ok = True  # "cost": False when a layer-skip draft is never chosen
        if c.policy == "cost":
            # "dp" reruns the DP every update_interval layer-skip rounds: charge each its share
            dp = self.cost_table.dp_s / c.update_interval if c.skip_strategy == "dp" else 0.0
            self.policy = CostPolicy(
                self.cost_table, c.draft_exit_threshold > 0, dp, online_costs=c.online_costs
            )
            self._layer_skip_ok = c.num_skip_layers > 0 and self.policy.may_choose(
                LAYER_SKIP, c.max_draft
            )
        self._round_syncs = 0
        if c.seed is not None:  # a fixed seed: every prefill replays the same randomness
            self.generator.manual_seed(c.seed)
        if self.cache is not None:
            self.cache.reset()

    def _sync(self, t: Tensor) -> list:
        """The one way device values reach the host; counted."""
        self.stats.host_syncs += 1
        self._round_syncs += 1
        return t.tolist()

    # ------------------------------------------------------------------ forward passes
    def _full_forward(self, ids: Tensor, start: int, keep_last_only: bool = False):
        """All layers over ``ids`` at ``start``: (logits, hidden states h_0..h_L)."""
        h, hs = self.adapter.forward(
            ids, start, self.cache, keep_hidden="last" if keep_last_only else "all"
        )
        return self.adapter.head(h[:, -1:] if keep_last_only else h), hs

    def _draft_weights(self, active: bool):
        """The low-bit copies in place of the kept layers' weights (draft_weights="int8", or
        "auto" where they measured faster)."""
        if not active or self.int8_draft is None:
            return contextlib.nullcontext()
        return self.int8_draft.active(self.skip)

    @property
    def low_bit_bytes(self) -> int:
        """Memory held by the low-bit draft copies (0 without them)."""
        if self.int8_draft is None:
            return 0
        return self.int8_draft.nbytes + self.draft_head.nbytes

    def _processed(self, ids: Tensor, logits: Tensor) -> Tensor:
        """``logits_processor`` over the last R positions of ``ids`` [1, n]
        (phases.apply_processor)."""
        return apply_processor(self.logits_processor, ids, logits)

    def _draft_token(self, tok: Tensor, pos: int, prefix: Tensor | None):
        """One layer-skip draft step after ``tok`` at ``pos`` (phases.draft_step): (next token
        [1, 1], its proposal q over the full vocabulary or None when greedy, top-1 probability).
        ``prefix``: the sequence before the new token, for the logits processor."""
        proc = None
        if self.logits_processor is not None:
            proc = lambda full: self._processed(prefix, full[:, None])[:, 0]  # noqa: E731
        c = self.config
        return draft_step(
            c,
            self.adapter.forward,
            self.draft_head,
            tok,
            pos,
            self.cache,
            self.skip,
            [self.generator],
            processor=proc,
            want_top1=c.draft_exit_threshold > 0,
        )

    # ------------------------------------------------------------------ skip set
    def _update_skip(self, target_hidden: Tensor, target_pos: int, scratch: int, initial: bool):
        c = self.config
        M = c.num_skip_layers
        L = self.adapter.num_layers
        strategy = c.skip_strategy
        t = time.perf_counter()
        if not isinstance(strategy, str):
            if initial:
                self.skip = explicit_skip_mask(L, strategy)
        elif strategy == "random":
            if initial:
                self.skip = random_skip_mask(L, M, self.config.seed)
        elif strategy in SEARCHED:
            if not initial and strategy == "static":
                return
            mask, imp = searched_skip_mask(
                strategy, self.adapter, self.cache, target_hidden, target_pos, scratch, M
            )
            host = self._sync(torch.cat([mask.float(), imp.float()], 1)[0])
            self.skip = [bool(x) for x in host[:L]]
            self.stats.importance = host[L:]
            self.stats.dp_runs += 1
        self.stats.skip_layers = [i for i in range(L) if self.skip[i]]
        self.stats.time_dp += time.perf_counter() - t
        self._rounds_since_dp = 0
        if self.int8_draft is not None and any(self.skip):  # not inside a (timed) draft round
            self.int8_draft.prepare(self.skip)

    # ------------------------------------------------------------------ input checks
    def _check_ids(self, input_ids) -> Tensor:
        ids = check_token_ids(input_ids, self.device, self.adapter.vocab_size)
        if ids.shape[0] != 1:
            raise ValueError(
                f"clasp_ext: ClaspDecoder takes one sequence, got batch size {ids.shape[0]}; use "
                "clasp_ext.generate(model, input_ids, attention_mask=...) or BatchDecoder"
            )
        return ids

    # ------------------------------------------------------------------ API
    @torch.no_grad()
    def prefill(self, input_ids: Tensor) -> list[int]:
        """Runs the prompt, emits the first token (returned), and chooses the first skip set."""
        self.reset()
        ids = self._check_ids(input_ids)
        c = self.config
        a = self.adapter
        T = ids.shape[1]
        headroom = c.cache_headroom
        self.max_new_tokens = c.max_new_tokens
        if c.max_cache_len is not None:
            if T + headroom + 1 > c.max_cache_len:
                raise ValueError(
                    f"clasp_ext: the prompt of {T} tokens does not fit max_cache_len="
                    f"{c.max_cache_len} (it needs {T + headroom + 1} slots with max_draft="
                    f"{c.max_draft}, max_lookup={c.max_lookup}, num_skip_layers="
                    f"{c.num_skip_layers})"
                )
            capacity = c.max_cache_len
            self.max_new_tokens = min(c.max_new_tokens, capacity - headroom - T)
        else:
            capacity = T + c.max_new_tokens + headroom
        if self.cache is None or self.cache.capacity < capacity:
            self.cache = None  # free the old one first
            self.cache = a.new_cache(capacity)
        self.cache.reset()
        t_start = time.perf_counter()
        self._round_syncs = 0
        self.prompt_len = T
        self.tokens = ids[0].tolist()
        self.lookup.reset(self.tokens)  # reads self.tokens as it grows
        self.draft_head.reset(self.tokens, c.eos_token_id)
        if self.streamer is not None:
            self.streamer.put(ids.cpu())
        self._prefilled = True
        self.finished = False
        if self.max_new_tokens <= 0:
            self._finish()
            return []
        logits, hs = self._full_forward(ids, 0, keep_last_only=True)
        self.cache.rollback(T)
        self._seq_lens = torch.full((1,), T, dtype=torch.int32, device=self.device)
        scores = logits[:, -1]
        if self.logits_processor is not None:
            scores = self._processed(ids, logits)[:, 0]
        first = first_token(c, scores, [self.generator])
        if self.keep_logits:
            self.token_logits.append(logits[0, -1].to(torch.float32, copy=True))
        self._t0_dev = first  # [1, 1]
        tok = self._sync(first)[0][0]
        self.stats.time_prefill += time.perf_counter() - t_start
        if self.config.num_skip_layers > 0 and self._layer_skip_ok:
            if c.first_dp == "first_round" and c.skip_strategy in SEARCHED:
                self._skip_pending = True
            else:
                target = torch.stack([h[:, -1] for h in hs], 1)
                self._update_skip(target, T - 1, T, initial=True)
        self.stats.time_total += time.perf_counter() - t_start
        return self._emit([tok])

    @torch.no_grad()
    def step(self) -> list[int]:
        """One round: draft, verify, maybe the DP. Returns the newly emitted tokens."""
        if not self._prefilled:
            raise RuntimeError("clasp_ext: call prefill(input_ids) before step()")
        if self.finished:
            return []
        c = self.config
        t_round = time.perf_counter()
        self._round_syncs = 0
        n = self.cache.committed
        remaining = self.max_new_tokens - self.stats.new_tokens
        k_max = min(c.max_draft, remaining - 1)
        thr = c.draft_exit_threshold

        # ---- draft
        t = time.perf_counter()
        drafts: list[Tensor] = []
        qs: list[Tensor] = []
        tok = self._t0_dev
        # the sequence so far, for the logits processor (t0 included; drafts are appended to it)
        ctx = None
        if self.logits_processor is not None:
            ctx = torch.tensor([self.tokens], device=self.device)
        lookup_max = min(c.max_lookup, remaining - 1)
        layer_skip = self._layer_skip_ok and not self._skip_pending
        if self.policy is None:  # "fixed": lookup when it matches, else layer skip up to k_max
            looked_up, _ = self.lookup.match(lookup_max, min_ngram=2)  # [] when off
            kind = LOOKUP if looked_up else (LAYER_SKIP if k_max > 0 and layer_skip else PLAIN)
        else:
            looked_up, ngram = self.lookup.match(lookup_max, min_ngram=1)
            source = lookup_source(ngram)
            choice = self.policy.choose(k_max, len(looked_up), layer_skip, source)
            kind = choice.kind
            looked_up = looked_up[: choice.k] if kind in LOOKUPS else []
            k_max = choice.k if kind == LAYER_SKIP else 0
        if kind == PLAIN:
            self.stats.plain_rounds += 1
        elif kind == LAYER_SKIP:
            self.stats.layer_skip_rounds += 1
            _count(self.stats.layer_skip_lengths, k_max)
        else:
            _count(self.stats.lookup_lengths, len(looked_up))
            self.stats.short_lookup_rounds += kind == SHORT_LOOKUP
        if looked_up:  # a free draft: no forward pass (lookup.py)
            d = torch.tensor([looked_up], dtype=torch.long, device=self.device)
            drafts = list(d.split(1, dim=1))
            if not c.greedy:  # the proposal is a point mass
                q_all = torch.nn.functional.one_hot(d, self.adapter.vocab_size).float()
                qs = [q_all[:, i] for i in range(d.shape[1])]
            self.stats.lookup_rounds += 1
        with self._draft_weights(active=not looked_up and k_max > 0):
            for j in range(0 if looked_up else k_max):
                prefix = None if ctx is None else torch.cat([ctx, *drafts], 1)
                nxt, q, top1 = self._draft_token(tok, n + j, prefix)
                if q is not None:
                    qs.append(q)
                drafts.append(nxt)
                tok = nxt
                if thr > 0:  # control flow needs the values: one read per draft token
                    tok_id, prob = self._sync(torch.cat([nxt.double().flatten(), top1.double()]))
                    if prob < thr or int(tok_id) in self._eos:
                        break
        k = len(drafts)
        t2 = time.perf_counter()
        self.stats.time_draft += t2 - t

        # ---- verify
        inp = torch.cat([self._t0_dev, *drafts], dim=1)
        raw, hs = self._full_forward(inp, n)
        draft_tokens = torch.cat(drafts, 1) if k else inp.new_zeros(1, 0)
        logits = raw if ctx is None else self._processed(torch.cat([ctx, draft_tokens], 1), raw)
        num_draft = torch.full((1,), k, dtype=torch.int32, device=self.device)
        q = torch.stack(qs, 1) if qs else None
        accepted, out = accept(
            c, logits, draft_tokens, num_draft, self._seq_lens, q, [self.generator]
        )
        host = self._sync(torch.cat([accepted.long(), out[0]]))
        acc = int(host[0])
        emitted = [int(x) for x in host[1 : acc + 2]]
        self._t0_dev = out[:, acc : acc + 1]
        t3 = time.perf_counter()
        self.stats.time_verify += t3 - t2
        self.stats.rounds += 1
        self.stats.drafted += k
        self.stats.accepted += acc
        if self.policy is not None:
            self.policy.observe(kind, k, acc, k_max)
            self.policy.observe_time(kind, k, k if kind == LAYER_SKIP else 0, t3 - t)

        # ---- EOS / length (exact: never past EOS, never past max_new_tokens)
        emitted = cut_at_stop(emitted, self._eos, remaining)
        self.cache.rollback(n + len(emitted))
        self.stats.round_tokens += len(emitted)
        if self.keep_logits:
            self.token_logits.extend(raw[0, : len(emitted)].to(torch.float32, copy=True).unbind(0))
        out_tokens = self._emit(emitted)

        # ---- layer optimization (with "cost", only layer-skip rounds age the skip set)
        if self.policy is None or kind == LAYER_SKIP:
            self._rounds_since_dp += 1
        if self._skip_pending and not self.finished:  # the first search, on an output token
            self._skip_pending = False
            target = torch.stack([h[:, acc] for h in hs], 1)
            self._update_skip(target, n + acc, n + acc + 1, initial=True)
        elif (
            not self.finished
            and c.skip_strategy in ("dp", "importance")
            and c.num_skip_layers > 0
            and self._rounds_since_dp >= c.update_interval
        ):
            target = torch.stack([h[:, acc] for h in hs], 1)
            self._update_skip(target, n + acc, n + acc + 1, initial=False)
        self.stats.round_host_syncs += self._round_syncs
        self.stats.max_round_host_syncs = max(self.stats.max_round_host_syncs, self._round_syncs)
        self.stats.time_total += time.perf_counter() - t_round
        return out_tokens

    def _emit(self, toks: list[int]) -> list[int]:
        self.tokens.extend(toks)
        self.draft_head.add(toks)
        self.stats.new_tokens += len(toks)
        if toks:
            if self.callback is not None:
                self.callback(list(toks))
            if self.streamer is not None:
                self.streamer.put(torch.tensor(toks))
        if (toks and toks[-1] in self._eos) or self.stats.new_tokens >= self.max_new_tokens:
            self._finish()
        return toks

    def _finish(self):
        if not self.finished and self.streamer is not None:
            self.streamer.end()
        self.finished = True

    @property
    def sequences(self) -> Tensor:
        return torch.tensor([self.tokens], dtype=torch.long, device=self.device)

    def generate(self, input_ids: Tensor) -> ClaspOutput:
        self.prefill(input_ids)
        while not self.finished:
            self.step()
        return ClaspOutput(sequences=self.sequences, stats=self.stats)


def generate(
    model,
    input_ids: Tensor,
    config: ClaspConfig | None = None,
    *,
    attention_mask: Tensor | None = None,
    callback=None,
    streamer=None,
    **overrides,
):
    """CLaSp generation: ``.sequences`` is prompt + new tokens (like ``model.generate``),
    ``.stats`` the round statistics. Keyword overrides replace config fields, e.g.
    ``generate(model, ids, max_new_tokens=64, temperature=0)``.

    One sequence ([1, T] or [T], no padding): a ``ClaspOutput`` from ``ClaspDecoder``. A batch
    ([B, T], B > 1, or any padding in ``attention_mask``): a ``batch.BatchOutput`` from
    ``batch.generate_batch`` (each row its own sequence; ``callback(row, tokens)``; no
    streamer)."""
    padded = attention_mask is not None and not bool(torch.as_tensor(attention_mask).all())
    # cuda_graphs run in the batched loop (overrides may also hold ClaspDecoder's own arguments)
    graphs = overrides.get("cuda_graphs", getattr(config, "cuda_graphs", False)) is True
    if isinstance(input_ids, Tensor) and input_ids.dim() == 1 and (padded or graphs):
        input_ids = input_ids[None]
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask).reshape(1, -1)
    if (
        isinstance(input_ids, Tensor)
        and input_ids.dim() == 2
        and (input_ids.shape[0] > 1 or padded or graphs)
    ):
        from clasp_ext.decoding.batch import generate_batch

        if streamer is not None:
            raise ValueError(
                "clasp_ext: streamer= takes one sequence without cuda_graphs; use "
                "callback(row, tokens)"
            )
        return generate_batch(
            model, input_ids, config, attention_mask=attention_mask, callback=callback, **overrides
        )
    dec = ClaspDecoder(model, config, callback=callback, streamer=streamer, **overrides)
    return dec.generate(input_ids)
