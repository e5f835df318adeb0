"""The draft's lm_head over a subset of the vocabulary.

Once layers are skipped, the lm_head is a large part of a draft token's cost: 10% of a
Qwen2.5-1.5B step (151,936 x 1,536), most of a Gemma 3 270M step (262,144 x 640). The draft only has
to propose likely tokens, so it scores the first ``size`` token ids plus every token id that
occurs in the prompt, the output so far and the EOS list. Byte-level BPE and SentencePiece
vocabularies number their tokens roughly in merge (frequency) order, so the first ids are the common
ones; the context ids cover names and rare words the answer repeats.

Lossless either way: the verify pass scores the full vocabulary, so a token outside the subset is
still emitted when the full model picks it; the subset only decides what is proposed. In sampling
mode the draft distribution q is the subset's, scattered into the full vocabulary (zero outside),
which speculative sampling handles exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clasp_ext.decoding.low_bit import KINDS, low_bit_copy


class DraftHead:
    """``low_bit`` ("int8" / "int4"): score the first ``size`` rows on such a copy (low_bit.py;
    the context rows keep the model's weights)."""

    def __init__(self, adapter, size: int, low_bit: str | None = None):
        self.adapter = adapter
        head = adapter.lm_head
        self.weight = head.weight
        self.bias = getattr(head, "bias", None)
        self.vocab_size = self.weight.shape[0]
        # 0, or a subset as large as the vocabulary: the full head, no index map
        self.enabled = 0 < size < self.vocab_size
        self.size = size if self.enabled else self.vocab_size
        self._extra: list[int] = []
        self._extra_set: set[int] = set()
        self.ids: Tensor | None = None
        self._low_bit = None
        if low_bit is not None and KINDS[low_bit].supports(self.weight[: self.size]):
            self._low_bit = low_bit_copy(head, low_bit, self.size)
        self._rebuild()

    def _bias_rows(self):
        return self.bias[: self.size] if self.bias is not None else None

    @property
    def nbytes(self) -> int:
        """Bytes of the low-bit copy (0 without one)."""
        return self._low_bit.nbytes if self._low_bit is not None else 0

    def reset(self, context_ids: list[int], eos_ids: list[int]) -> None:
        self._extra, self._extra_set = [], set()
        self._rebuild()
        self.add([*context_ids, *eos_ids])

    def add(self, token_ids: list[int]) -> None:
        """Adds the context tokens outside the first ``size`` ids (a host-side set lookup; the
        small gather of their rows runs only when a new one appears)."""
        if not self.enabled:
            return
        new = sorted({t for t in token_ids if t >= self.size} - self._extra_set)
        if new:
            self._extra += new
            self._extra_set.update(new)
            self._rebuild()

    def _rebuild(self) -> None:
        if not self.enabled:
            return
        dev = self.weight.device
        extra = torch.tensor(self._extra, dtype=torch.long, device=dev)
        self.ids = torch.cat([torch.arange(self.size, device=dev), extra])
        self._w_extra = self.weight.index_select(0, extra)
        self._b_extra = self.bias.index_select(0, extra) if self.bias is not None else None

    @property
    def num_scored(self) -> int:
        return self.size + len(self._extra)

    def logits(self, hidden: Tensor) -> Tensor:
        """Draft logits [..., num_scored] over ``ids`` (the full [..., V] when disabled)."""
        a = self.adapter
        if not self.enabled and self._low_bit is None:
            return a.head(hidden)
        normed = a.final_norm(hidden)
        if self._low_bit is not None:
            x = self._low_bit(normed)
        else:  # a view of the first rows: no copy
            x = F.linear(normed, self.weight[: self.size], self._bias_rows())
        if self._extra:
            x = torch.cat([x, F.linear(normed, self._w_extra, self._b_extra)], dim=-1)
        return a.softcap(x)

    def token_ids(self, index: Tensor) -> Tensor:
        """Subset positions -> vocabulary ids (on the device; no host sync)."""
        return index if not self.enabled else self.ids[index]

    def full_logits(self, logits: Tensor) -> Tensor:
        """[B, num_scored] subset logits -> [B, V] with -inf outside the subset (for logits
        processors, which index the full vocabulary); such a token is never proposed."""
        if not self.enabled:
            return logits
        out = logits.new_full((*logits.shape[:-1], self.vocab_size), float("-inf"))
        return out.index_copy_(-1, self.ids, logits)

    def full_probs(self, probs: Tensor) -> Tensor:
        """[B, num_scored] subset probabilities -> [B, V] with zeros outside the subset."""
        if not self.enabled:
            return probs
        out = probs.new_zeros(*probs.shape[:-1], self.vocab_size)
        return out.index_copy_(-1, self.ids, probs)
