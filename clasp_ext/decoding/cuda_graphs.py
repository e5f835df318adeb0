"""CUDA graphs for the batched loop's draft and verify steps (``ClaspConfig(cuda_graphs=True)``).

A round of the batched loop (batch.py) launches every kernel of every layer from Python; at small
batches on a GPU that launch work, not the GPU, sets the step time. ``GraphedSteps`` replays the
steps from captured graphs over static buffers instead:

- the draft step (one token per row through the kept layers): one graph for what every layer
  reads (``ModelAdapter.forward_inputs``: embedding, positions, rotary, masks) and one graph per
  decoder layer, every layer graph reading and writing the same hidden buffer, so any skip set
  replays as a run of layer graphs without re-capture;
- the verify step (every layer over t0 + k drafts per row): one graph per padded length in
  ``verify_lengths(max_tokens)``; the pad columns compute K/V into scratch slots past each row's
  drafts (overwritten later, like rejected drafts' K/V) and their hidden states are dropped.

Graphs are captured on first use, per padded batch (``batch_bucket``: rows past the live ones
are computed and ignored) and cache view (``kv_bucket``: 256 * 2^j slots, the per-row masks hide
what lies past each row's queries), so no graph depends on the round: a round copies its token ids
and per-row first positions into the static buffers and replays. The cache, the draft head, the
logits processors and sampling stay outside the graphs. What a graph holds from its capture: the
cache buffers (allocated at the first prefill, never reallocated), the low-bit draft copies active
while a layer graph was captured (kept for the process) and the attention implementation.

All graphs share one memory pool, so a graph's outputs may lie where another graph keeps its
scratch: only the outputs of a draft step's inputs graph (read by the layer graphs replayed right
after it) and of a verify (read by the eager head right after) are read later, and nothing
replays in between.

``capture=False`` (CPU; the tests) runs the same functions eagerly and copies their results into
the tensors the first call returned: the same buffers and data flow, without graphs.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves

# Padded verify lengths (t0 + drafts): a few graphs cover every draft length, at the price of up
# to a third more verify columns (nearly free where verification is memory-bound).
VERIFY_LENGTHS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def verify_lengths(max_tokens: int) -> list[int]:
    """The padded lengths a verify of up to ``max_tokens`` columns can be replayed at."""
    return sorted({t for t in VERIFY_LENGTHS if t < max_tokens} | {max_tokens})


def _tensors(tree) -> list[Tensor]:
    return [x for x in tree_leaves(tree) if isinstance(x, Tensor)]


class _Replay:
    """``fn()`` captured as one CUDA graph (``capture``) or re-run eagerly; ``out`` holds its
    outputs at fixed addresses. Construction runs it once. ``state`` is a tensor ``fn`` reads and
    overwrites (the layer graphs' hidden buffer): kept across the warm-up run, which a capture
    needs, so the call that captures still computes one step."""

    def __init__(self, fn, capture: bool, pool=None, state: Tensor | None = None):
        self.fn, self.graph = fn, None
        if not capture:
            self.out = fn()
            return
        saved = None if state is None else state.clone()
        stream = torch.cuda.Stream()  # warm-up off the capture stream, as torch's docs do
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        if saved is not None:
            state.copy_(saved)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = fn()
        self.graph.replay()

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        for dst, src in zip(_tensors(self.out), _tensors(self.fn()), strict=True):
            dst.copy_(src)


def batch_bucket(B: int, max_batch: int) -> int:
    """The rows a round of B live rows replays with: the next power of two (at most max_batch).
    The rows past B are idle cache rows, computed at position 0 and ignored (written before
    anything reads them: a joining request is prefilled over its row)."""
    return min(1 << (B - 1).bit_length(), max_batch)


def kv_bucket(need: int, capacity: int) -> int:
    """The cache view a replay attends over: the smallest 256 * 2^j slots covering ``need``, at
    most the capacity (attending over the whole cache would cost, at long capacities, more memory
    traffic than the launches a graph saves)."""
    kv = 256
    while kv < need:
        kv *= 2
    return min(kv, capacity)


class GraphedSteps:
    """The batched loop's forward (``ModelAdapter.forward``'s signature, per-row ``start``, and
    ``kv_len`` the view the round needs) on static buffers: ``skip`` given = a draft step
    ([B, 1], layer graphs), else a verify (padded, one graph). A step is keyed by the padded batch
    (``batch_bucket``), the cache view (``kv_bucket``) and the layer or verify length.
    ``max_tokens`` = the longest verify (``max_round_draft + 1``)."""

    def __init__(self, adapter, cache, max_batch: int, max_tokens: int, capture: bool):
        rope = str(getattr(adapter.rotary_emb, "rope_type", "default"))
        if "dynamic" in rope or rope == "longrope":
            raise ValueError(
                f"clasp_ext: cuda_graphs=True cannot capture {rope!r} rotary embeddings (they "
                "read the longest position back to the host on every call); run with "
                "cuda_graphs=False"
            )
        dev = adapter.device
        self.adapter, self.cache, self.capture = adapter, cache, capture
        self.max_batch = max_batch
        self.lengths = verify_lengths(max_tokens)
        self.ids = torch.zeros(max_batch, self.lengths[-1], dtype=torch.long, device=dev)
        self.starts = torch.zeros(max_batch, dtype=torch.int32, device=dev)
        d = adapter.hidden_size
        self.hidden = torch.zeros(max_batch, 1, d, dtype=adapter.dtype, device=dev)
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        # ("inputs", B, kv) / ("layer", B, kv, i) / ("verify", B, kv, T)
        self.steps: dict[tuple, _Replay] = {}
        self.replays = 0

    @property
    def captured(self) -> int:
        return len(self.steps) if self.capture else 0

    def buffers(self) -> dict[str, Tensor]:
        """Every tensor a replay reads or writes outside the cache, by name (the tests check that
        they keep their shapes and addresses from round to round)."""
        out = {"ids": self.ids, "starts": self.starts, "hidden": self.hidden}
        for key, step in self.steps.items():
            for j, t in enumerate(_tensors(step.out)):
                out[f"{'/'.join(map(str, key))}/{j}"] = t
        return out

    def _run(self, key: tuple, make, state: Tensor | None = None):
        step = self.steps.get(key)
        if step is None:
            device = contextlib.nullcontext()
            if self.capture:
                device = torch.cuda.device(self.adapter.device)
            try:
                with device:
                    self.steps[key] = step = _Replay(make(), self.capture, self.pool, state)
            except Exception as err:
                if not self.capture:
                    raise
                raise RuntimeError(
                    f"clasp_ext: capturing the {key[0]} step of this model as a CUDA graph "
                    f"failed ({type(err).__name__}: {err}); something in its forward reads a "
                    "value back to the host or changes shape per call. Run with "
                    "cuda_graphs=False"
                ) from err
        else:
            step.replay()
        self.replays += 1
        return step.out

    def forward(self, ids: Tensor, start: Tensor, cache, skip=None, kv_len=None):
        if cache is not self.cache or not isinstance(start, Tensor) or kv_len is None:
            raise ValueError(
                "clasp_ext: GraphedSteps runs per-row rounds (starts, kv_len) on its own cache"
            )
        B, T = ids.shape
        if skip is not None and T != 1:
            raise ValueError(f"clasp_ext: a graphed draft step takes 1 token per row, got {T}")
        padded = next((t for t in self.lengths if t >= T), None)
        if padded is None:
            raise ValueError(
                f"clasp_ext: a verify of {T} tokens is longer than the graphs' {self.lengths[-1]}"
            )
        need = int(kv_len) + padded - T  # the pad columns sit past the last real query
        capacity = self.cache.capacity
        if need > capacity:  # checked here: a write past a row's slots would land in another's
            raise RuntimeError(
                f"clasp_ext: KV cache overflow (a graphed round reaching slot {need} of {capacity})"
            )
        kv, Bp = kv_bucket(need, capacity), batch_bucket(B, self.max_batch)
        self.starts[:B].copy_(start)
        if Bp > B:
            self.starts[B:Bp].zero_()
        self.ids[:B, :T].copy_(ids)  # columns T.. and rows B.. keep earlier ids (valid tokens)
        if skip is not None:
            return self._draft(Bp, kv, skip)[:B], []
        h = self._run(("verify", Bp, kv, padded), lambda: self.verify_fn(Bp, kv, padded))
        return h[:B, :T], []

    # The functions captured: one graph each (tests compile them with fullgraph=True on CPU).
    def verify_fn(self, B: int, kv: int, T: int):
        """Every layer over ids [B, T] at the rows' starts: the last layer's output [B, T, d]."""
        a, ids, starts = self.adapter, self.ids[:B, :T], self.starts[:B]
        return lambda: a.forward(ids, starts, self.cache, kv_len=kv)[0]

    def inputs_fn(self, B: int, kv: int):
        """A draft step's embedding into the hidden buffer; returns what its layers read."""
        a, hidden = self.adapter, self.hidden[:B]
        ids, starts = self.ids[:B, :1], self.starts[:B]

        def inputs():
            h, pos_ids, pe, masks = a.forward_inputs(ids, starts, kv)
            hidden.copy_(h)
            return pos_ids, pe, masks

        return inputs

    def layer_fn(self, B: int, kv: int, i: int, layer_inputs):
        """Decoder layer i of a draft step, from the hidden buffer back into it."""
        a, hidden, starts = self.adapter, self.hidden[:B], self.starts[:B]
        pos_ids, pe, masks = layer_inputs

        def layer():
            self.cache.set_write(starts, kv)
            with a.layer_attention(starts):
                hidden.copy_(a.run_layer(i, hidden, pos_ids, pe, masks, self.cache))

        return layer

    def _draft(self, B: int, kv: int, skip) -> Tensor:
        layer_inputs = self._run(("inputs", B, kv), lambda: self.inputs_fn(B, kv))
        hidden = self.hidden[:B]
        for i in range(self.adapter.num_layers):
            if not skip[i]:
                make = lambda i=i: self.layer_fn(B, kv, i, layer_inputs)  # noqa: E731
                self._run(("layer", B, kv, i), make, state=hidden)
        return hidden
