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
the rows, from the cost model at the live batch size (``cost_model`` measured with B rows: at
batch 8, verifying 17 tokens per row costs 5.1 plain steps on the bf16 CPU where it costs 1.5 at
batch 1) and each row's own acceptance estimates (a copy of the batch's pooled ones when it
joins, then its own rounds; policy.py); policy="fixed" drafts
``max_draft`` layer-skip tokens every round. Either way a layer-skip draft stops early when no
row's draft is sure (its top-1 probability below ``draft_exit_threshold``, or an EOS), as the
batch-1 loop stops its own. The skip set is shared by the rows: each sequence runs the DP on its
last prompt token when it joins (on its own row), and the set skips the M layers most of the live
rows' DPs skip (ties to the lower layer).

Lossless per row, as at batch 1: every emitted token is the verify op's verdict on the full
model's logits for that row; the other rows only share the forward. Sampling draws each row's
randomness from its own generator (``add(seed=...)``): its tokens follow the full model's
distribution whoever else is in the batch (how many draws a round takes depends on the round's
shared draft length, so the same seed in another batch can give other, equally distributed,
tokens). Batch size 1 callers get ``ClaspDecoder`` (loop.py), which also has streamers, output
scores and skip-set DP re-runs (``skip_strategy="dp"``); this loop has callbacks and, like it,
logits processors (``logits_processor``: applied per row, to that row's own tokens), the exit
threshold and CUDA graphs (``cuda_graphs``). At one row the two run level (same rounds).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from clasp_ext.decoding.adapter import ModelAdapter
from clasp_ext.decoding.config import ClaspConfig
from clasp_ext.decoding.cost_model import CostTable, get_cost_table
from clasp_ext.decoding.cuda_graphs import GraphedSteps
from clasp_ext.decoding.draft_head import DraftHead
from clasp_ext.decoding.inputs import check_token_ids, unpadded_rows
from clasp_ext.decoding.layer_search import random_skip_mask, searched_skip_mask
from clasp_ext.decoding.lookup import LookupIndex
from clasp_ext.decoding.loop import ClaspStats, _count
from clasp_ext.decoding.low_bit import int8_draft_for
from clasp_ext.decoding.phases import (
    accept,
    apply_processor,
    cut_at_stop,
    draft_step,
    first_token,
)
from clasp_ext.decoding.policy import (
    BATCH_MIN_GAIN,
    LAYER_SKIP,
    LOOKUP,
    MIN_GAIN,
    PLAIN,
    CostPolicy,
    batch_draft_steps,
    lookup_source,
    observe_sources,
)

DEFAULT_SERVING_CACHE_LEN = 2048  # slots per row when BatchDecoder is not told max_cache_len


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
    time_total: float = 0.0
    graphs_captured: int = 0  # CUDA graphs captured so far (cuda_graphs=True)

    @property
    def mean_batch(self) -> float:
        return self.row_rounds / self.rounds if self.rounds else 0.0


@dataclass
class Finished:
    """A request that finished: ``tokens`` is its prompt + new tokens (like one row of
    ``model.generate``), ``stats`` its own statistics."""

    request_id: int
    tokens: list[int]
    prompt_len: int
    stats: ClaspStats

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
        self.sources = None  # policy="cost": its acceptance estimates per draft source
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
        **overrides,
    ):
        config = ClaspConfig.of(config, **overrides)
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"clasp_ext: max_batch must be an int >= 1, got {max_batch!r}")
        self.model = model
        self.adapter = a = ModelAdapter(model)
        a.check_ragged()
        self.config = c = config.resolved(a.num_layers, getattr(model, "generation_config", None))
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
        self.int8_draft = int8_draft_for(a, c.draft_weights, c.num_skip_layers)
        self.draft_head = DraftHead(a, c.draft_vocab_size, int8=self.int8_draft is not None)
        self.cost_tables: dict[int, CostTable] = dict(cost_tables or {})
        self.policy = None
        if c.policy == "cost":  # drafts stop where no row's is sure (draft_exit_threshold)
            self.policy = CostPolicy(
                self._measured(1),
                exit_threshold=c.draft_exit_threshold > 0,
                online_costs=c.online_costs,
            )
        self.cache = a.new_cache(self.capacity, batch=max_batch)
        self._device_state()
        if self.policy is not None:
            self.calibrate()
        self.rows: list[_Sequence] = []
        self.queue: deque[_Sequence] = deque()
        self.skip = [False] * a.num_layers
        self.stats = BatchStats()
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
        # the rounds' forward on this cache: the adapter's, or (cuda_graphs) the same replayed
        # from CUDA graphs over static buffers
        self.graphs = self.graphed_steps() if self.config.cuda_graphs else None

    def graphed_steps(self, capture: bool = True) -> GraphedSteps:
        """The rounds' forward on static buffers over this decoder's cache, captured as CUDA
        graphs; ``capture=False`` runs the same buffers eagerly (the CPU's stand-in: tests and
        bench_cuda_graphs.py set ``self.graphs`` to one)."""
        tokens = self.config.max_round_draft + 1
        return GraphedSteps(self.adapter, self.cache, self.max_batch, tokens, capture)

    def _forward(self, ids: Tensor, starts: Tensor, cache, skip=None, kv_len=None):
        """A round's forward over the live rows (adapter.forward with per-row starts)."""
        run = self.adapter.forward if self.graphs is None else self.graphs.forward
        return run(ids, starts, cache, skip=skip, kv_len=kv_len)

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
        """Queues one prompt ([T] or [1, T] ids); returns its request id. ``callback(tokens)``
        (or the decoder's ``callback(id, tokens)``) gets its new tokens as they come;
        ``logits_processor`` (or the decoder's) scores this request's positions (ClaspDecoder's
        protocol: a pure function of (input_ids [1, n], scores [1, V])); ``stopping_criteria``
        (transformers' protocol, ``(input_ids [1, n], scores) -> bool [1]``, called with scores
        None) ends it after the first token for which it says stop."""
        ids = check_token_ids(input_ids, self.device, self.adapter.vocab_size)
        if ids.shape[0] != 1:
            raise ValueError(
                f"clasp_ext: add() takes one prompt, got batch size {ids.shape[0]}; add each row"
            )
        return self._add(
            ids[0].tolist(), max_new_tokens, seed, callback, (), logits_processor, stopping_criteria
        )

    def _add(
        self, prompt: list[int], max_new_tokens, seed, callback, pads=(), processor=None, stop=None
    ) -> int:
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
        self.queue.append(
            _Sequence(rid, prompt, max_new, callback, gen, c.lookup_ngram, pads, processor, stop)
        )
        return rid

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

    def _measured(self, B: int) -> CostTable:
        if B not in self.cost_tables:
            c = self.config
            self.cost_tables[B] = get_cost_table(
                self.adapter,
                self.draft_head,
                c.num_skip_layers,
                c.max_round_draft + 1,
                int8_draft=self.int8_draft,
                batch=B,
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
        ts = sorted(set(t_lo.verify_s) & set(t_hi.verify_s))
        table = CostTable(
            verify_s={T: (1 - w) * t_lo.verify_s[T] + w * t_hi.verify_s[T] for T in ts},
            draft_step_s=(1 - w) * t_lo.draft_step_s + w * t_hi.draft_step_s,
            dp_s=0.0,
            setup={"interpolated_batch": B, "between": [lo, hi]},
            repeats=min(t_lo.repeats, t_hi.repeats),
        )
        self.cost_tables[B] = table
        return table

    @torch.no_grad()
    def _prefill(self, seq: _Sequence, b: int) -> None:
        """The prompt on row b alone, its first token, and its skip-set DP."""
        t = time.perf_counter()
        a, c = self.adapter, self.config
        self.draft_head.add([*seq.tokens, *self._eos])
        if seq.max_new <= 0:
            seq.finished = True
            return
        T = len(seq.tokens)
        row = self.cache.row(b)
        ids = torch.tensor([seq.tokens], device=self.device)
        h, hs = a.forward(ids, 0, row, keep_hidden="last")
        scores = a.head(h[:, -1])
        if seq.processor is not None:
            scores = apply_processor(seq.processor, self._context(seq), scores[:, None])[:, 0]
        tok = int(first_token(c, scores, [seq.generator]))
        M, strategy = c.num_skip_layers, c.skip_strategy
        if M > 0 and isinstance(strategy, str):
            if strategy == "random":
                seed = None if c.seed is None else c.seed + seq.id
                seq.skip = random_skip_mask(a.num_layers, M, seed)
            else:
                target = torch.stack([x[:, -1] for x in hs], 1)
                mask, _ = searched_skip_mask(strategy, a, row, target, T - 1, T, M)
                if strategy != "importance":
                    self.stats.dp_runs += 1
                    seq.stats.dp_runs += 1
                seq.skip = [bool(x) for x in mask[0].tolist()]
        self._lens[b] = T
        self._last[b, 0] = tok
        seq.stats.time_prefill = time.perf_counter() - t
        self.stats.time_prefill += seq.stats.time_prefill
        self.stats.prefills += 1
        self._stream([(seq, self._commit(seq, [tok]))])

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
        if self.int8_draft is not None and any(self.skip):
            self.int8_draft.prepare(self.skip)

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
        of its match (rows without one none), no draft forward. With policy="cost" the one with
        the most expected tokens per second summed over the rows, from the table at batch size
        B and the acceptance each row has seen (``sources``: its estimates per draft source;
        None: the pooled ones for every row); with "fixed", layer skip up to max_draft."""
        c = self.config
        k_ls = min(c.max_draft, max(caps)) if c.num_skip_layers > 0 and any(self.skip) else 0
        lens = [len(t) for t, _ in looked]
        if self.policy is None:
            if k_ls > 0:
                return LAYER_SKIP, k_ls
            return (LOOKUP, max(lens)) if any(lens) else (PLAIN, 0)
        pol = self.policy
        pol.table = self._table(B)
        seconds = pol.cost  # the table's time, scaled as this decoder's rounds measured
        gain = MIN_GAIN if B == 1 else BATCH_MIN_GAIN
        best, choice = B / seconds(PLAIN, 0) * gain, (PLAIN, 0)
        srcs = sources or [pol.sources] * len(caps)
        if k_ls > 0:
            # (E emitted, E drafted) per row, from its own estimates, for drafts of at most k;
            # the draft runs while any row goes on
            es = [src[LAYER_SKIP].expected(k_ls) for src in srcs]
            for k in range(1, k_ls + 1):  # a row near its end drafts only up to its cap
                emitted = sum(e[min(k, cap)][0] for e, cap in zip(es, caps, strict=True))
                rate = emitted / seconds(LAYER_SKIP, batch_draft_steps(es, caps, k))
                if rate > best:
                    best, choice = rate, (LAYER_SKIP, k)
        if any(lens):
            per_row = [
                src[lookup_source(n)].expected(len(t))
                for src, (t, n) in zip(srcs, looked, strict=True)
            ]
            for k in range(1, max(lens) + 1):
                emitted = sum(e[min(k, len(e) - 1)][0] for e in per_row)
                rate = emitted / seconds(LOOKUP, k)
                if rate > best:
                    best, choice = rate, (LOOKUP, k)
        return choice

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
    ):
        """k draft tokens per row [B, k] (and their proposals q [B, k, V] when sampling): a row's
        ``looked`` tokens first, then (``forward``) layer-skip draft tokens, scored by the rows'
        logits processors after their ``contexts`` (None: no row has one). The draft stops early
        once no row goes on: a row stops at its first draft token below the exit threshold or
        EOS, and at its ``allowed`` length (a row near its end)."""
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
            return lk, q
        drafts, qs, tok = [], [], t0
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
        if self.int8_draft is not None:
            weights = self.int8_draft.active(self.skip)
        if thr > 0:  # rows whose draft goes on (a stopped row stays stopped), and their lengths
            allowed_t = torch.tensor(allowed or [k] * B, device=self.device)
            alive = allowed_t > 0
        with weights:
            for j in range(k):
                nxt, q, top1 = draft_step(
                    c,
                    self._forward,
                    dh,
                    tok,
                    starts + j,
                    self.cache,
                    self.skip,
                    gens,
                    kv_len=kv0 + j,
                    processor=proc,
                    want_top1=thr > 0,
                )
                self.stats.draft_steps += 1
                if q is not None:  # a looked-up token's proposal is a point mass
                    one_hot = torch.nn.functional.one_hot(lk[:, j], V).to(q.dtype)
                    qs.append(torch.where(has[:, j, None], one_hot, q))
                nxt = torch.where(has[:, j : j + 1], lk[:, j : j + 1], nxt)
                drafts.append(nxt)
                tok = nxt
                if thr > 0 and j + 1 < k:  # stop when no row goes on (one read per draft step)
                    sure = ((top1 >= thr) & ~torch.isin(nxt[:, 0], self._eos_ids)) | has[:, j]
                    alive &= sure & (j + 1 < allowed_t)
                    if not bool(alive.any()):
                        break
        return torch.cat(drafts, 1), (torch.stack(qs, 1) if qs else None)

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
        rows = self.rows
        B = len(rows)
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
        q = None
        if kind == LOOKUP:  # the rows' own matches only
            looked = [(t[:k], n) for t, n in looked]
            num = allowed = [len(t) for t, _ in looked]
            drafts, q = self._draft(
                t0, starts, kv0, k, [t for t, _ in looked], contexts, forward=False
            )
        elif kind == LAYER_SKIP:
            num = allowed = [min(k, cap) for cap in caps]
            # the cascade: a row's 2- and 3-gram matches go first (a 1-gram match is mostly
            # wrong where text does not copy its context, and would displace the draft)
            prefix = [t[:m] if ng >= 2 else [] for (t, ng), m in zip(looked, num, strict=True)]
            drafts, q = self._draft(t0, starts, kv0, k, prefix, contexts, allowed=allowed)
            k = drafts.shape[1]  # the exit threshold may have stopped it early
            num = [min(x, k) for x in num]
        else:
            num = allowed = [0] * B
            drafts = t0.new_zeros(B, 0)
        t2 = time.perf_counter()
        self.stats.time_draft += t2 - t
        h, _ = self._forward(torch.cat([t0, drafts], 1), starts, self.cache, kv_len=kv0 + k)
        logits = a.head(h)
        if contexts is not None:
            ctx = [torch.cat([x, drafts[b : b + 1, : num[b]]], 1) for b, x in enumerate(contexts)]
            logits = self._processed_rows(ctx, logits, num)
        num_draft = torch.tensor(num, dtype=torch.int32, device=self.device)
        gens = [s.generator for s in rows]
        accepted, out = accept(c, logits, drafts, num_draft, self._lens[:B], q, gens)
        self._last[:B] = out.gather(1, accepted.long()[:, None])  # the next round's first token
        host = torch.cat([accepted.long()[:, None], out], 1).tolist()  # the round's one read
        if self.policy is not None:  # the round's time against the table's
            steps = self.stats.draft_steps - steps0
            self.policy.observe_time(kind, k, steps, time.perf_counter() - t)
        self.stats.time_verify += time.perf_counter() - t2
        self.stats.rounds += 1
        self.stats.row_rounds += B
        _count(self.stats.batch_sizes, B)
        _count(self.stats.draft_lengths, k)
        self.stats.plain_rounds += kind == PLAIN
        self.stats.graphs_captured = 0 if self.graphs is None else self.graphs.captured
        self.stats.lookup_rounds += kind == LOOKUP
        self.stats.layer_skip_rounds += kind == LAYER_SKIP
        outcomes, pending = [], []
        for b, seq in enumerate(rows):
            acc = int(host[b][0])
            st = seq.stats
            st.rounds += 1
            st.drafted += num[b]
            st.accepted += acc
            st.plain_rounds += kind == PLAIN or num[b] == 0
            st.lookup_rounds += kind == LOOKUP and num[b] > 0
            st.layer_skip_rounds += kind == LAYER_SKIP and num[b] > 0
            row_outcomes = self._outcomes(
                kind,
                looked[b],
                prefix[b] if kind == LAYER_SKIP else None,
                num[b],
                acc,
                allowed[b],
            )
            outcomes += row_outcomes
            if seq.sources is not None:
                observe_sources(seq.sources, row_outcomes)
            emitted = self._commit(seq, [int(x) for x in host[b][1 : acc + 2]])
            st.round_tokens += len(emitted)
            pending.append((seq, emitted))
        if self.policy is not None:
            self.policy.observe_rows(outcomes)
        self._stream(pending)
        done += self._release()
        self.stats.time_total += time.perf_counter() - t_round
        return done

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
        return Finished(seq.id, seq.tokens, seq.prompt_len, seq.stats)

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
