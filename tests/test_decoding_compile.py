"""The batched draft and verify steps capture as one graph each (torch.compile fullgraph=True):
the precondition for CUDA graphs, checked on CPU (with a fixed kv_len, as a captured graph
would read a fixed view). A round over B rows at their own positions
(``starts`` a device tensor) is [B, 1] per draft step and [B, k + 1] for verify, on the static
cache rows; the compiled steps must give what the eager ones give and write the same K/V."""

from __future__ import annotations

import pytest
import torch
from decoding_models import tiny_model

from clasp_ext.decoding.adapter import ModelAdapter

torch.set_num_threads(1)


@pytest.mark.parametrize("family", ("llama", "qwen2", "gemma3"))
@torch.no_grad()
def test_batched_steps_compile_fullgraph(family):
    torch._dynamo.reset()
    model = tiny_model(family, layers=4, window=8, seed=2)
    a = ModelAdapter(model)
    lens = [5, 12, 9]
    B, K, KV = len(lens), 3, 32
    g = torch.Generator().manual_seed(0)
    caches = []
    for _ in range(2):  # one cache for eager, one for compiled: same prefill
        cache = a.new_cache(KV + K + 2, batch=B)
        for b, n in enumerate(lens):
            ids = (torch.arange(n)[None] * (b + 3) + 7) % 200 + 3
            a.forward(ids, 0, cache.row(b))
        caches.append(cache)
    skip = [False, True, False, True]
    starts = torch.tensor(lens)

    def draft_step(cache, tok, starts):
        h, _ = a.forward(tok, starts, cache, skip=skip, kv_len=KV)
        return a.head(h)

    def verify_step(cache, ids, starts):
        h, _ = a.forward(ids, starts, cache, kv_len=KV)
        return a.head(h)

    tok = torch.randint(3, 200, (B, 1), generator=g)
    ids = torch.randint(3, 200, (B, K + 1), generator=g)
    draft_c = torch.compile(draft_step, fullgraph=True, backend="aot_eager")
    verify_c = torch.compile(verify_step, fullgraph=True, backend="aot_eager")
    for step in range(2):  # a second round at other positions replays the same graph
        s = starts + step * (K + 1)
        want = [draft_step(caches[0], tok, s), verify_step(caches[0], ids, s)]
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            got = [draft_c(caches[1], tok, s), verify_c(caches[1], ids, s)]
        for w, x in zip(want, got, strict=True):
            torch.testing.assert_close(x, w, rtol=1e-5, atol=1e-5)
    # and the second verify is the model's own forward on each row: its prompt, then the first
    # round's verified tokens, then the second's (the draft's writes were overwritten)
    for b, n in enumerate(lens):
        prompt = (torch.arange(n)[None] * (b + 3) + 7) % 200 + 3
        seq = torch.cat([prompt, ids[b : b + 1], ids[b : b + 1]], 1)
        ref = model(input_ids=seq).logits[0, -(K + 1) :]
        torch.testing.assert_close(want[1][b], ref, rtol=1e-4, atol=1e-4)

    for k0, k1 in zip(caches[0].keys, caches[1].keys, strict=True):
        torch.testing.assert_close(k1, k0, rtol=1e-5, atol=1e-5)
