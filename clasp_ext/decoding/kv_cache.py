"""The shared static KV cache of draft, verify and the layer search (SPEC section 1 and 2).

One buffer per layer, [batch, kv_heads, capacity, head_dim], allocated at the layer's first write
(prefill) with the shape, dtype and device of the K/V its attention hands over: the cache needs no
knowledge of the family's head layout, so models whose keys and values differ in size (DeepSeek's
multi-head latent attention) or whose layers differ work alike. Slot s holds position s.
``committed`` is the number of positions that belong to the sequence; everything past it is scratch
(draft K/V not yet verified, the DP's candidates, rejected drafts) and is simply overwritten later.
Rollback is setting ``committed``. Nothing is ever copied: ``update`` writes the new K/V into their
slots and returns views of the buffer.

The decoder layers' attention calls ``cache.update(key, value, layer_idx, ...)``; the caller sets
the first slot to write with ``set_write(start)`` before running the layers, and ``update`` writes
``[start, start + T)`` and returns the view ``[0, start + T)``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache


class ClaspKVCache(Cache):
    def __init__(self, num_layers: int, capacity: int):
        super().__init__(layers=[])
        if capacity <= 0:
            raise ValueError(f"clasp_ext: KV cache capacity must be positive, got {capacity}")
        self.num_layers = num_layers
        self.capacity = capacity
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.committed = 0
        self._start = 0
        self.writes = [0] * num_layers  # update() calls per layer (self-check, tests and stats)

    # -------------------------------------------------------------- write position / rollback
    def set_write(self, start: int) -> None:
        self._start = int(start)

    def rollback(self, length: int) -> None:
        """Set the committed length (no data moves)."""
        if not 0 <= length <= self.capacity:
            raise ValueError(f"clasp_ext: rollback length {length} outside [0, {self.capacity}]")
        self.committed = int(length)

    def reset(self) -> None:
        self.committed = 0
        self._start = 0

    def _buffer(self, store: list, layer_idx: int, states: Tensor) -> Tensor:
        buf = store[layer_idx]
        B, H, _, D = states.shape
        if buf is None or buf.shape != (B, H, self.capacity, D) or buf.dtype != states.dtype:
            buf = torch.zeros(
                (B, H, self.capacity, D), dtype=states.dtype, device=states.device
            )  # first write of this layer (prefill): never inside a round
            store[layer_idx] = buf
        return buf

    # -------------------------------------------------------------- transformers Cache API
    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        T = key_states.shape[-2]
        end = self._start + T
        if end > self.capacity:
            raise RuntimeError(
                f"clasp_ext: KV cache overflow (writing slots [{self._start}, {end}) of "
                f"{self.capacity}); raise max_new_tokens headroom"
            )
        k = self._buffer(self.keys, layer_idx, key_states)
        v = self._buffer(self.values, layer_idx, value_states)
        k[:, :, self._start : end].copy_(key_states)
        v[:, :, self._start : end].copy_(value_states)
        self.writes[layer_idx] += 1
        return k[:, :, :end], v[:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.committed

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.capacity

    def get_max_length(self) -> int:
        return self.capacity

    def __len__(self) -> int:
        return self.num_layers

    @property
    def is_compileable(self) -> bool:
        return False

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)
