"""Every input validation of csrc/op_checks.cpp (and the value checks of the CPU verify kernels)
raises RuntimeError naming the argument, the expected and the actual value."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import HAS_CUDA

import clasp_ext

F32, F16, F64 = torch.float32, torch.float16, torch.float64
I32, I64, U8 = torch.int32, torch.int64, torch.uint8


def _t(*shape, dtype=F32, device="cpu"):
    if dtype.is_floating_point:
        return torch.randn(*shape, device=device).to(dtype)
    return torch.zeros(*shape, dtype=dtype, device=device)


def _last_dim_strided(*shape, dtype=F32, device="cpu"):
    return _t(*shape[:-1], 2 * shape[-1], dtype=dtype, device=device)[..., ::2]


# ---- valid inputs, then one defect per case ----------------------------------------------------
# Each builder takes the device and overrides, and returns the op's arguments.


def cos_args(dev, candidates=None, target=None):
    return (
        _t(2, 3, 4, device=dev) if candidates is None else candidates,
        _t(2, 4, device=dev) if target is None else target,
    )


def imp_args(dev, hidden=None):
    return (_t(2, 5, 4, device=dev) if hidden is None else hidden,)


def step_args(dev, prev=None, computed=None, target=None, layer=4):
    # M = 3, layer = 4 -> l = 3 keep candidates
    return (
        _t(2, 4, 8, device=dev) if prev is None else prev,
        _t(2, 3, 8, device=dev) if computed is None else computed,
        _t(2, 8, device=dev) if target is None else target,
        layer,
    )


def back_args(dev, choices=None, num_skip=2):
    return (_t(2, 6, 4, dtype=U8, device=dev) if choices is None else choices, num_skip)


def greedy_args(dev, draft_tokens=None, num_draft=None, target_logits=None, seq_lens=None):
    # B = 2, K = 3, V = 10
    return (
        _t(2, 3, dtype=I64, device=dev) if draft_tokens is None else draft_tokens,
        _t(2, dtype=I32, device=dev) if num_draft is None else num_draft,
        _t(2, 4, 10, device=dev) if target_logits is None else target_logits,
        _t(2, dtype=I32, device=dev) if seq_lens is None else seq_lens,
    )


def sample_args(
    dev,
    draft_tokens=None,
    num_draft=None,
    draft_probs=None,
    target_probs=None,
    uniforms=None,
    seq_lens=None,
):
    return (
        _t(2, 3, dtype=I64, device=dev) if draft_tokens is None else draft_tokens,
        _t(2, dtype=I32, device=dev) if num_draft is None else num_draft,
        _t(2, 3, 10, device=dev).abs() if draft_probs is None else draft_probs,
        _t(2, 4, 10, device=dev).abs() if target_probs is None else target_probs,
        torch.rand(2, 4, 2, device=dev) if uniforms is None else uniforms,
        _t(2, dtype=I32, device=dev) if seq_lens is None else seq_lens,
    )


OPS = {
    "cosine_scores": (clasp_ext.cosine_scores, cos_args),
    "layer_importance": (clasp_ext.layer_importance, imp_args),
    "skip_search_step": (clasp_ext.skip_search_step, step_args),
    "skip_search_backtrack": (clasp_ext.skip_search_backtrack, back_args),
    "verify_greedy": (clasp_ext.verify_greedy, greedy_args),
    "verify_sample": (clasp_ext.verify_sample, sample_args),
}

# (op, overrides(device) -> dict, the message (a literal substring)); ids are generated.
CASES = [
    # cosine_scores
    (
        "cosine_scores",
        lambda d: {"candidates": _t(2, 4, device=d)},
        "`candidates` must have rank 3, got shape [2, 4]",
    ),
    (
        "cosine_scores",
        lambda d: {"target": _t(2, 1, 4, device=d)},
        "`target` must have rank 2, got shape [2, 1, 4]",
    ),
    (
        "cosine_scores",
        lambda d: {
            "candidates": _t(2, 3, 4, dtype=F64, device=d),
            "target": _t(2, 4, dtype=F64, device=d),
        },
        "`candidates` must be float32, float16 or bfloat16, got Double",
    ),
    (
        "cosine_scores",
        lambda d: {"candidates": _t(2, 3, 4, dtype=I64, device=d)},
        "`candidates` must be float32, float16 or bfloat16, got Long",
    ),
    (
        "cosine_scores",
        lambda d: {"candidates": _last_dim_strided(2, 3, 4, device=d)},
        "`candidates` must have a unit-stride last dimension (strides [24, 8, 2])",
    ),
    (
        "cosine_scores",
        lambda d: {"target": _t(4, 2, device=d).t()},
        "`target` must have a unit-stride last dimension (strides [1, 2])",
    ),
    (
        "cosine_scores",
        lambda d: {"target": _t(2, 4, dtype=F16, device=d)},
        "`target` must have the dtype of `candidates` (Float), got Half",
    ),
    (
        "cosine_scores",
        lambda d: {"target": _t(3, 4, device=d)},
        "`target`.size(0) must be 2 (batch size B of `candidates`), got shape [3, 4]",
    ),
    (
        "cosine_scores",
        lambda d: {"target": _t(2, 5, device=d)},
        "`target`.size(1) must be 4 (hidden size d of `candidates`), got shape [2, 5]",
    ),
    (
        "cosine_scores",
        lambda d: {"candidates": _t(2, 3, 0, device=d), "target": _t(2, 0, device=d)},
        "hidden size d must be positive, got shape [2, 3, 0]",
    ),
    # layer_importance
    (
        "layer_importance",
        lambda d: {"hidden": _t(5, 4, device=d)},
        "`hidden` must have rank 3, got shape [5, 4]",
    ),
    (
        "layer_importance",
        lambda d: {"hidden": _t(2, 5, 4, dtype=F64, device=d)},
        "`hidden` must be float32, float16 or bfloat16, got Double",
    ),
    (
        "layer_importance",
        lambda d: {"hidden": _last_dim_strided(2, 5, 4, device=d)},
        "`hidden` must have a unit-stride last dimension",
    ),
    (
        "layer_importance",
        lambda d: {"hidden": _t(2, 0, 4, device=d)},
        "`hidden` must hold L+1 >= 1 states [B, L+1, d], got shape [2, 0, 4]",
    ),
    (
        "layer_importance",
        lambda d: {"hidden": _t(2, 5, 0, device=d)},
        "hidden size d must be positive, got shape [2, 5, 0]",
    ),
    # skip_search_step
    (
        "skip_search_step",
        lambda d: {"prev": _t(4, 8, device=d)},
        "`prev` must have rank 3, got shape [4, 8]",
    ),
    (
        "skip_search_step",
        lambda d: {"computed": _t(3, 8, device=d)},
        "`computed` must have rank 3, got shape [3, 8]",
    ),
    (
        "skip_search_step",
        lambda d: {"target": _t(2, 1, 8, device=d)},
        "`target` must have rank 2, got shape [2, 1, 8]",
    ),
    (
        "skip_search_step",
        lambda d: {"prev": _t(2, 4, 8, dtype=F64, device=d)},
        "`prev` must be float32, float16 or bfloat16, got Double",
    ),
    (
        "skip_search_step",
        lambda d: {"computed": _t(2, 3, 8, dtype=I32, device=d)},
        "`computed` must be float32, float16 or bfloat16, got Int",
    ),
    (
        "skip_search_step",
        lambda d: {"target": _t(2, 8, dtype=F64, device=d)},
        "`target` must be float32, float16 or bfloat16, got Double",
    ),
    (
        "skip_search_step",
        lambda d: {"prev": _last_dim_strided(2, 4, 8, device=d)},
        "`prev` must have a unit-stride last dimension",
    ),
    (
        "skip_search_step",
        lambda d: {"computed": _last_dim_strided(2, 3, 8, device=d)},
        "`computed` must have a unit-stride last dimension",
    ),
    (
        "skip_search_step",
        lambda d: {"target": _last_dim_strided(2, 8, device=d)},
        "`target` must have a unit-stride last dimension",
    ),
    (
        "skip_search_step",
        lambda d: {"computed": _t(2, 3, 8, dtype=F16, device=d)},
        "`prev`, `computed` and `target` must share one dtype, got Float, Half and Float",
    ),
    (
        "skip_search_step",
        lambda d: {"target": _t(2, 8, dtype=torch.bfloat16, device=d)},
        "`prev`, `computed` and `target` must share one dtype, got Float, Float and BFloat16",
    ),
    (
        "skip_search_step",
        lambda d: {"prev": _t(2, 0, 8, device=d), "computed": _t(2, 0, 8, device=d)},
        "`prev` must hold M+1 >= 1 states [B, M+1, d], got shape [2, 0, 8]",
    ),
    (
        "skip_search_step",
        lambda d: {
            "prev": _t(2, 4, 0, device=d),
            "computed": _t(2, 3, 0, device=d),
            "target": _t(2, 0, device=d),
        },
        "hidden size d must be positive, got shape [2, 4, 0]",
    ),
    ("skip_search_step", lambda d: {"layer": -1}, "`layer` must be >= 0, got -1"),
    (
        "skip_search_step",
        lambda d: {"computed": _t(3, 3, 8, device=d)},
        "`computed`.size(0) must be 2 (batch size B of `prev`), got shape [3, 3, 8]",
    ),
    # computed rows l = min(layer, M): layer > M, layer < M, layer == 0, M == 0
    (
        "skip_search_step",
        lambda d: {"computed": _t(2, 4, 8, device=d)},
        "`computed`.size(1) must be 3 (l = min(layer, M) keep candidates, M = prev.size(1) - 1)",
    ),
    ("skip_search_step", lambda d: {"layer": 1}, "`computed`.size(1) must be 1 (l = min(layer, M)"),
    ("skip_search_step", lambda d: {"layer": 0}, "`computed`.size(1) must be 0 (l = min(layer, M)"),
    (
        "skip_search_step",
        lambda d: {"prev": _t(2, 1, 8, device=d), "layer": 9},
        "`computed`.size(1) must be 0 (l = min(layer, M)",
    ),
    (
        "skip_search_step",
        lambda d: {"computed": _t(2, 3, 7, device=d)},
        "`computed`.size(2) must be 8 (hidden size d of `prev`), got shape [2, 3, 7]",
    ),
    (
        "skip_search_step",
        lambda d: {"target": _t(1, 8, device=d)},
        "`target`.size(0) must be 2 (batch size B of `prev`), got shape [1, 8]",
    ),
    (
        "skip_search_step",
        lambda d: {"target": _t(2, 9, device=d)},
        "`target`.size(1) must be 8 (hidden size d of `prev`), got shape [2, 9]",
    ),
    # skip_search_backtrack
    (
        "skip_search_backtrack",
        lambda d: {"choices": _t(6, 4, dtype=U8, device=d)},
        "`choices` must have rank 3, got shape [6, 4]",
    ),
    (
        "skip_search_backtrack",
        lambda d: {"choices": _t(2, 6, 4, dtype=torch.bool, device=d)},
        "`choices` must be Byte, got Bool",
    ),
    (
        "skip_search_backtrack",
        lambda d: {"choices": _t(2, 6, 4, dtype=I64, device=d)},
        "`choices` must be Byte, got Long",
    ),
    (
        "skip_search_backtrack",
        lambda d: {"choices": _t(2, 6, 0, dtype=U8, device=d), "num_skip": 0},
        "`choices` must be [B, L, M+1] with M+1 >= 1, got shape [2, 6, 0]",
    ),
    (
        "skip_search_backtrack",
        lambda d: {"num_skip": 4},
        "`num_skip` must be in [0, M] with M = 3 (choices.size(2) - 1), got 4",
    ),
    (
        "skip_search_backtrack",
        lambda d: {"num_skip": -1},
        "`num_skip` must be in [0, M] with M = 3 (choices.size(2) - 1), got -1",
    ),
    (
        "skip_search_backtrack",
        lambda d: {"choices": _t(2, 2, 6, dtype=U8, device=d), "num_skip": 3},
        "`num_skip` must be <= L = 2 (number of layers, choices.size(1)), got 3",
    ),
]

# verify_greedy and verify_sample share the draft arguments' checks.
for _op in ("verify_greedy", "verify_sample"):
    CASES += [
        (
            _op,
            lambda d: {"draft_tokens": _t(2, 3, dtype=I32, device=d)},
            "`draft_tokens` must be Long, got Int",
        ),
        (
            _op,
            lambda d: {"draft_tokens": _t(2, 3, 1, dtype=I64, device=d)},
            "`draft_tokens` must have rank 2, got shape [2, 3, 1]",
        ),
        (
            _op,
            lambda d: {"num_draft": _t(2, dtype=I64, device=d)},
            "`num_draft` must be Int, got Long",
        ),
        (
            _op,
            lambda d: {"num_draft": _t(2, 1, dtype=I32, device=d)},
            "`num_draft` must have rank 1, got shape [2, 1]",
        ),
        (
            _op,
            lambda d: {"seq_lens": _t(2, dtype=I64, device=d)},
            "`seq_lens` must be Int, got Long",
        ),
        (
            _op,
            lambda d: {"seq_lens": _t(1, 2, dtype=I32, device=d)},
            "`seq_lens` must have rank 1, got shape [1, 2]",
        ),
        (
            _op,
            lambda d: {"num_draft": _t(3, dtype=I32, device=d)},
            "`num_draft`.size(0) must be 2 (batch size B of `draft_tokens`), got shape [3]",
        ),
        (
            _op,
            lambda d: {"seq_lens": _t(1, dtype=I32, device=d)},
            "`seq_lens`.size(0) must be 2 (batch size B of `draft_tokens`), got shape [1]",
        ),
    ]

CASES += [
    # verify_greedy
    (
        "verify_greedy",
        lambda d: {"target_logits": _t(2, 4, device=d)},
        "`target_logits` must have rank 3, got shape [2, 4]",
    ),
    (
        "verify_greedy",
        lambda d: {"target_logits": _t(2, 4, 10, dtype=F64, device=d)},
        "`target_logits` must be float32, float16 or bfloat16, got Double",
    ),
    (
        "verify_greedy",
        lambda d: {"target_logits": _last_dim_strided(2, 4, 10, device=d)},
        "`target_logits` must have a unit-stride last dimension (strides [80, 20, 2])",
    ),
    (
        "verify_greedy",
        lambda d: {"target_logits": _t(3, 4, 10, device=d)},
        "`target_logits`.size(0) must be 2 (batch size B of `draft_tokens`), got shape [3, 4, 10]",
    ),
    (
        "verify_greedy",
        lambda d: {"target_logits": _t(2, 3, 10, device=d)},
        "`target_logits`.size(1) must be 4 (K+1 positions, K = draft_tokens.size(1)),"
        " got shape [2, 3, 10]",
    ),
    (
        "verify_greedy",
        lambda d: {"target_logits": _t(2, 4, 0, device=d)},
        "vocabulary size V must be positive, got shape [2, 4, 0]",
    ),
    # verify_sample
    (
        "verify_sample",
        lambda d: {"draft_probs": _t(2, 3, device=d)},
        "`draft_probs` must have rank 3, got shape [2, 3]",
    ),
    (
        "verify_sample",
        lambda d: {"target_probs": _t(2, 4, device=d)},
        "`target_probs` must have rank 3, got shape [2, 4]",
    ),
    (
        "verify_sample",
        lambda d: {"draft_probs": _t(2, 3, 10, dtype=F64, device=d)},
        "`draft_probs` must be float32, float16 or bfloat16, got Double",
    ),
    (
        "verify_sample",
        lambda d: {"target_probs": _t(2, 4, 10, dtype=I64, device=d)},
        "`target_probs` must be float32, float16 or bfloat16, got Long",
    ),
    (
        "verify_sample",
        lambda d: {"draft_probs": _last_dim_strided(2, 3, 10, device=d)},
        "`draft_probs` must have a unit-stride last dimension",
    ),
    (
        "verify_sample",
        lambda d: {"target_probs": _last_dim_strided(2, 4, 10, device=d)},
        "`target_probs` must have a unit-stride last dimension",
    ),
    (
        "verify_sample",
        lambda d: {"uniforms": _t(2, 4, dtype=F32, device=d)},
        "`uniforms` must have rank 3, got shape [2, 4]",
    ),
    (
        "verify_sample",
        lambda d: {"uniforms": _t(2, 4, 2, dtype=F64, device=d)},
        "`uniforms` must be Float, got Double",
    ),
    (
        "verify_sample",
        lambda d: {"uniforms": _t(2, 4, 2, dtype=F16, device=d)},
        "`uniforms` must be Float, got Half",
    ),
    (
        "verify_sample",
        lambda d: {"draft_probs": _t(2, 3, 10, dtype=F16, device=d)},
        "`draft_probs` must have the dtype of `target_probs` (Float), got Half",
    ),
    (
        "verify_sample",
        lambda d: {"draft_probs": _t(2, 3, 0, device=d), "target_probs": _t(2, 4, 0, device=d)},
        "vocabulary size V must be positive, got shape [2, 4, 0]",
    ),
    (
        "verify_sample",
        lambda d: {"target_probs": _t(3, 4, 10, device=d)},
        "`target_probs`.size(0) must be 2 (batch size B of `draft_tokens`), got shape [3, 4, 10]",
    ),
    (
        "verify_sample",
        lambda d: {"target_probs": _t(2, 3, 10, device=d)},
        "`target_probs`.size(1) must be 4 (K+1 positions, K = draft_tokens.size(1)),"
        " got shape [2, 3, 10]",
    ),
    (
        "verify_sample",
        lambda d: {"draft_probs": _t(1, 3, 10, device=d)},
        "`draft_probs`.size(0) must be 2 (batch size B of `draft_tokens`), got shape [1, 3, 10]",
    ),
    (
        "verify_sample",
        lambda d: {"draft_probs": _t(2, 4, 10, device=d)},
        "`draft_probs`.size(1) must be 3 (K = draft_tokens.size(1)), got shape [2, 4, 10]",
    ),
    (
        "verify_sample",
        lambda d: {"draft_probs": _t(2, 3, 11, device=d)},
        "`draft_probs`.size(2) must be 10 (vocabulary size V of `target_probs`),"
        " got shape [2, 3, 11]",
    ),
    (
        "verify_sample",
        lambda d: {"uniforms": _t(3, 4, 2, device=d)},
        "`uniforms`.size(0) must be 2 (batch size B of `draft_tokens`), got shape [3, 4, 2]",
    ),
    (
        "verify_sample",
        lambda d: {"uniforms": _t(2, 3, 2, device=d)},
        "`uniforms`.size(1) must be 4 (K+1 positions, K = draft_tokens.size(1)),"
        " got shape [2, 3, 2]",
    ),
    (
        "verify_sample",
        lambda d: {"uniforms": _t(2, 4, 1, device=d)},
        "`uniforms`.size(2) must be 2 (one acceptance and one resampling draw),"
        " got shape [2, 4, 1]",
    ),
]


def _case_id(case) -> str:
    op, _, msg = case
    words = re.sub(r"[^A-Za-z0-9_.()]+", "-", msg)[:48].strip("-")
    return f"{op}:{words}"


def _call(name, device, overrides):
    fn, build = OPS[name]
    return fn(*build(device, **overrides))


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_invalid_input_raises(device, case):
    name, overrides, msg = case
    with pytest.raises(RuntimeError, match=re.escape(f"clasp::{name}: ") + ".*" + re.escape(msg)):
        _call(name, device, overrides(device))


@pytest.mark.parametrize("name", OPS)
def test_valid_baseline_inputs_pass(device, name):
    """The builders' defaults are valid, so each case above fails for its one defect only."""
    _call(name, device, {})


# ---- value checks of the CPU verify kernels (they read num_draft and tokens on the host) -------

VALUE_CASES = [
    (
        "verify_greedy",
        {"num_draft": torch.tensor([0, 4], dtype=I32)},
        "num_draft[1] = 4 is outside [0, K] with K = draft_tokens.size(1) = 3",
    ),
    (
        "verify_greedy",
        {"num_draft": torch.tensor([-1, 0], dtype=I32)},
        "num_draft[0] = -1 is outside [0, K] with K = draft_tokens.size(1) = 3",
    ),
    (
        "verify_sample",
        {"num_draft": torch.tensor([3, 7], dtype=I32)},
        "num_draft[1] = 7 is outside [0, K] with K = draft_tokens.size(1) = 3",
    ),
    (
        "verify_sample",
        {"num_draft": torch.tensor([-2, 0], dtype=I32)},
        "num_draft[0] = -2 is outside [0, K] with K = draft_tokens.size(1) = 3",
    ),
    (
        "verify_sample",
        {
            "draft_tokens": torch.tensor([[0, 10, 0], [0, 0, 0]]),
            "num_draft": torch.tensor([2, 3], dtype=I32),
        },
        "draft_tokens[0, 1] = 10 is outside the vocabulary [0, 10)",
    ),
    (
        "verify_sample",
        {
            "draft_tokens": torch.tensor([[0, 1, 2], [3, 4, -1]]),
            "num_draft": torch.tensor([3, 3], dtype=I32),
        },
        "draft_tokens[1, 2] = -1 is outside the vocabulary [0, 10)",
    ),
]


@pytest.mark.parametrize("case", VALUE_CASES, ids=[_case_id(c) for c in VALUE_CASES])
def test_invalid_values_raise_on_cpu(case):
    name, overrides, msg = case
    fn, build = OPS[name]
    args = build("cpu", **overrides)
    seq_lens = args[-1].clone()
    with pytest.raises(RuntimeError, match=re.escape(f"clasp::{name}: {msg}")):
        fn(*args)
    assert torch.equal(args[-1], seq_lens), "a rejected call must not touch seq_lens"


def test_tokens_past_num_draft_are_not_read():
    """Padding past num_draft (e.g. -1) is never read, so it is not an error."""
    drafts = torch.tensor([[4, -1, -1], [1, 2, 99]])
    num_draft = torch.tensor([1, 2], dtype=I32)
    acc, out = clasp_ext.verify_sample(*sample_args("cpu", drafts, num_draft))
    assert acc.shape == (2,) and (acc <= num_draft).all()
    acc, out = clasp_ext.verify_greedy(*greedy_args("cpu", drafts, num_draft))
    assert (acc <= num_draft).all()


# ---- mixed devices ----------------------------------------------------------------------------

MIXED = [
    (
        "cosine_scores",
        "target",
        "all tensors must be on one device; `candidates` is on cuda:0 but `target` is on cpu",
    ),
    ("skip_search_step", "computed", "`prev` is on cuda:0 but `computed` is on cpu"),
    ("skip_search_step", "target", "`prev` is on cuda:0 but `target` is on cpu"),
    ("verify_greedy", "draft_tokens", "`target_logits` is on cuda:0 but `draft_tokens` is on cpu"),
    ("verify_greedy", "seq_lens", "`target_logits` is on cuda:0 but `seq_lens` is on cpu"),
    ("verify_sample", "draft_probs", "`target_probs` is on cuda:0 but `draft_probs` is on cpu"),
    ("verify_sample", "uniforms", "`target_probs` is on cuda:0 but `uniforms` is on cpu"),
    ("verify_sample", "num_draft", "`target_probs` is on cuda:0 but `num_draft` is on cpu"),
]


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("name,arg,msg", MIXED, ids=[f"{m[0]}:{m[1]}" for m in MIXED])
def test_mixed_devices_raise(name, arg, msg):
    fn, build = OPS[name]
    cpu_value = build("cpu")[list(build.__code__.co_varnames[1:]).index(arg)]
    with pytest.raises(RuntimeError, match=re.escape(f"clasp::{name}: ") + ".*" + re.escape(msg)):
        fn(*build("cuda", **{arg: cpu_value}))
