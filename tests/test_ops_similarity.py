"""cosine_scores and layer_importance against clasp_ext.reference."""

from __future__ import annotations

import pytest
import torch
from helpers import LAYOUTS, assert_same_as_cpu_kernel, strided_rows, strided_view
from tolerances import FLOAT_DTYPES, assert_scores_close

import clasp_ext
from clasp_ext import reference

DIMS = (1, 7, 640, 1536, 4097)
# (B, n): single candidate, the largest n, batch > 1 with an odd n.
COSINE_SHAPES = ((1, 1), (1, 80), (3, 17))
# (B, L + 1): a single state (L = 0 layers), a deep stack, a batch.
HIDDEN_SHAPES = ((1, 1), (1, 80), (3, 33))


def _rand(shape, dtype, device):
    # Non-zero mean so cosines spread over (-1, 1) instead of clustering at 0.
    return (torch.randn(shape, device=device) + 0.3).to(dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("B,n", COSINE_SHAPES)
def test_cosine_scores_matches_reference(device, dtype, d, B, n):
    cand = _rand((B, n, d), dtype, device)
    target = _rand((B, d), dtype, device)
    out = clasp_ext.cosine_scores(cand, target)
    assert out.shape == (B, n) and out.dtype == torch.float32 and out.device == cand.device
    assert_scores_close(out, reference.cosine_scores(cand, target), "cosine", dtype)
    # The fp32 reference itself is within the table of the exact (fp64) cosine.
    assert_scores_close(out, reference.cosine_scores(cand, target, torch.float64), "cosine", dtype)
    assert_same_as_cpu_kernel(device, clasp_ext.cosine_scores, (cand, target), out, (0,))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("B,L1", HIDDEN_SHAPES)
def test_layer_importance_matches_reference(device, dtype, d, B, L1):
    hidden = _rand((B, L1, d), dtype, device)
    out = clasp_ext.layer_importance(hidden)
    assert out.shape == (B, L1 - 1) and out.dtype == torch.float32
    assert_scores_close(out, reference.layer_importance(hidden), "importance", dtype)
    assert_scores_close(out, reference.layer_importance(hidden, torch.float64), "importance", dtype)
    assert_same_as_cpu_kernel(device, clasp_ext.layer_importance, (hidden,), out, (0,))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("d", (1, 7, 1536))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cosine_scores_non_contiguous(device, dtype, d, layout):
    B, n = 3, 9
    cand = _rand((B, n, d), dtype, device)
    target = _rand((B, d), dtype, device)
    expected = clasp_ext.cosine_scores(cand, target)
    view, t_view = strided_view(cand, layout), strided_rows(target)
    assert not view.is_contiguous() and not t_view.is_contiguous()
    out = clasp_ext.cosine_scores(view, t_view)
    # The canonical reduction order does not depend on the strides: bitwise the same result.
    assert torch.equal(out, expected)
    assert_scores_close(out, reference.cosine_scores(view, t_view), "cosine", dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("d", (1, 7, 1536))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layer_importance_non_contiguous(device, dtype, d, layout):
    hidden = _rand((2, 6, d), dtype, device)
    expected = clasp_ext.layer_importance(hidden)
    view = strided_view(hidden, layout)
    assert not view.is_contiguous()
    out = clasp_ext.layer_importance(view)
    assert torch.equal(out, expected)
    assert_scores_close(out, reference.layer_importance(view), "importance", dtype)


def test_size_one_last_dim_may_have_any_stride(device):
    # d = 1 with stride 2: a unit-stride check is meaningless for one element, so it is accepted.
    cand = torch.randn(2, 3, 2, device=device)[..., ::2]
    target = torch.randn(2, 2, device=device)[:, ::2]
    assert cand.stride(-1) == 2 and target.stride(-1) == 2
    out = clasp_ext.cosine_scores(cand, target)
    assert_scores_close(out, reference.cosine_scores(cand, target), "cosine", torch.float32)
    # 1-d cosines are the signs of the products.
    torch.testing.assert_close(
        out, torch.sign(cand[..., 0] * target[:, None, 0]), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("d", (1, 640, 4097))
def test_zero_vectors_are_clamped(device, dtype, d):
    """Zero norms hit the 1e-8 clamp: cosine 0 (not NaN), importance 1."""
    cand = _rand((2, 4, d), dtype, device)
    cand[0, 1] = 0
    cand[1] = 0  # all candidates of sequence 1
    target = _rand((2, d), dtype, device)
    target[0] = 0  # every candidate of sequence 0 against a zero target
    out = clasp_ext.cosine_scores(cand, target)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert_scores_close(out, reference.cosine_scores(cand, target), "cosine", dtype)

    hidden = _rand((2, 5, d), dtype, device)
    hidden[0, 2] = 0  # layers 1 and 2 touch the zero state
    hidden[1] = 0
    imp = clasp_ext.layer_importance(hidden)
    assert torch.isfinite(imp).all()
    assert torch.equal(imp[0, 1:3].cpu(), torch.ones(2))
    assert torch.equal(imp[1].cpu(), torch.ones(4))
    assert_scores_close(imp, reference.layer_importance(hidden), "importance", dtype)


def test_exact_values(device):
    """Hand-checked cosines, so the reference is not the only oracle."""
    target = torch.tensor([[1.0, 0.0, 0.0]], device=device)
    cand = torch.tensor([[[2.0, 0, 0], [0, 3.0, 0], [-1.0, 0, 0], [1.0, 1.0, 0]]], device=device)
    out = clasp_ext.cosine_scores(cand, target).cpu()
    expected = torch.tensor([[1.0, 0.0, -1.0, 2**-0.5]])
    torch.testing.assert_close(out, expected, atol=1e-7, rtol=0)
    hidden = torch.tensor([[[1.0, 0], [5.0, 0], [0, 2.0], [0, -1.0]]], device=device)
    imp = clasp_ext.layer_importance(hidden).cpu()
    torch.testing.assert_close(imp, torch.tensor([[0.0, 1.0, 2.0]]), atol=1e-7, rtol=0)


def test_empty_batch_and_candidates(device):
    assert clasp_ext.cosine_scores(
        torch.randn(0, 3, 8, device=device), torch.randn(0, 8, device=device)
    ).shape == (0, 3)
    assert clasp_ext.cosine_scores(
        torch.randn(2, 0, 8, device=device), torch.randn(2, 8, device=device)
    ).shape == (2, 0)
    assert clasp_ext.layer_importance(torch.randn(2, 1, 8, device=device)).shape == (2, 0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_deterministic(device, dtype):
    """Two calls on the same inputs are bitwise equal (no order-dependent parallel reduction)."""
    cand = _rand((4, 80, 4097), dtype, device)
    target = _rand((4, 4097), dtype, device)
    a = clasp_ext.cosine_scores(cand, target)
    b = clasp_ext.cosine_scores(cand, target)
    assert torch.equal(a, b)
    hidden = _rand((4, 41, 4097), dtype, device)
    assert torch.equal(clasp_ext.layer_importance(hidden), clasp_ext.layer_importance(hidden))
