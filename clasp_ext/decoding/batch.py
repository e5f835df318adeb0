"""Batched CLaSp decoding with continuous batching: many sequences, one round at a time.

``BatchDecoder`` holds up to ``max_batch`` sequences in the rows of one static KV cache
(kv_cache.py: row b's slot s holds position s of its own sequence, whatever the other rows'
lengths; no padding in the cache, no copies per round). Requests join with ``add(prompt)`` and
are prefilled on their own row when a row is free (a queue holds the rest); ``step()`` runs one
round for every live row and returns the requests that finished, whose row is then given to the
last live row (one copy of that row's K/V) so the live rows stay ``[0, B)``.

A round, for B live rows at their own lengths n_b:
- draft, one of: nothing (a plain batched step); k layer-skip draft steps over all rows at once
  with the shared skip set (each step one [B, 1] forward of the kept layers), where a row whose
  context has an n-gram match (lookup.py) takes its looked-up tokens first and the layer-skip
  draft after them (a cascade); or context lookup only, each row proposing up to k tokens of its
  own match (rows without one propose none), with no draft forward;
- verify: one [B, k + 1] forward of every layer, each row at its own positions, then
  ``clasp.verify_greedy`` / ``clasp.verify_sample`` on all rows (each row accepts its own number of
  tokens; one device->host read per round);
- commit: each row's emitted tokens, its EOS, length limit and stopping criteria, its callback.

With policy="cost" the round's kind and k maximise the expected tokens per second summed over
the rows (``CostPolicy.choose_rows``), from the cost model at the live batch size (``cost_model``
measured with B rows: at batch 8, verifying 17 tokens per row costs 5.1 plain steps on the bf16
CPU where it costs 1.5 at batch 1) and each row's own acceptance estimates (a copy of the batch's
pooled ones when it joins, then its own rounds; policy.py); policy="fixed" drafts the rows'
matches where every row has one, else ``max_draft`` layer-skip tokens. Either way a layer-skip
draft stops early when no row's draft is sure (its top-1 probability below
``draft_exit_threshold``, or an EOS). The skip set is shared by the rows: each sequence searches
its own (skip_strategy "dp", "static", "importance": the DP of SPEC section 2, on its own row) on
its last prompt token when it joins (with first_dp="first_round", on its first output token;
"auto", once the rounds without a set have lost what the search costs, and one row's search
then serves the batch: rows that join while it has a set draft with it and never search),
"dp" and "importance" again every ``update_interval`` rounds that aged it, and the set skips the
M layers most of the live rows' masks skip (``batch_skip_rule``; ties to the lower layer).

Lossless per row: every emitted token is the verify op's verdict on the full model's logits for
that row; the other rows only share the forward. Sampling draws each row's randomness from its
own generator (``add(seed=...)``): its tokens follow the full model's distribution whoever else is
in the batch (how many draws a round takes depends on the round's shared draft length, so the
same seed in another batch can give other, equally distributed, tokens).

This is the package's one decoding loop: ``ClaspDecoder`` (loop.py) is this decoder with one row
and a streamer; one live row runs the one-sequence forward (an int position on its row of the
cache). Per-request logits processors and stopping criteria, the exit threshold, low-bit drafts,
the full model's logits behind each token (``keep_logits``) and CUDA graphs (``cuda_graphs``)
work at any batch size.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from clasp_ext.decoding import branches
from clasp_ext.decoding.adapter import ModelAdapter
from clasp_ext.decoding.config import ClaspConfig
from clasp_ext.decoding.cost_model import CostTable, get_cost_table
from clasp_ext.decoding.cuda_graphs import GraphedSteps
from clasp_ext.decoding.draft_head import DraftHead
from clasp_ext.decoding.inputs import check_token_ids, unpadded_rows
from clasp_ext.decoding.layer_search import SEARCHED, random_skip_mask, searched_skip_mask
from clasp_ext.decoding.lookup import LookupIndex
from clasp_ext.decoding.low_bit import low_bit_draft_for
from clasp_ext.decoding.phases import (
    accept,
    apply_processor,
    cut_at_stop,
    draft_step,
    first_token,
)
from clasp_ext.decoding.policy import (
    BRANCH,
    LAYER_SKIP,
    LOOKUP,
    PLAIN,
    SHORT_LOOKUP,
    Choice,
    CostPolicy,
    lookup_source,
    observe_sources,
)
from clasp_ext.decoding.stats import BatchStats, ClaspStats, count

DEFAULT_SERVING_CACHE_LEN = 2048  # slots per row when BatchDecoder is not told max_cache_len


@dataclass
class Finished:
    """A request that finished: ``tokens`` is its prompt + new tokens (like one row of
    ``model.generate``), ``stats`` its own statistics."""

    request_id: int
    tokens: list[int]
    prompt_len: int
    stats: ClaspStats
    # keep_logits: the full model's raw float32 logits [V] behind each new token
    token_logits: list[Tensor] = field(default_factory=list)

    @property
    def new_tokens(self) -> list[int]:
        return self.tokens[self.prompt_len :]


class _Sequence:
    """One request's state on the host; its K/V lives in one row of the shared cache."""

    def __init__(
        self,
        rid,
        prompt,
        max_new,
        callback,
        generator,
        lookup_ngram,
        pads=(),
        processor=None,
        stopping_criteria=None,
    ):
        self.id = rid
        self.processor = processor  # its logits processor (None: the decoder's, if any)
        # (input_ids [1, n], scores) -> bool [1] after each new token (transformers' protocol)
        self.stopping_criteria = stopping_criteria
        self.tokens = list(prompt)  # prompt + emitted; all but the last are in the cache
        self.pads = list(pads)  # a padded batch row's pads before its prompt (processors see them)
        self.prompt_len = len(prompt)
        self.max_new = max_new
        self.callback = callback
        self.generator = generator
        self.lookup = LookupIndex(lookup_ngram)
        self.lookup.reset(self.tokens)
        self.stats = ClaspStats()
        self.skip: list[bool] | None = None  # its DP's mask (None: no DP ran)
        self.search_pending = False  # its (first) search runs after this round
        # first_dp="auto": no search yet; it runs once the rounds without a skip set have lost
        # what it costs (BatchDecoder._defer_search)
        self.search_deferred = False
        self.rounds_since_dp = 0  # rounds that aged its mask since its last search
        self.sources = None  # policy="cost": its acceptance estimates per draft source
        self.token_logits: list[Tensor] = []  # keep_logits: the full model's [V] per token
        self.finished = False

    @property
    def committed(self) -> int:
        return len(self.tokens) - 1

    @property
    def remaining(self) -> int:
        return self.max_new - self.stats.new_tokens


class BatchDecoder:
    """Continuous-batching CLaSp decoder (see the module docstring).

    ``max_batch`` rows of ``max_cache_len`` slots each (default: ``config.max_cache_len``, else
    2048); a request needs its prompt + max_new_tokens + a few slots of headroom. ``add`` queues
    a request (it joins at the next ``step``) and returns its id; ``step`` runs one round and
    returns the requests that finished in it; ``run`` steps until all are done. ``callback(id,
    tokens)`` is called with each request's new tokens as they are committed."""

    def __init__(
        self,
        model,
        config: ClaspConfig | None = None,
        *,
        max_batch: int = 8,
        callback=None,
        cost_tables: dict[int, CostTable] | None = None,
        logits_processor=None,
        keep_logits: bool = False,
        **overrides,
    ):
        config = ClaspConfig.of(config, **overrides)
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"clasp_ext: max_batch must be an int >= 1, got {max_batch!r}")
        self.model = model
        self.adapter = a = ModelAdapter(model)
        if max_batch > 1:  # one row runs the one-sequence forward (_forward)
            a.check_ragged()
        self.config = c = config.resolved(a.num_layers, getattr(model, "generation_config", None))
        a.set_skip_unit(c.skip_unit)
        self.device = a.device
        if c.cuda_graphs and self.device.type != "cuda":
            raise ValueError(
                f"clasp_ext: cuda_graphs=True needs the model on a CUDA device (it is on "
                f"{self.device}); CUDA graphs replay captured GPU kernels"
            )
        self.max_batch = max_batch
        self.capacity = c.max_cache_len or DEFAULT_SERVING_CACHE_LEN
        self.headroom = c.cache_headroom
        self.callback = callback
        self.logits_processor = logits_processor
        self.keep_logits = keep_logits
        self.low_bit = low_bit_draft_for(a, c.draft_weights, c.num_skip_layers)
        kind = None if self.low_bit is None else self.low_bit.kind
        self.draft_head = DraftHead(a, c.draft_vocab_size, low_bit=kind)
        self.cost_tables: dict[int, CostTable] = dict(cost_tables or {})
        self.reset_policy()
        self.cache = a.new_cache(self.capacity, batch=max_batch)
        self._device_state()
        if self.policy is not None:
            self.calibrate()
        self.rows: list[_Sequence] = []
        self.queue: deque[_Sequence] = deque()
        self.skip = [False] * a.num_layers
        self.stats = BatchStats()
        self._reads = 0  # device->host reads so far (_read)
        self._next_id = 0
        self._eos = set(c.eos_token_id)
        self._eos_ids = torch.tensor(sorted(self._eos), dtype=torch.long, device=self.device)

    def resize(self, max_batch: int, max_cache_len: int) -> None:
        """New row count and slots per row (only while no request is live or queued)."""
        if not self.idle:
            raise RuntimeError("clasp_ext: resize() needs an idle BatchDecoder")
        for name, v in (("max_batch", max_batch), ("max_cache_len", max_cache_len)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"clasp_ext: {name} must be an int >= 1, got {v!r}")
        if max_batch > 1:
            self.adapter.check_ragged()
        self.max_batch, self.capacity = int(max_batch), int(max_cache_len)
        self.cache = None  # free the old buffers first
        self.cache = self.adapter.new_cache(self.capacity, batch=self.max_batch)
        self._device_state()
        if self.policy is not None:
            self.calibrate()

    def _device_state(self) -> None:
        """Per-row state on the device, one fixed buffer each (rows [0, B) live): the committed
        length (the verify ops advance it in place) and the last emitted token, which the next
        round feeds first. A round reads its positions and first tokens from these and writes
        them back on the device; the host reads the round's verdict once (what it still sends
        per round: the per-row draft counts and looked-up tokens, decided on the host)."""
        self._lens = torch.zeros(self.max_batch, dtype=torch.int32, device=self.device)
        self._last = torch.zeros(self.max_batch, 1, dtype=torch.long, device=self.device)
        self._row0 = self.cache.row(0)  # one live row's forward runs on its view (_forward)
        # the rounds' forward on this cache: the adapter's, or (cuda_graphs) the same replayed
        # from CUDA graphs over static buffers
        self.graphs = self.graphed_steps() if self.config.cuda_graphs else None

    def reset_policy(self) -> None:
        """A round policy with fresh acceptance estimates (``self.policy``; policy="cost", None
        with "fixed") from the batch-1 table. Layer-skip drafts stop where no row's is sure
        (draft_exit_threshold); with skip_strategy="dp" a layer-skip round pays each row's share
        of its DP re-runs (dp_s / update_interval, the DP timed on one row). Also
        ``layer_skip_ok``: with "cost", False where a layer-skip draft can never be chosen (not
        even at batch 1, where verifying is cheapest); then no row runs a skip-set search."""
        c = self.config
        self.policy = None
        self._lost_s = 0.0  # first_dp="auto": seconds lost so far without a skip set
        if c.policy == "cost":
            table = self._measured(1)
            dp = table.dp_s / c.update_interval if c.skip_strategy == "dp" else 0.0
            self.policy = CostPolicy(
                table, c.draft_exit_threshold > 0, dp, online_costs=c.online_costs
            )
        self.layer_skip_ok = c.num_skip_layers > 0 and (
            self.policy is None or self.policy.may_choose(LAYER_SKIP, c.max_draft)
        )

    def graphed_steps(self, capture: bool = True) -> GraphedSteps:
        """The rounds' forward on static buffers over this decoder's cache, captured as CUDA
        graphs; ``capture=False`` runs the same buffers eagerly (the CPU's stand-in: tests and
        bench_cuda_graphs.py set ``self.graphs`` to one)."""
        tokens = self.config.max_round_draft + 1
        return GraphedSteps(self.adapter, self.cache, self.max_batch, tokens, capture)

    def _one_row(self, B: int) -> bool:
        """Whether a round of B rows runs the one-sequence forward: one row without CUDA graphs
        (an int position on its row's view of the cache: no per-row masks to build, and
        families whose ragged self-check failed decode one sequence)."""
        return B == 1 and self.graphs is None

    def _at(self, starts: Tensor, first: int, kv_len: int, j: int):
        """(start, cache, kv_len) for a round's forward j tokens past the rows' first positions
        (``starts`` on the device; ``first``, the one row's, on the host)."""
        if self._one_row(starts.shape[0]):
            return first + j, self._row0, None
        return starts + j, self.cache, kv_len + j

    def _forward(
        self, ids: Tensor, start, cache, skip=None, kv_len=None, keep_hidden=None, tree=None
    ):
        """A round's forward over the live rows (adapter.forward, with per-row starts or one
        row's int position, see ``_at``; a token ``tree`` on one row), replayed from CUDA graphs
        where captured (a forward that keeps the hidden states for a skip-set search runs
        eagerly)."""
        if self.graphs is None or keep_hidden or not isinstance(start, Tensor):
            return self.adapter.forward(
                ids, start, cache, skip=skip, kv_len=kv_len, keep_hidden=keep_hidden, tree=tree
            )
        return self.graphs.forward(ids, start, cache, skip=skip, kv_len=kv_len)

    # ------------------------------------------------------------------ requests
    def add(
        self,
        input_ids,
        *,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        callback=None,
        logits_processor=None,
        stopping_criteria=None,
    ) -> int:
        """Queues one prompt ([T] or [1, T] ids: a tensor on any device, or a list of ints, as
        a tokenizer returns them; only the values are read); returns its request id.
        ``callback(tokens)`` (or the decoder's ``callback(id, tokens)``) gets its new tokens as
        they come;
        ``logits_processor`` (or the decoder's) scores this request's positions (ClaspDecoder's
        protocol: a pure function of (input_ids [1, n], scores [1, V])); ``stopping_criteria``
        (transformers' protocol, ``(input_ids [1, n], scores) -> bool [1]``, called with scores
        None) ends it after the first token for which it says stop."""
        if isinstance(input_ids, (list, tuple)):  # floats stay floats, for check_token_ids
            input_ids = torch.tensor(input_ids) if input_ids else torch.zeros(0, dtype=torch.long)
        ids = check_token_ids(input_ids, None, self.adapter.vocab_size)
        if ids.shape[0] != 1:
            raise ValueError(
                f"clasp_ext: add() takes one prompt, got batch size {ids.shape[0]}; add each row"
            )
        seq = self._add(
            ids[0].tolist(), max_new_tokens, seed, callback, (), logits_processor, stopping_criteria
        )
        return seq.id

    def _add(
        self,
        prompt: list[int],
        max_new_tokens,
        seed,
        callback,
        pads=(),
        processor=None,
        stop=None,
        generator: torch.Generator | None = None,
    ) -> _Sequence:
        """Queues a request (``add``'s checks done); ``generator``: its randomness (ClaspDecoder
        passes its own), else a new one from ``seed``."""
        c = self.config
        max_new = c.max_new_tokens if max_new_tokens is None else max_new_tokens
        if not isinstance(max_new, int) or max_new < 0:
            raise ValueError(f"clasp_ext: max_new_tokens must be an int >= 0, got {max_new!r}")
        need = len(prompt) + max_new + self.headroom
        if need > self.capacity:
            raise ValueError(
                f"clasp_ext: a prompt of {len(prompt)} tokens with max_new_tokens={max_new} needs "
                f"{need} cache slots; this BatchDecoder has {self.capacity} per sequence (raise "
                "max_cache_len or lower max_new_tokens)"
            )
        rid = self._next_id
        self._next_id += 1
        gen = generator
        if gen is None:
            gen = torch.Generator(device=self.device)
            seed = seed if seed is not None else (None if c.seed is None else c.seed + rid)
            if seed is None:
                gen.seed()
            else:
                gen.manual_seed(seed)
        if callback is None and self.callback is not None:
            callback = lambda toks, _f=self.callback, _r=rid: _f(_r, toks)  # noqa: E731
        processor = processor if processor is not None else self.logits_processor
        if processor is not None and not callable(processor):
            raise TypeError(
                "clasp_ext: logits_processor must be callable (input_ids, scores) -> scores, e.g. "
                f"a LogitsProcessorList, got {type(processor).__name__}"
            )
        if stop is not None and not callable(stop):
            raise TypeError(
                "clasp_ext: stopping_criteria must be callable (input_ids, scores) -> bool, e.g. "
                f"a StoppingCriteriaList, got {type(stop).__name__}"
            )
        seq = _Sequence(rid, prompt, max_new, callback, gen, c.lookup_ngram, pads, processor, stop)
        self.queue.append(seq)
        return seq

    @property
    def pending(self) -> int:
        return len(self.queue)

    @property
    def active(self) -> int:
        return len(self.rows)

    @property
    def idle(self) -> bool:
        return not self.rows and not self.queue

    # ------------------------------------------------------------------ phases
    def calibrate(self) -> dict[int, CostTable]:
        """The cost tables this decoder's rounds read (policy="cost"): batch sizes 1, 2, 4, ...
        up to the first power of two >= max_batch, each measured on first use per setup and then
        cached (memory, disk: cost_model.get_cost_table); the sizes between are interpolated. Run
        on construction, so no round pays for a measurement."""
        B = 1
        while True:
            self._measured(B)
            if B >= self.max_batch:
                return self.cost_tables
            B *= 2

    def _measured(self, B: int, refresh: bool = False) -> CostTable:
        """The table at batch size B, kept in ``cost_tables`` (get_cost_table: from memory, else
        disk, else measured; ``refresh`` measures again), up to the longest verify a round of B
        rows may run: the longest draft and its first token, and at B = 1 greedy (eager) the
        siblings of a layer-skip draft (branches.py) on top."""
        if refresh or B not in self.cost_tables:
            c = self.config
            tokens = c.max_round_draft + 1
            if self._may_branch(B):
                tokens = max(tokens, 1 + c.max_draft * (1 + c.draft_branches))
            self.cost_tables[B] = get_cost_table(
                self.adapter,
                self.draft_head,
                c.num_skip_layers,
                tokens,
                low_bit=self.low_bit,
                batch=B,
                refresh=refresh,
            )
        return self.cost_tables[B]

    def _table(self, B: int) -> CostTable:
        """The table at batch size B: measured at powers of two, linear in B between them (a
        batch's forward cost grows about linearly with its rows once they no longer fit the
        matrix units' tile; measured at 1, 2, 4, 8: verify of 9 tokens 252, 311, 486, 749 ms)."""
        if B in self.cost_tables:
            return self.cost_tables[B]
        hi = 1
        while hi < B:
            hi *= 2
        lo, t_hi = hi // 2, self._measured(hi)
        t_lo = self._measured(lo)
        w = (B - lo) / (hi - lo)
        ts = sorted(set(t_lo.verify_s) | set(t_hi.verify_s))  # each table interpolated at all
        table = CostTable(
            verify_s={T: (1 - w) * t_lo.verify(T) + w * t_hi.verify(T) for T in ts},
            draft_step_s=(1 - w) * t_lo.draft_step_s + w * t_hi.draft_step_s,
            dp_s=0.0,
            setup={"interpolated_batch": B, "between": [lo, hi]},
            repeats=min(t_lo.repeats, t_hi.repeats),
        )
        self.cost_tables[B] = table
        return table

    @torch.no_grad()
    def _prefill(self, seq: _Sequence, b: int) -> None:
        """The prompt on row b alone, its first token, and its skip set: its search on its last
        prompt token (or, with first_dp="first_round", on its first output token after round 1;
        with "auto", once it pays: ``_defer_search``), or its random mask."""
        t = time.perf_counter()
        a, c = self.adapter, self.config
        self.draft_head.add([*seq.tokens, *self._eos])
        if seq.max_new <= 0:
            seq.finished = True
            return
        reads, dp0 = self._reads, seq.stats.time_dp
        T = len(seq.tokens)
        row = self.cache.row(b)
        ids = torch.tensor([seq.tokens], device=self.device)
        h, hs = a.forward(ids, 0, row, keep_hidden="last")
        raw = a.head(h[:, -1])
        scores = raw
        if seq.processor is not None:
            scores = apply_processor(seq.processor, self._context(seq), raw[:, None])[:, 0]
        first = first_token(c, scores, [seq.generator])
        if self.keep_logits:
            seq.token_logits.append(raw[0].to(torch.float32, copy=True))
        tok = self._read(first)[0][0]
        self._lens[b] = T
        self._last[b, 0] = tok
        strategy = c.skip_strategy
        if self.layer_skip_ok and strategy == "random":
            seed = None if c.seed is None else c.seed + seq.id
            seq.skip = random_skip_mask(a.num_layers, c.num_skip_layers, seed)
        elif self.layer_skip_ok and strategy in SEARCHED:
            if c.first_dp == "first_round":
                seq.search_pending = True
            elif c.first_dp == "auto" and self.policy is not None:
                seq.search_deferred = True
            else:
                self._search(seq, b, torch.stack([x[:, -1] for x in hs], 1), T - 1)
        st = seq.stats
        st.host_syncs += self._reads - reads
        dt = time.perf_counter() - t
        st.time_prefill += dt - (st.time_dp - dp0)
        st.time_total += dt
        self.stats.time_prefill += dt
        self.stats.prefills += 1
        self._stream([(seq, self._commit(seq, [tok]))])

    def _search(self, seq: _Sequence, b: int, target: Tensor, pos: int) -> None:
        """Row b's skip-set search (skip_strategy "dp", "static" or "importance"; SPEC section
        2) on its hidden states ``target`` [1, L + 1, d] at position ``pos`` (its scratch slots
        past it): its own mask, and the importance per layer in its stats."""
        t = time.perf_counter()
        c, a, L = self.config, self.adapter, self.adapter.num_layers
        mask, imp = searched_skip_mask(
            c.skip_strategy, a, self.cache.row(b), target, pos, pos + 1, c.num_skip_layers
        )
        host = self._read(torch.cat([mask.float(), imp.float()], 1)[0])
        seq.skip = [bool(x) for x in host[:L]]
        seq.stats.importance = host[L:]
        seq.rounds_since_dp = 0
        if seq.stats.dp_runs == 0:
            seq.stats.first_dp_token = seq.stats.new_tokens
        seq.stats.dp_runs += 1
        self.stats.dp_runs += 1
        dt = time.perf_counter() - t
        seq.stats.time_dp += dt
        self.stats.time_dp += dt

    def _searches(self, seq: _Sequence, aged: bool) -> bool:
        """Whether row ``seq`` searches its skip set after this round (which ages its mask when
        ``aged``): its first search (first_dp="first_round"), or a re-run every
        ``update_interval`` aging rounds (skip_strategy "dp" and "importance")."""
        if seq.search_pending:
            return True
        if seq.skip is None or self.config.skip_strategy not in ("dp", "importance"):
            return False
        seq.rounds_since_dp += aged
        return seq.rounds_since_dp >= self.config.update_interval

    def _read(self, t: Tensor) -> list:
        """The one way device values reach the host; counted (``_reads``)."""
        self._reads += 1
        return t.tolist()

    def _context(self, seq: _Sequence) -> Tensor:
        """What ``logits_processor`` sees of a row: [1, n] ids (its pads, prompt and emitted
        tokens)."""
        return torch.tensor([seq.pads + seq.tokens], device=self.device)

    def _processed_rows(self, contexts: list[Tensor], logits: Tensor, num: list[int]) -> Tensor:
        """Each row's logits processor on its positions: row b of ``logits`` [B, R, V] scores
        the token after ``contexts[b]`` [1, n_b] and then after each of the first ``num[b]``
        tokens appended to it (the positions past those are never read and stay raw)."""
        out = logits.clone() if logits.dtype == torch.float32 else logits.float()
        for b, (ctx, seq) in enumerate(zip(contexts, self.rows, strict=True)):
            if seq.processor is not None:
                m = num[b] + 1
                out[b : b + 1, :m] = apply_processor(seq.processor, ctx, logits[b : b + 1, :m])
        return out

    @property
    def _processing(self) -> bool:
        return any(s.processor is not None for s in self.rows)

    def _set_skip(self) -> None:
        """The batch's skip set for the live rows, and the low-bit copies its draft uses."""
        self.skip = self._shared_skip()
        for seq in self.rows:
            seq.stats.skip_layers = [i for i, x in enumerate(self.skip) if x]
        if self.low_bit is not None and any(self.skip):
            self.low_bit.prepare(self.skip)

    def _shared_skip(self) -> list[bool]:
        """The batch's skip set from the live rows' own masks (each from its skip_strategy at
        join; "dp" and "static": the DP on its last prompt token), by ``batch_skip_rule``:
        "vote", the M layers most rows skip (ties to the lower layer); "agreed", the layers every
        row skips. An explicit list (``skip_strategy=[...]``) as given."""
        c, L, M = self.config, self.adapter.num_layers, self.config.num_skip_layers
        if not isinstance(c.skip_strategy, str):
            chosen = set(c.skip_strategy)
            return [i in chosen for i in range(L)]
        masks = [s.skip for s in self.rows if s.skip]
        if M == 0 or not masks:
            return [False] * L
        votes = [sum(m[i] for m in masks) for i in range(L)]
        if c.batch_skip_rule == "agreed":
            return [v == len(masks) for v in votes]
        chosen = set(sorted(range(L), key=lambda i: (-votes[i], i))[:M])
        return [i in chosen and votes[i] > 0 for i in range(L)]

    def _admit(self) -> list[Finished]:
        done = []
        changed = False
        while self.queue and len(self.rows) < self.max_batch:
            seq = self.queue.popleft()
            self._prefill(seq, len(self.rows))
            if seq.finished:
                done.append(self._result(seq))
            else:
                if self.policy is not None:  # what the batch has learned so far, then its own
                    seq.sources = self.policy.row_sources()
                self.rows.append(seq)
                changed = True
        if changed:
            self._set_skip()
        return done

    def _choose(self, B: int, caps: list[int], looked: list[tuple[list[int], int]], sources=None):
        """The round: (PLAIN, 0), (LAYER_SKIP, k): k draft steps for every row, a row with a
        context match taking its tokens first, or (LOOKUP, k): each row proposes up to k tokens
        of its match (rows without one none), no draft forward. With policy="cost" the policy's
        choice (``CostPolicy.choose_rows``) from the table at batch size B and the acceptance
        each row has seen (``sources``: its estimates per draft source; None: the pooled ones
        for every row). With "fixed": the rows' matches when every row has one (one sequence
        drafts its match when it has one, as CLaSp with prompt lookup does), else layer skip
        up to max_draft."""
        c = self.config
        k_ls = min(c.max_draft, max(caps)) if c.num_skip_layers > 0 and any(self.skip) else 0
        lens = [len(t) for t, _ in looked]
        if self.policy is None:
            if any(lens) and (all(lens) or k_ls == 0):
                return LOOKUP, max(lens)
            return (LAYER_SKIP, k_ls) if k_ls > 0 else (PLAIN, 0)
        self.policy.table = self._table(B)
        choice = self.policy.choose_rows(caps, k_ls, looked, sources)
        if k_ls == 0:
            self._defer_search(caps, looked, sources, choice)
        return choice.kind, choice.k

    def _defer_search(self, caps: list[int], looked, sources, choice: Choice) -> None:
        """first_dp="auto", the ski-rental rule: the skip-set search costs a fixed dp_s (the
        table's, scaled like the plain rounds' times) and pays back per token, so a short answer
        or one that lookup drafts carry may never earn it back. While no row has a skip set,
        each round adds what its choice loses against the round the estimates would choose with
        one (``CostPolicy.seconds_lost``); once the losses reach dp_s, the row waiting longest
        searches after this round, on this round's verify (at most twice the best schedule's
        cost in hindsight, whatever the answer's length). The batch then drafts with its set.
        A row that ends in this round cannot search (nothing would use its set): the next one
        does, or the losses wait for the next round."""
        waiting = [s for s in self.rows if s.search_deferred]
        k = min(self.config.max_draft, max(caps))
        if not waiting:
            self._lost_s = 0.0  # what rows that left lost is no reason for a search
            return
        if not self.layer_skip_ok or k == 0:
            return
        better = self.policy.choose_rows(caps, k, looked, sources)
        self._lost_s += self.policy.seconds_lost(choice, better)
        dp_s = self._measured(1).dp_s
        if self.policy.scale_times:
            dp_s *= self.policy.time_scale(PLAIN)
        searcher = next((s for s in waiting if s.remaining > 1), None)
        if self._lost_s > 0 and self._lost_s >= dp_s and searcher is not None:
            searcher.search_deferred = False
            searcher.search_pending = True
            self._lost_s = 0.0

    def _draft(
        self,
        t0: Tensor,
        starts: Tensor,
        kv0: int,
        k: int,
        looked: list[list[int]],
        contexts: list[Tensor] | None,
        forward=True,
        allowed: list[int] | None = None,
        n0: int = 0,
        alternatives: int = 0,
    ):
        """k draft tokens per row [B, k] (and their proposals q [B, k, V] when sampling): a row's
        ``looked`` tokens first, then (``forward``) layer-skip draft tokens, scored by the rows'
        logits processors after their ``contexts`` (None: no row has one). The draft stops early
        once no row goes on: a row stops at its first draft token below the exit threshold or
        EOS, and at its ``allowed`` length (a row near its end). ``n0``: row 0's committed
        length (the one-row forward's position, ``_at``). Greedy with ``alternatives`` = w,
        also the draft's next w tokens at each step [B, k, w] (branches.py), else None."""
        c, a, dh = self.config, self.adapter, self.draft_head
        B = t0.shape[0]
        lk = torch.zeros(B, k, dtype=torch.long)
        has = torch.zeros(B, k, dtype=torch.bool)
        for b, toks in enumerate(looked):
            lk[b, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            has[b, : len(toks)] = True
        lk, has = lk.to(self.device), has.to(self.device)
        V = a.vocab_size
        if not forward or all(len(x) >= k for x in looked):  # no draft forward
            q = None if c.greedy else torch.nn.functional.one_hot(lk, V).to(torch.float32)
            return lk, q, None
        drafts, qs, alts, tok = [], [], [], t0
        gens = [s.generator for s in self.rows]
        proc = None
        if contexts is not None:

            def proc(full: Tensor) -> Tensor:  # each row's next position after its drafts
                ctx = [
                    torch.cat([x, *(d[b : b + 1] for d in drafts)], 1)
                    for b, x in enumerate(contexts)
                ]
                return self._processed_rows(ctx, full[:, None], [0] * B)[:, 0]

        thr = c.draft_exit_threshold
        weights = contextlib.nullcontext()
        if self.low_bit is not None:
            weights = self.low_bit.active(self.skip)
        if thr > 0:  # rows whose draft goes on (a stopped row stays stopped), and their lengths
            allowed_t = torch.tensor(allowed or [k] * B, device=self.device)
            alive = allowed_t > 0
        with weights:
            for j in range(k):
                start, cache, kv_len = self._at(starts, n0, kv0, j)
                nxt, q, top1, alt = draft_step(
                    c,
                    self._forward,
                    dh,
                    tok,
                    start,
                    cache,
                    self.skip,
                    gens,
                    kv_len=kv_len,
                    processor=proc,
                    want_top1=thr > 0,
                    alternatives=alternatives,
                )
                self.stats.draft_steps += 1
                if alt is not None:
                    alts.append(alt)
                if q is not None:  # a looked-up token's proposal is a point mass
                    one_hot = torch.nn.functional.one_hot(lk[:, j], V).to(q.dtype)
                    qs.append(torch.where(has[:, j, None], one_hot, q))
                nxt = torch.where(has[:, j : j + 1], lk[:, j : j + 1], nxt)
                drafts.append(nxt)
                tok = nxt
                if thr > 0 and j + 1 < k:  # stop when no row goes on (one read per draft step)
                    sure = ((top1 >= thr) & ~torch.isin(nxt[:, 0], self._eos_ids)) | has[:, j]
                    alive &= sure & (j + 1 < allowed_t)
                    if not self._read(alive.any()):
                        break
        qs = torch.stack(qs, 1) if qs else None
        return torch.cat(drafts, 1), qs, (torch.stack(alts, 1) if alts else None)

    @torch.no_grad()
    def step(self) -> list[Finished]:
        """Admits queued requests into free rows, then runs one round over the live rows.
        Returns the requests that finished (in this call)."""
        t_round = time.perf_counter()
        done = self._admit()
        if not self.rows:
            self.stats.time_total += time.perf_counter() - t_round
            return done
        c, a = self.config, self.adapter
        rows = list(self.rows)  # this round's rows (_release reorders self.rows)
        B = len(rows)
        reads0 = self._reads
        n = [s.committed for s in rows]
        kv0 = max(n) + 1
        starts = self._lens[:B].clone()  # verify advances self._lens in place
        t0 = self._last[:B]
        t = time.perf_counter()
        caps = [max(0, min(c.max_round_draft, s.remaining - 1)) for s in rows]
        min_ngram = 1 if self.policy is not None else 2
        looked = [
            s.lookup.match(min(c.max_lookup, cap), min_ngram) if c.lookup_ngram else ([], 0)
            for s, cap in zip(rows, caps, strict=True)
        ]
        sources = [s.sources for s in rows] if self.policy is not None else None
        kind, k = self._choose(B, caps, looked, sources)
        contexts = [self._context(s) for s in rows] if self._processing else None
        steps0 = self.stats.draft_steps
        q = tree = None
        if kind == LOOKUP:  # the rows' own matches only
            looked = [(t[:k], m) for t, m in looked]
            num = allowed = [len(t) for t, _ in looked]
            drafts, q, _ = self._draft(
                t0, starts, kv0, k, [t for t, _ in looked], contexts, forward=False, n0=n[0]
            )
        elif kind == LAYER_SKIP:
            num = allowed = [min(k, cap) for cap in caps]
            # the cascade: a row's 2- and 3-gram matches go first (a 1-gram match is mostly
            # wrong where text does not copy its context, and would displace the draft)
            prefix = [t[:m] if ng >= 2 else [] for (t, ng), m in zip(looked, num, strict=True)]
            width = self._branch_limit(B, contexts)
            drafts, q, alts = self._draft(
                t0, starts, kv0, k, prefix, contexts, allowed=allowed, n0=n[0], alternatives=width
            )
            k = drafts.shape[1]  # the exit threshold may have stopped it early
            num = [min(x, k) for x in num]
            if alts is not None:
                tree = self._tree(alts, len(prefix[0]), k, n[0], self.stats.draft_steps - steps0)
        else:
            num = allowed = [0] * B
            drafts = t0.new_zeros(B, 0)
        t2 = time.perf_counter()
        self.stats.time_draft += t2 - t
        # the rows that search their skip set after this round need the verify's hidden states
        searching = [self._searches(s, self.policy is None or kind == LAYER_SKIP) for s in rows]
        start, cache, kv_len = self._at(starts, n[0], kv0 + k, 0)
        ids = torch.cat([t0, drafts] if tree is None else [t0, drafts, tree.sibling_tokens], 1)
        h, hs = self._forward(
            ids,
            start,
            cache,
            kv_len=kv_len,
            keep_hidden="all" if any(searching) else None,
            tree=tree,
        )
        raw = logits = a.head(h)
        if contexts is not None:
            ctx = [torch.cat([x, drafts[b : b + 1, : num[b]]], 1) for b, x in enumerate(contexts)]
            logits = self._processed_rows(ctx, raw, num)
        num_draft = torch.tensor(num, dtype=torch.int32, device=self.device)
        gens = [s.generator for s in rows]
        chain = logits[:, : k + 1]
        accepted, out = accept(c, chain, drafts, num_draft, self._lens[:B], q, gens)
        self._last[:B] = out.gather(1, accepted.long()[:, None])  # the next round's first token
        verdict = [accepted.long()[:, None], out]
        if tree is not None:  # (the sibling that matched or -1, the token after it)
            verdict.append(branches.verdict(tree, logits, accepted, out)[None])
        host = self._read(torch.cat(verdict, 1))  # the round's one read
        t3 = time.perf_counter()
        steps = self.stats.draft_steps - steps0
        if self.policy is not None:  # the round's time against the table's
            verified = k + (0 if tree is None else tree.num_siblings)
            timed = BRANCH if tree is not None else kind  # tree rounds keep their own ratio
            self.policy.observe_time(timed, verified, steps, t3 - t)
        self.stats.time_verify += t3 - t2
        self.stats.rounds += 1
        self.stats.row_rounds += B
        count(self.stats.batch_sizes, B)
        count(self.stats.draft_lengths, k)
        self.stats.plain_rounds += kind == PLAIN
        self.stats.graphs_captured = 0 if self.graphs is None else self.graphs.captured
        self.stats.lookup_rounds += kind == LOOKUP
        self.stats.layer_skip_rounds += kind == LAYER_SKIP
        outcomes, pending = [], []
        last = [(0, 0)] * B
        for b, seq in enumerate(rows):
            acc = int(host[b][0])
            st = seq.stats
            st.rounds += 1
            st.drafted += num[b]
            st.draft_steps += steps
            st.accepted += acc
            st.plain_rounds += kind == PLAIN or num[b] == 0
            if kind == LOOKUP and num[b] > 0:
                st.lookup_rounds += 1
                st.short_lookup_rounds += lookup_source(looked[b][1]) == SHORT_LOOKUP
                count(st.lookup_lengths, num[b])
            if kind == LAYER_SKIP and num[b] > 0:
                st.layer_skip_rounds += 1
                count(st.layer_skip_lengths, allowed[b])
            st.time_draft += t2 - t
            st.time_verify += t3 - t2
            row_outcomes = self._outcomes(
                kind,
                looked[b],
                prefix[b] if kind == LAYER_SKIP else None,
                num[b],
                acc,
                allowed[b],
            )
            toks = [int(x) for x in host[b][1 : acc + 2]]
            node = -1  # the sibling accepted after the chain (branches.py), if any
            if tree is not None:
                node, extra = (int(x) for x in host[b][-2:])
                row_outcomes += self._branch_outcome(tree, acc, node)
                if node >= 0:
                    toks.append(extra)
                    self._accept_sibling(n[b], acc, node, extra)
                st.branch_rounds += 1
                st.branch_hits += node >= 0
            outcomes += row_outcomes
            if seq.sources is not None:
                observe_sources(seq.sources, row_outcomes)
            emitted = self._commit(seq, toks)
            st.round_tokens += len(emitted)
            if self.keep_logits:  # the logits behind each token: the chain's, the sibling's
                rows_of = [*range(acc + 1), node][: len(emitted)]
                behind = raw[b, rows_of].to(torch.float32, copy=True)
                seq.token_logits += behind.unbind(0)
            pending.append((seq, emitted))
            # the last verified node in the cache and its position (the search's target)
            last[b] = (node, acc + 1) if node >= 0 else (acc, acc)
        # the searches, each on its row's hidden states at its last accepted token
        searched = False
        shared = self._reads - reads0
        for b, seq in enumerate(rows):
            reads = self._reads
            if searching[b] and not seq.finished:
                seq.search_pending = False
                node, depth = last[b]
                target = torch.stack([x[b : b + 1, node] for x in hs], 1)
                self._search(seq, b, target, n[b] + depth)
                searched = True
            syncs = shared + self._reads - reads
            seq.stats.host_syncs += syncs
            seq.stats.round_host_syncs += syncs
            seq.stats.max_round_host_syncs = max(seq.stats.max_round_host_syncs, syncs)
        if searched:
            self._set_skip()
        if self.policy is not None:
            self.policy.observe_rows(outcomes)
        self._stream(pending)
        done += self._release()
        dt = time.perf_counter() - t
        for seq in rows:
            seq.stats.time_total += dt
        self.stats.time_total += time.perf_counter() - t_round
        return done

    def _may_branch(self, B: int) -> bool:
        """Whether rounds of B rows may verify siblings (branches.py), as far as the config says:
        greedy, one sequence, eager (no CUDA graphs), ``draft_branches`` > 0."""
        c = self.config
        return c.draft_branches > 0 and c.greedy and B == 1 and not c.cuda_graphs

    def _branch_limit(self, B: int, contexts) -> int:
        """The most siblings per layer-skip position this round may verify: ``_may_branch``, on
        the one-row forward (not a stand-in for CUDA graphs), no logits processor,
        policy="cost" (which picks the width per round); else 0 (a chain)."""
        ok = self._may_branch(B) and self._one_row(B) and self.policy is not None
        return self.config.draft_branches if ok and contexts is None else 0

    def _tree(self, alts: Tensor, m: int, k: int, n0: int, steps: int):
        """The round's token tree: the policy's width of siblings at the layer-skip positions
        m..k-1 of a chain of k drafts (the first m looked up) drafted in ``steps`` draft steps,
        as many as fit the row's cache; None for a chain."""
        positions = list(range(min(m, k), k))
        w = self.policy.branch_width(k, len(positions), steps, alts.shape[2], self.rows[0].sources)
        room = max(0, self.capacity - (n0 + 1 + k))  # slots past the chain's
        positions = positions[: room // w] if w else []
        return branches.build(alts, positions, w) if positions else None

    @staticmethod
    def _branch_outcome(tree, accepted: int, node: int) -> list[tuple]:
        """What a tree round teaches the policy's BRANCH source (policy.py) where the chain was
        rejected at a position with siblings: the rank of the one that matched, or none did."""
        if accepted not in tree.positions:
            return []
        rank = tree.rank(node) if node >= 0 else tree.width
        return [(BRANCH, tree.width, rank, tree.width)]

    def _accept_sibling(self, n: int, accepted: int, node: int, extra: int) -> None:
        """A sibling accepted after ``accepted`` chain drafts of the one row at committed length n:
        its K/V goes from its scratch slot to its position's, the row grows by it, and the token
        after it feeds the next round."""
        self.cache.move_slot(0, n + node, n + accepted + 1)
        self._lens[0] += 1
        self._last[0, 0] = extra

    @staticmethod
    def _outcomes(kind, looked, prefix, drafted: int, accepted: int, allowed: int) -> list[tuple]:
        """What a row's round teaches the policy: a lookup draft (or a cascade's looked-up
        prefix) teaches its n-gram source, a layer-skip draft (or the cascade's tail, reached when
        the whole prefix was accepted) the layer-skip source, and whether it stopped itself
        before the ``allowed`` length (the exit threshold)."""
        if drafted == 0:
            return []
        if kind == LOOKUP:
            return [(lookup_source(looked[1]), drafted, accepted, drafted)]
        m = min(len(prefix), drafted)
        out = [(lookup_source(looked[1]), m, min(accepted, m), m)] if m else []
        if accepted >= m and drafted > m:
            out.append((LAYER_SKIP, drafted - m, accepted - m, allowed - m))
        return out

    def _commit(self, seq: _Sequence, toks: list[int]) -> list[int]:
        """Appends a row's tokens, cut at its EOS, its length limit and its stopping criteria."""
        toks = cut_at_stop(toks, self._eos, seq.remaining)
        stopped = False
        if seq.stopping_criteria is not None:  # checked after every token, as plain generate does
            ids = torch.tensor([seq.pads + seq.tokens + toks], device=self.device)
            for i in range(len(toks)):
                n = ids.shape[1] - len(toks) + i + 1
                if bool(torch.as_tensor(seq.stopping_criteria(ids[:, :n], None)).any()):
                    toks, stopped = toks[: i + 1], True
                    break
        seq.tokens.extend(toks)
        seq.stats.new_tokens += len(toks)
        self.stats.new_tokens += len(toks)
        self.draft_head.add(toks)
        if stopped or (toks and toks[-1] in self._eos) or seq.remaining <= 0:
            seq.finished = True
        return toks

    @staticmethod
    def _stream(pending: list[tuple[_Sequence, list[int]]]) -> None:
        """Callbacks run after every row's state is committed: one that raises leaves the
        decoder consistent (its exception propagates from step())."""
        for seq, toks in pending:
            if toks and seq.callback is not None:
                seq.callback(list(toks))

    def _release(self) -> list[Finished]:
        """Finished rows leave; the last live row moves into each freed row."""
        done = [self._result(s) for s in self.rows if s.finished]
        b = 0
        while b < len(self.rows):
            while self.rows and self.rows[-1].finished:  # finished rows at the end just go
                self.rows.pop()
            if b >= len(self.rows):
                break
            if self.rows[b].finished:  # the last live row (not finished) takes this row
                last = len(self.rows) - 1
                self.cache.move_row(last, b, self.rows[last].committed)
                self._lens[b], self._last[b] = self._lens[last], self._last[last]
                self.rows[b] = self.rows.pop()
            b += 1
        if done:
            self._set_skip()
            # the draft head scores the live contexts' rare ids, not every context ever seen
            live = [t for s in [*self.rows, *self.queue] for t in s.tokens]
            self.draft_head.reset(live, list(self._eos))
        return done

    def _result(self, seq: _Sequence) -> Finished:
        seq.stats.skip_layers = [i for i, s in enumerate(self.skip) if s]
        return Finished(seq.id, seq.tokens, seq.prompt_len, seq.stats, seq.token_logits)

    def run(self) -> list[Finished]:
        """Steps until every queued and live request is done; returns them by request id."""
        done = []
        while not self.idle:
            done += self.step()
        return sorted(done, key=lambda f: f.request_id)


@dataclass
class BatchOutput:
    sequences: Tensor  # [B, T + new] like model.generate: the prompts as given, then new tokens
    finished: list[Finished]
    stats: BatchStats


def generate_batch(
    model,
    input_ids: Tensor,
    config: ClaspConfig | None = None,
    *,
    attention_mask: Tensor | None = None,
    pad_token_id: int | None = None,
    callback=None,
    logits_processor=None,
    row_logits_processors: list | None = None,
    stopping_criteria=None,
    **overrides,
) -> BatchOutput:
    """CLaSp on a batch: ``input_ids`` [B, T], padded (left, as for ``model.generate``) where
    ``attention_mask`` is 0. ``.sequences`` is [B, T + the longest row's new tokens], each row
    its prompt as given, then its new tokens, then ``pad_token_id`` after its EOS (the generation
    config's pad token, else its first EOS, else 0). ``callback(row, tokens)`` streams.
    ``logits_processor(input_ids [1, n], scores [1, V]) -> scores`` is applied per row, as in
    ClaspDecoder, to the row as plain generate shows it: its left padding, prompt and tokens;
    ``row_logits_processors`` (one per row, or None) gives each row its own instead.
    ``stopping_criteria`` (transformers' protocol) is checked per row after each of its tokens on
    the row as plain generate shows it ([1, n] ids, scores None; a criterion that needs the batch
    or a row index does not fit); a row it stops is padded after (plain generate pads it only
    where an EOS is set, and otherwise goes on writing tokens into it until every row stops)."""
    config = ClaspConfig.of(config, **overrides)
    dec = BatchDecoder(model, config, callback=callback, max_batch=1)
    ids = check_token_ids(input_ids, dec.device, dec.adapter.vocab_size)
    prompts = unpadded_rows(ids, attention_mask)
    c = dec.config
    # rows sized for this batch, as ClaspDecoder sizes its cache for one request
    slots = c.max_cache_len or max(map(len, prompts)) + c.max_new_tokens + dec.headroom
    dec.resize(len(prompts), slots)
    if row_logits_processors is not None and len(row_logits_processors) != len(prompts):
        raise ValueError(
            f"clasp_ext: row_logits_processors has {len(row_logits_processors)} entries for a "
            f"batch of {len(prompts)}"
        )
    for b, prompt in enumerate(prompts):
        start = 0 if attention_mask is None else attention_mask[b].tolist().index(1)
        proc = logits_processor if row_logits_processors is None else row_logits_processors[b]
        pads = ids[b, :start].tolist()
        dec._add(prompt, None, None, None, pads, proc, stopping_criteria)
    finished = dec.run()
    gc = getattr(model, "generation_config", None)
    if pad_token_id is None:
        pad_token_id = getattr(gc, "pad_token_id", None) if gc is not None else None
    if pad_token_id is None:
        pad_token_id = c.eos_token_id[0] if c.eos_token_id else 0
    width = max(len(f.new_tokens) for f in finished)
    new = [f.new_tokens + [pad_token_id] * (width - len(f.new_tokens)) for f in finished]
    tail = torch.tensor(new, dtype=torch.long, device=ids.device).view(len(new), width)
    return BatchOutput(torch.cat([ids, tail], 1), finished, dec.stats)
