"""The batched loop on static buffers (cuda_graphs.py), checked on the CPU without capture: what a
CUDA graph would replay (the same functions, buffers and data flow) gives every row's
``model.generate`` output, keeps the round's tensors at their shapes and addresses from round to
round, replays any skip set from the per-layer steps without re-capturing them, and each captured
function is one graph for ``torch.compile(fullgraph=True)``. The capture itself needs a GPU:
tests/test_decoding_cuda.py and bench/gpu_check.sh run it there."""

from __future__ import annotations

import pytest
import torch
from decoding_models import FAMILIES, tiny_model
from test_decoding_batch import FLAT, hf_alone, prompts_for
from test_decoding_greedy import assert_lossless

from clasp_ext.decoding import BatchDecoder, ClaspConfig, ClaspDecoder, generate
from clasp_ext.decoding.cuda_graphs import GraphedSteps, batch_bucket, kv_bucket, verify_lengths

torch.set_num_threads(1)


def static_decoder(model, **kw) -> BatchDecoder:
    """A BatchDecoder whose rounds run on GraphedSteps without capture (what cuda_graphs=True
    builds on a GPU, with capture=True)."""
    dec = BatchDecoder(model, **kw)
    dec.graphs = dec.graphed_steps(capture=False)
    return dec


def test_buckets():
    assert verify_lengths(1) == [1]
    assert verify_lengths(9) == [1, 2, 3, 4, 6, 8, 9]
    assert verify_lengths(17)[-2:] == [16, 17]
    assert max(verify_lengths(200)) == 200
    assert [batch_bucket(b, 8) for b in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert batch_bucket(5, 6) == 6
    assert [kv_bucket(n, 2048) for n in (1, 256, 257, 1000, 2048)] == [256, 256, 512, 1024, 2048]
    assert kv_bucket(300, 300) == 300 and kv_bucket(10, 96) == 96


@pytest.mark.parametrize("policy", ("fixed", "cost"))
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_static_rounds_equal_generate(family, policy):
    """6 requests through 3 rows (rows join and leave, so B changes), lookup and layer-skip
    drafts: every row equals model.generate on its prompt alone, and the same tokens as the eager
    rounds."""
    model = tiny_model(family, layers=6, window=8, seed=3)
    prompts = prompts_for(7, 6)
    lengths = [20, 5, 28, 1, 16, 24]
    runs = []
    for static in (False, True):
        make = static_decoder if static else BatchDecoder
        dec = make(
            model, max_batch=3, policy=policy, num_skip_layers=2, max_cache_len=96, cost_tables=FLAT
        )
        for p, n in zip(prompts, lengths, strict=True):
            dec.add(torch.tensor(p), max_new_tokens=n)
        runs.append(dec.run())
        assert dec.stats.draft_steps > 0 and dec.stats.layer_skip_rounds > 0
    eager, static = runs
    assert [f.tokens for f in static] == [f.tokens for f in eager]
    for f, p, n in zip(static, prompts, lengths, strict=True):
        assert_lossless(model, f.tokens, hf_alone(model, p, n), len(p))
    assert dec.stats.graphs_captured == 0  # nothing captured without a GPU


@torch.no_grad()
def test_round_tensors_keep_shapes_and_addresses():
    """Every tensor a replay reads or writes outside the cache keeps its shape and address from
    round to round; a step (one per batch size and layer / verify length) is built once and
    replayed after; a new skip set replays the layers it shares with the old one and adds only
    its new layers (no re-capture)."""
    model = tiny_model("qwen2", layers=6, seed=3)
    dec = static_decoder(
        model, max_batch=2, policy="fixed", skip_strategy=[1, 2], max_cache_len=128, max_draft=3
    )
    for p in prompts_for(3, 2):
        dec.add(torch.tensor(p), max_new_tokens=40)
    g = dec.graphs
    seen: dict[str, tuple] = {}
    steps: dict[tuple, object] = {}
    rounds = 0

    def check():
        for name, t in g.buffers().items():
            now = (tuple(t.shape), t.data_ptr(), t.dtype)
            assert seen.setdefault(name, now) == now, name
        for key, step in g.steps.items():
            assert steps.setdefault(key, step) is step, key

    while rounds < 6:
        dec.step()
        check()
        rounds += 1
    layers = {k[3] for k in g.steps if k[0] == "layer"}
    assert {k[1] for k in g.steps} == {2}  # B = 2 (no row left yet)
    assert layers == {0, 3, 4, 5}
    before = dict(g.steps)
    dec.skip = [False, False, False, True, True, False]  # a new skip set, mid-run
    while not dec.idle:
        dec.step()
        check()
    new = set(g.steps) - set(before)
    assert {k[3] for k in new if k[0] == "layer"} <= {1, 2}  # only the newly kept layers
    assert all(g.steps[k] is before[k] for k in before)
    assert g.replays > len(g.steps)


@pytest.mark.parametrize("family", ("llama", "gemma3"))
@torch.no_grad()
def test_captured_functions_compile_fullgraph(family):
    """The functions GraphedSteps captures (a draft step's inputs, one decoder layer, a padded
    verify) are each one graph (torch.compile fullgraph=True) and give what the eager ones give,
    in a second round at other positions without recompiling."""
    torch._dynamo.reset()
    model = tiny_model(family, layers=3, window=8, seed=2)
    dec = BatchDecoder(model, max_batch=2, policy="fixed", num_skip_layers=1, max_cache_len=64)
    for p in ([5, 9, 11, 4, 7], [8, 3, 3, 9, 12, 40, 6, 2, 9]):
        dec.add(torch.tensor(p), max_new_tokens=8)
    dec.step()  # both rows prefilled
    g = GraphedSteps(dec.adapter, dec.cache, 2, 5, capture=False)
    g.ids[:2] = torch.randint(3, 200, (2, 5), generator=torch.Generator().manual_seed(0))
    for step in range(2):
        g.starts[:2] = dec._lens[:2] + 5 * step
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            want_v = g.verify_fn(2, 64, 5)().clone()
            got_v = torch.compile(g.verify_fn(2, 64, 5), fullgraph=True, backend="aot_eager")()
            torch.testing.assert_close(got_v, want_v, rtol=1e-5, atol=1e-5)
            g.hidden.zero_()
            inputs = g.inputs_fn(2, 64)()
            compiled_inputs = torch.compile(g.inputs_fn(2, 64), fullgraph=True, backend="aot_eager")
            for x, y in zip(compiled_inputs()[:1], inputs[:1], strict=True):
                torch.testing.assert_close(x, y)
            h0 = g.hidden.clone()
            g.layer_fn(2, 64, 0, inputs)()
            want_h = g.hidden.clone()
            g.hidden.copy_(h0)
            torch.compile(g.layer_fn(2, 64, 0, inputs), fullgraph=True, backend="aot_eager")()
            torch.testing.assert_close(g.hidden, want_h, rtol=1e-5, atol=1e-5)


def test_cuda_graphs_refused_where_they_cannot_run():
    model = tiny_model("llama", layers=2, seed=0)
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        BatchDecoder(model, cuda_graphs=True)
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        generate(model, torch.tensor([[5, 6, 7]]), cuda_graphs=True, max_new_tokens=2)
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        ClaspDecoder(model, cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs must be True or False"):
        BatchDecoder(model, ClaspConfig(cuda_graphs=1))


@torch.no_grad()
def test_graphed_steps_refuse_what_they_cannot_replay():
    model = tiny_model("llama", layers=2, seed=0)
    dec = BatchDecoder(model, max_batch=1, max_cache_len=32, policy="fixed")
    g = GraphedSteps(dec.adapter, dec.cache, 1, 8, capture=False)
    starts = torch.zeros(1, dtype=torch.int32)
    ids = torch.zeros(1, 9, dtype=torch.long)
    with pytest.raises(ValueError, match="longer than the graphs' 8"):
        g.forward(ids, starts, dec.cache, kv_len=9)
    with pytest.raises(ValueError, match="1 token per row"):
        g.forward(ids[:, :2], starts, dec.cache, skip=[False, True], kv_len=2)
    with pytest.raises(ValueError, match="its own cache"):
        g.forward(ids[:, :1], starts, dec.adapter.new_cache(8, batch=1), kv_len=1)
    with pytest.raises(ValueError, match="kv_len"):
        g.forward(ids[:, :1], starts, dec.cache)
    # a verify of 5 tokens pads to 6: slot 33 of 32 would be written
    with pytest.raises(RuntimeError, match="KV cache overflow"):
        g.forward(ids[:, :5], starts + 27, dec.cache, kv_len=32)
    dec.adapter.rotary_emb.rope_type = "dynamic"
    with pytest.raises(ValueError, match="cannot capture 'dynamic' rotary"):
        GraphedSteps(dec.adapter, dec.cache, 1, 4, capture=False)
