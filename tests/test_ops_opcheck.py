"""torch.library.opcheck on every op, and each op under torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch

import clasp_ext
from clasp_ext.ops import OP_NAMES


def _inputs(name: str, device: str, dtype=torch.float32):
    """Representative (args) for each op, small enough for opcheck's repeated runs."""
    B, d = 2, 33

    def f(*shape):
        return torch.randn(*shape, device=device).to(dtype)

    if name == "cosine_scores":
        return (f(B, 5, d), f(B, d))
    if name == "layer_importance":
        return (f(B, 7, d),)
    if name == "skip_search_step":
        M, layer = 3, 4
        return (f(B, M + 1, d), f(B, min(layer, M), d), f(B, d), layer)
    if name == "skip_search_backtrack":
        choices = torch.randint(0, 2, (B, 6, 4), dtype=torch.uint8, device=device)
        return (choices, 3)
    K, V = 3, 50
    draft = torch.randint(0, V, (B, K), device=device)
    num_draft = torch.tensor([K, 1], dtype=torch.int32, device=device)
    seq_lens = torch.tensor([10, 20], dtype=torch.int32, device=device)
    if name == "verify_greedy":
        logits = f(B, K + 1, V)
        draft[0] = logits[0, :K].float().argmax(-1)  # one fully accepted row
        return (draft, num_draft, logits, seq_lens)
    if name == "verify_sample":
        q = torch.softmax(f(B, K, V).float(), -1).to(dtype)
        p = torch.softmax(f(B, K + 1, V).float(), -1).to(dtype)
        return (draft, num_draft, q, p, torch.rand(B, K + 1, 2, device=device), seq_lens)
    raise ValueError(name)


def _clone(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        a, b = (a,), (b,)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", OP_NAMES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_opcheck(device, name, dtype):
    op = getattr(torch.ops.clasp, name).default
    # schema (incl. the declared seq_lens mutation), fake tensor, autograd registration and AOT
    # dispatch (static and dynamic shapes).
    torch.library.opcheck(op, _inputs(name, device, dtype))


@pytest.mark.parametrize("name", OP_NAMES)
def test_torch_compile_fullgraph(device, name):
    """One compiled graph calling the op (through the typed wrapper) and consuming its outputs;
    aot_eager exercises the fakes and the functionalisation of the in-place seq_lens update."""
    fn = getattr(clasp_ext, name)
    args = _inputs(name, device)

    def graph(*a):
        out = fn(*a)
        outs = (out,) if isinstance(out, torch.Tensor) else out
        return outs, tuple(o.shape[-1] for o in outs)  # shapes come from the fake

    compiled = torch.compile(graph, fullgraph=True, backend="aot_eager", dynamic=False)
    eager_args, compiled_args = _clone(args), _clone(args)
    eager_out, eager_shapes = graph(*eager_args)
    comp_out, comp_shapes = compiled(*compiled_args)
    _assert_same(eager_out, comp_out)
    assert eager_shapes == comp_shapes
    # In-place mutations (seq_lens of the verify ops) happen under compile too.
    for e, c in zip(eager_args, compiled_args, strict=True):
        if isinstance(e, torch.Tensor):
            assert torch.equal(e, c)
    if name.startswith("verify_"):
        assert not torch.equal(compiled_args[-1], args[-1]), "seq_lens was not updated"
