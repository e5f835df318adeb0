"""One sequence, streamed: ``ClaspDecoder`` (``prefill(ids)``, then ``step()`` until
``finished``) and ``generate``, the package's entry point for one sequence or a batch.

``ClaspDecoder`` is a thin wrapper over the one decoding loop, ``batch.BatchDecoder``, with one
row: the same phases (draft, verify, commit, the skip-set search), the same round policy and the
same statistics; one row runs the one-sequence forward (``BatchDecoder._forward``). What it adds:
a transformers streamer, the full model's logits behind each token (``keep_logits``, for
``output_scores``), a cache sized for each prompt, and fresh acceptance estimates per sequence.

Lossless by construction (SPEC section 1): every committed token is chosen by
``clasp.verify_greedy`` / ``clasp.verify_sample`` from the logits of the full-model verify
forward, which runs every layer over [t0, drafts] against the K/V the full model wrote for all
earlier positions. The draft only decides what is proposed. ``ModelAdapter.self_check`` refuses a
model whose layer-by-layer forward does not reproduce the model's own logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from clasp_ext.decoding.batch import BatchDecoder, _Sequence, generate_batch
from clasp_ext.decoding.config import ClaspConfig
from clasp_ext.decoding.cost_model import CostTable
from clasp_ext.decoding.inputs import check_token_ids
from clasp_ext.decoding.stats import ClaspStats


@dataclass
class ClaspOutput:
    sequences: Tensor  # [1, prompt + new] like model.generate
    stats: ClaspStats


class ClaspDecoder:
    """Stateful CLaSp decoder for one sequence: ``prefill(ids)`` then ``step()`` until
    ``finished``; ``reset()`` makes it reusable (also after an error).

    ``callback(tokens)`` gets the new tokens as they are committed; ``streamer``: transformers'
    streamer protocol (``put`` the prompt, then each round's tokens; ``end``).
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
        self.loop = BatchDecoder(
            model,
            ClaspConfig.of(config, **overrides),
            max_batch=1,
            cost_tables=None if cost_table is None else {1: cost_table},
            logits_processor=logits_processor,
            keep_logits=keep_logits,
        )
        self.model = model
        self.adapter = self.loop.adapter
        self.config = self.loop.config
        self.device = self.loop.device
        self.draft_head = self.loop.draft_head
        self.low_bit = self.loop.low_bit
        self.callback = callback
        self.streamer = streamer
        self._sized = False  # the loop's cache is sized at the first prefill
        self.generator = torch.Generator(device=self.device)
        self.generator.seed()  # no seed: one nondeterministic stream across prefills
        self.reset()

    @property
    def cost_table(self) -> CostTable | None:
        """The cost table the round policy reads (policy="cost"; None with "fixed")."""
        return self.loop.cost_tables.get(1)

    def calibrate(self, refresh: bool = False) -> CostTable:
        """This setup's cost table (cost_model.get_cost_table: from memory, else disk, else
        measured; ``refresh`` measures again), kept as ``self.cost_table``."""
        table = self.loop._measured(1, refresh)
        self.loop.reset_policy()
        return table

    @property
    def low_bit_bytes(self) -> int:
        """Memory held by the low-bit draft copies (0 without them)."""
        if self.low_bit is None:
            return 0
        return self.low_bit.nbytes + self.draft_head.nbytes

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        loop = self.loop
        loop.rows.clear()  # a run stopped by an error leaves its row behind
        loop.queue.clear()
        loop.reset_policy()  # fresh acceptance estimates per sequence
        self._seq: _Sequence | None = None
        self.stats = ClaspStats()
        self.prompt_len = 0
        self.finished = True
        self._prefilled = False
        if self.config.seed is not None:  # a fixed seed: every prefill replays the same draws
            self.generator.manual_seed(self.config.seed)

    @property
    def policy(self):
        return self.loop.policy

    @property
    def cache(self):
        return self.loop.cache

    @property
    def committed(self) -> int:
        """Positions of the sequence in the cache (every token but the last emitted one), as
        the device holds it (one host read)."""
        return int(self.loop._lens[0])

    @property
    def skip(self) -> list[bool]:
        return self.loop.skip

    @skip.setter
    def skip(self, mask: list[bool]) -> None:
        self.loop.skip = list(mask)

    @property
    def tokens(self) -> list[int]:
        """Prompt + emitted tokens."""
        return [] if self._seq is None else self._seq.tokens

    @property
    def token_logits(self) -> list[Tensor]:
        """With keep_logits: the full model's raw float32 logits [V] behind each emitted token."""
        return [] if self._seq is None else self._seq.token_logits

    @property
    def sequences(self) -> Tensor:
        return torch.tensor([self.tokens], dtype=torch.long, device=self.device)

    # ------------------------------------------------------------------ API
    @torch.no_grad()
    def prefill(self, input_ids: Tensor) -> list[int]:
        """Runs the prompt, emits the first token (returned), and chooses the first skip set."""
        self.reset()
        ids = check_token_ids(input_ids, self.device, self.adapter.vocab_size)
        if ids.shape[0] != 1:
            raise ValueError(
                f"clasp_ext: ClaspDecoder takes one sequence, got batch size {ids.shape[0]}; use "
                "clasp_ext.generate(model, input_ids, attention_mask=...) or BatchDecoder"
            )
        c, loop = self.config, self.loop
        T = ids.shape[1]
        headroom = loop.headroom
        max_new = c.max_new_tokens
        if c.max_cache_len is not None:
            if T + headroom + 1 > c.max_cache_len:
                raise ValueError(
                    f"clasp_ext: the prompt of {T} tokens does not fit max_cache_len="
                    f"{c.max_cache_len} (it needs {T + headroom + 1} slots with max_draft="
                    f"{c.max_draft}, max_lookup={c.max_lookup}, num_skip_layers="
                    f"{c.num_skip_layers})"
                )
            capacity = c.max_cache_len
            max_new = min(max_new, capacity - headroom - T)
        else:
            capacity = T + max_new + headroom
        if not self._sized or loop.capacity < capacity:  # as one request needs, kept after
            loop.resize(1, capacity)
            self._sized = True
        self.prompt_len = T
        if self.streamer is not None:
            self.streamer.put(ids.cpu())
        self._new: list[int] = []
        self._seq = loop._add(
            ids[0].tolist(), max_new, None, self._new.extend, generator=self.generator
        )
        self.stats = self._seq.stats
        self._prefilled = True
        self.finished = False
        self._emitted(loop._admit())
        return self._take()

    @torch.no_grad()
    def step(self) -> list[int]:
        """One round: draft, verify, maybe the skip-set search. Returns the new tokens."""
        if not self._prefilled:
            raise RuntimeError("clasp_ext: call prefill(input_ids) before step()")
        if self.finished:
            return []
        self._emitted(self.loop.step())
        return self._take()

    def _emitted(self, finished: list) -> None:
        """Streams what the loop committed (collected by ``_new``); ends on the finish."""
        toks = self._new
        if toks:
            if self.callback is not None:
                self.callback(list(toks))
            if self.streamer is not None:
                self.streamer.put(torch.tensor(toks))
        if finished:
            self.finished = True
            if self.streamer is not None:
                self.streamer.end()

    def _take(self) -> list[int]:
        toks = list(self._new)
        self._new.clear()
        return toks

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

    One sequence ([1, T] or [T], no padding): a ``ClaspOutput`` from ``ClaspDecoder``
    (``callback(tokens)``, ``streamer``). A batch
    ([B, T], B > 1, or any padding in ``attention_mask``): a ``batch.BatchOutput`` from
    ``batch.generate_batch`` (each row its own sequence; ``callback(row, tokens)``; no
    streamer)."""
    padded = attention_mask is not None and not bool(torch.as_tensor(attention_mask).all())
    if isinstance(input_ids, Tensor) and input_ids.dim() == 1 and padded:
        input_ids = input_ids[None]
        attention_mask = torch.as_tensor(attention_mask).reshape(1, -1)
    if (
        isinstance(input_ids, Tensor)
        and input_ids.dim() == 2
        and (input_ids.shape[0] > 1 or padded)
    ):
        if streamer is not None:
            raise ValueError("clasp_ext: streamer= takes one sequence; use callback(row, tokens)")
        return generate_batch(
            model, input_ids, config, attention_mask=attention_mask, callback=callback, **overrides
        )
    dec = ClaspDecoder(model, config, callback=callback, streamer=streamer, **overrides)
    return dec.generate(input_ids)
