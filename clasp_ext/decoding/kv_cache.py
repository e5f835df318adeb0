"""The shared static KV cache of draft, verify and the layer search (SPEC section 1 and 2).

One buffer per layer, [batch, kv_heads, capacity, head_dim], allocated at the layer's first write
(prefill) with the shape, dtype and device of the K/V its attention hands over: the cache needs no
knowledge of the family's head layout, so models whose keys and values differ in size (DeepSeek's
multi-head latent attention) or whose layers differ work alike. Slot s holds position s.
``committed`` is the number of positions that belong to the sequence; everything past it is scratch
(draft K/V not yet verified, the DP's candidates, rejected drafts) and is simply overwritten later.
Rollback is setting ``committed``. Nothing is copied on the way: ``update`` writes the new K/V into
their slots and returns views of the buffer (the one copy: ``move_slot``, for a sibling draft token
accepted from a scratch slot, branches.py).

The decoder layers' attention calls ``cache.update(key, value, layer_idx, ...)``; the caller sets
the first slot to write with ``set_write(start)`` before running the layers, and ``update`` writes
``[start, start + T)`` and returns the view ``[0, start + T)``.

Batches (batch.py): the buffers hold ``batch`` rows, one sequence each, and rows are ragged: row b's
slot s holds position s of that row's sequence, whatever the other rows' lengths (no padding in the
cache; every row is prefilled on its own through ``row(b)``, a view that reads and writes row b
only). A round over all rows calls ``set_write(starts, kv_len)`` with one first slot per row (a
device tensor [B]): ``update`` writes each row's T new K/V to its own slots and returns the view
``[0, kv_len)`` of every row; the attention masks (adapter.row_masks) hide what lies past each
row's own queries. ``move_row`` copies a row onto another (batch.py keeps the live rows in
``[0, B)`` when a sequence leaves).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache


class ClaspKVCache(Cache):
    def __init__(self, num_layers: int, capacity: int, batch: int | None = None):
        super().__init__(layers=[])
        if capacity <= 0:
            raise ValueError(f"clasp_ext: KV cache capacity must be positive, got {capacity}")
        self.num_layers = num_layers
        self.capacity = capacity
        self.batch = batch  # rows of the buffers; None = the batch of the first write
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.committed = 0
        self._start = 0
        self._row_starts: Tensor | None = None  # per-row first slots of a batched write
        self._kv_len = 0
        self.writes = [0] * num_layers  # update() calls per layer (self-check, tests and stats)

    # -------------------------------------------------------------- write position / rollback
    def set_write(self, start: int | Tensor, kv_len: int | None = None) -> None:
        """The next forward writes at ``start``: one slot for every row, or a device tensor [B]
        of per-row first slots, then with ``kv_len`` the length of the view attention gets."""
        if isinstance(start, Tensor):
            if kv_len is None:
                raise ValueError("clasp_ext: a per-row write needs kv_len")
            self._row_starts, self._kv_len = start, int(kv_len)
        else:
            self._row_starts, self._start = None, int(start)

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
        B = self.batch or B
        if buf is None or buf.shape != (B, H, self.capacity, D) or buf.dtype != states.dtype:
            buf = torch.zeros(
                (B, H, self.capacity, D), dtype=states.dtype, device=states.device
            )  # first write of this layer (prefill): never inside a round
            store[layer_idx] = buf
        return buf

    # -------------------------------------------------------------- transformers Cache API
    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        if self._row_starts is not None:
            return self._update_rows(key_states, value_states, layer_idx)
        k = self._buffer(self.keys, layer_idx, key_states)
        v = self._buffer(self.values, layer_idx, value_states)
        return self._write_slots(k, v, key_states, value_states, layer_idx, "")

    def _write_slots(self, k, v, key_states, value_states, layer_idx: int, where: str):
        """Writes slots [start, start + T) of buffers k, v (every row of them) and returns the
        views [0, start + T)."""
        end = self._start + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(
                f"clasp_ext: KV cache overflow (writing slots [{self._start}, {end}) of "
                f"{self.capacity}){where}; raise max_new_tokens headroom"
            )
        k[:, :, self._start : end].copy_(key_states)
        v[:, :, self._start : end].copy_(value_states)
        self.writes[layer_idx] += 1
        return k[:, :, :end], v[:, :, :end]

    def _update_rows(self, key_states: Tensor, value_states: Tensor, layer_idx: int):
        B, H, T, D = key_states.shape
        if self._kv_len > self.capacity:
            raise RuntimeError(
                f"clasp_ext: KV cache overflow (a batched write reaching slot {self._kv_len} of "
                f"{self.capacity})"
            )
        k = self._buffer(self.keys, layer_idx, key_states)
        v = self._buffer(self.values, layer_idx, value_states)
        # Not range-checked per row (that would read the starts back to the host): kv_len must
        # cover every row's last new slot, as adapter.forward's contract says, and is checked
        # against the capacity above; a slot past a row's capacity would land in the next one's.
        # row b, head h, slot s is row (b * H + h) * capacity + s of the buffer viewed as
        # [-1, D]: one index per (row, head, new token) for index_copy_, which runs 7-20x faster
        # than a scatter_ whose index has one entry per element (bf16, 2 CPU threads, B 1-8)
        dev = key_states.device
        slots = self._row_starts[:, None].long() + torch.arange(T, device=dev)  # [B, T]
        heads = (torch.arange(B, device=dev)[:, None] * H + torch.arange(H, device=dev)) * (
            self.capacity
        )
        index = (heads[:, :, None] + slots[:, None, :]).reshape(-1)  # [B * H * T]
        k.view(-1, k.shape[-1]).index_copy_(0, index, key_states.reshape(-1, k.shape[-1]))
        v.view(-1, v.shape[-1]).index_copy_(0, index, value_states.reshape(-1, v.shape[-1]))
        # (not counted in ``writes``: a Python counter would be specialised by torch.compile and
        # recompile every call; the batch-1 path the self-check runs counts)
        return k[:B, :, : self._kv_len], v[:B, :, : self._kv_len]

    def row(self, b: int) -> RowCache:
        """Row b alone, as a batch-1 cache (prefill and the skip-set DP of one sequence)."""
        if self.batch is None or not 0 <= b < self.batch:
            raise ValueError(f"clasp_ext: row {b} outside the cache's {self.batch} rows")
        return RowCache(self, b)

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copies slots [0, length) of row ``src`` onto row ``dst`` in every layer."""
        for store in (self.keys, self.values):
            for buf in store:
                if buf is not None:
                    buf[dst, :, :length].copy_(buf[src, :, :length])

    def move_slot(self, row: int, src: int, dst: int) -> None:
        """Copies slot ``src`` of ``row`` onto its slot ``dst`` in every layer (branches.py: an
        accepted sibling's K/V, verified in a scratch slot, goes to its position's slot)."""
        for store in (self.keys, self.values):
            for buf in store:
                if buf is not None:
                    buf[row, :, dst].copy_(buf[row, :, src])

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


class RowCache(ClaspKVCache):
    """Row b of a batched ClaspKVCache as a batch-1 cache: same buffers (allocated on the first
    write, with all the parent's rows), no copies."""

    def __init__(self, parent: ClaspKVCache, b: int):
        super().__init__(parent.num_layers, parent.capacity, batch=1)
        self.parent, self.b = parent, b
        self.writes = parent.writes

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        p, b = self.parent, self.b
        k = p._buffer(p.keys, layer_idx, key_states)
        v = p._buffer(p.values, layer_idx, value_states)
        if k.shape[0] != 1:  # a one-row parent (batch-1 decoding) is its row: no slice per layer
            k, v = k[b : b + 1], v[b : b + 1]
        return self._write_slots(k, v, key_states, value_states, layer_idx, f" in row {b}")
