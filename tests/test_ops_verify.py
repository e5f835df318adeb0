"""verify_greedy and verify_sample: against the reference, edge cases, and the statistics of
speculative sampling (the emitted tokens must follow the target distribution p)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_same_as_cpu_kernel, to_cpu
from tolerances import FLOAT_DTYPES

import clasp_ext
from clasp_ext import reference

ONE_MINUS = float(torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)))  # largest float32 < 1


def _int32(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


# ---- verify_greedy ------------------------------------------------------------------------------


def _run_greedy(draft_tokens, num_draft, logits, seq_lens, device="cpu"):
    """Runs the op and the reference, checks every output exactly, returns the op's outputs."""
    lens = seq_lens.clone()
    accepted, out = clasp_ext.verify_greedy(draft_tokens, num_draft, logits, lens)
    r_acc, r_out, r_lens = reference.verify_greedy(draft_tokens, num_draft, logits, seq_lens)
    B, K = draft_tokens.shape
    assert accepted.dtype == torch.int32 and accepted.shape == (B,)
    assert out.dtype == torch.int64 and out.shape == (B, K + 1)
    assert torch.equal(accepted, r_acc)
    assert torch.equal(out, r_out)
    assert torch.equal(lens, r_lens), "seq_lens must be updated in place by accepted + 1"
    assert torch.equal(lens, seq_lens + accepted + 1)
    assert_same_as_cpu_kernel(
        device,
        clasp_ext.verify_greedy,
        (draft_tokens, num_draft, logits, seq_lens.clone()),
        (accepted, out),
        (0, 1),
    )
    return accepted, out


def _greedy_case(B, K, V, dtype, device):
    logits = torch.randn(B, K + 1, V, device=device).to(dtype)
    y = logits.float().argmax(dim=-1)
    drafts = y[:, :K].clone()
    # A random first mismatch per row (K = none), and random tokens after it.
    first_wrong = torch.randint(0, K + 1, (B,), device=device)
    pos = torch.arange(K, device=device)
    noise = torch.randint(1, max(V, 2), (B, K), device=device)
    wrong = (drafts + noise) % V if V > 1 else drafts
    after = pos[None] > first_wrong[:, None]
    drafts = torch.where(pos[None] == first_wrong[:, None], wrong, drafts)
    drafts = torch.where(after & (torch.rand(B, K, device=device) < 0.5), wrong, drafts)
    num_draft = torch.randint(0, K + 1, (B,), dtype=torch.int32, device=device)
    num_draft[0] = K
    seq_lens = torch.randint(0, 4096, (B,), dtype=torch.int32, device=device)
    return drafts, num_draft, logits, seq_lens


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize(
    "B,K,V",
    (
        (1, 0, 1),
        (3, 0, 50),
        (4, 1, 7),
        (6, 5, 1000),
        (8, 16, 32000),
        (2, 3, 262144),
        (1, 7, 100003),
    ),
)
def test_verify_greedy_matches_reference(device, dtype, B, K, V):
    args = _greedy_case(B, K, V, dtype, device)
    _run_greedy(*args, device=device)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_verify_greedy_full_and_zero_acceptance(device, dtype):
    B, K, V = 3, 5, 300
    logits = torch.randn(B, K + 1, V, device=device).to(dtype)
    y = logits.float().argmax(dim=-1)
    drafts = y[:, :K].clone()
    seq_lens = _int32([10, 20, 30], device)
    acc, out = _run_greedy(drafts, _int32([K, 0, 2], device), logits, seq_lens, device)
    assert acc.tolist() == [K, 0, 2]
    assert torch.equal(out[0], y[0])  # all drafts, then the bonus token
    assert out[1].tolist() == [y[1, 0].item()] + [-1] * K  # num_draft = 0: the target's token
    assert out[2].tolist() == y[2, :3].tolist() + [-1] * (K - 2)


def test_verify_greedy_out_of_vocabulary_drafts_are_rejected(device):
    logits = torch.randn(2, 3, 10, device=device)
    drafts = torch.tensor([[-1, 0], [10, 5]], device=device)
    acc, out = _run_greedy(drafts, _int32([2, 2], device), logits, _int32([0, 0], device), device)
    assert acc.tolist() == [0, 0]


def _argmax_cases(V, dtype, device):
    """Rows of [R, V] logits with ties, NaNs and infinities; expected argmax per row."""
    rows, expected = [], []

    def row(setup, want):
        x = torch.randn(V, device=device).clamp(-3, 3)
        setup(x)
        rows.append(x)
        expected.append(want)

    def put(idx, value):
        def f(x):
            x[list(idx)] = value

        return f

    row(put((9, 5, 2), 10.0), 2)  # ties: lowest index wins
    row(put((40000, 65540, 33000), 10.0), 33000)  # ties across vocabulary chunks
    row(put((100, 40000), 10.0), 100)
    row(put((7, 3), float("nan")), 3)  # NaN is the largest value; first NaN wins
    row(lambda x: (put((50000,), float("nan"))(x), put((0,), 1e4)(x)), 50000)
    row(put((60000, 35000), float("nan")), 35000)
    row(lambda x: x.fill_(float("-inf")), 0)  # all -inf: first index
    row(put((69999, 12), float("inf")), 12)
    row(lambda x: x.fill_(1.0), 0)  # constant row
    logits = torch.stack(rows).to(dtype)
    return logits, expected


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_verify_greedy_argmax_ties_and_nan(device, dtype):
    V = 70000
    logits, expected = _argmax_cases(V, dtype, device)
    R = logits.shape[0]
    # K = 0: the emitted token is the argmax of position 0.
    _, out = _run_greedy(
        torch.zeros(R, 0, dtype=torch.long, device=device),
        torch.zeros(R, dtype=torch.int32, device=device),
        logits[:, None],
        torch.zeros(R, dtype=torch.int32, device=device),
        device,
    )
    assert out[:, 0].tolist() == expected
    # The same rows as position 1 behind an accepted draft (argmax of position 0 drafted).
    two = torch.stack([logits.roll(1, dims=0), logits], dim=1)
    drafts = two[:, 0].float().argmax(dim=-1, keepdim=True)
    acc, out = _run_greedy(
        drafts,
        torch.ones(R, dtype=torch.int32, device=device),
        two,
        torch.zeros(R, dtype=torch.int32, device=device),
        device,
    )
    assert acc.tolist() == [1] * R
    assert out[:, 1].tolist() == expected


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_verify_greedy_non_contiguous(device, dtype):
    B, K, V = 4, 3, 999
    drafts, num_draft, logits, seq_lens = _greedy_case(B, K, V, dtype, device)
    big = torch.randn(2 * B, K + 1, V + 3, device=device).to(dtype)
    big[::2, :, :V] = logits
    logits_v = big[::2, :, :V]  # strided batch and rows
    drafts_v = drafts.t().contiguous().t()  # column-major [B, K]
    nd_big = torch.zeros(2 * B, dtype=torch.int32, device=device)
    nd_big[1::2] = num_draft
    lens_big = torch.zeros(2 * B, dtype=torch.int32, device=device)
    lens_big[1::2] = seq_lens
    lens_v = lens_big[1::2]
    assert not logits_v.is_contiguous() and (K < 2 or not drafts_v.is_contiguous())
    acc, out = clasp_ext.verify_greedy(drafts_v, nd_big[1::2], logits_v, lens_v)
    r_acc, r_out, r_lens = reference.verify_greedy(drafts, num_draft, logits, seq_lens)
    assert torch.equal(acc, r_acc) and torch.equal(out, r_out)
    assert torch.equal(lens_big[1::2], r_lens)  # the view's storage was updated
    assert (lens_big[::2] == 0).all()  # ... and nothing else


# ---- verify_sample: against the reference ---------------------------------------------------


def _probs(shape, device, sharp=2.0, zero_frac=0.0):
    x = torch.randn(shape, device=device) * sharp
    if zero_frac:
        x = x.masked_fill(torch.rand(shape, device=device) < zero_frac, float("-inf"))
        x[..., 0] = x[..., 0].clamp_min(0)  # at least one entry with mass per row
    return torch.softmax(x, dim=-1)


def _sample_case(B, K, V, dtype, device, zero_frac=0.0):
    q = _probs((B, K, V), device, zero_frac=zero_frac)
    p = _probs((B, K + 1, V), device, zero_frac=zero_frac)
    if K > 0:
        drafts = torch.multinomial(q.reshape(-1, V), 1).reshape(B, K)
    else:
        drafts = torch.zeros(B, 0, dtype=torch.long, device=device)
    # Random num_draft per row; row 0 uses all K drafts.
    num_draft = torch.randint(0, K + 1, (B,), dtype=torch.int32, device=device)
    num_draft[0] = K
    uniforms = torch.rand(B, K + 1, 2, device=device)
    seq_lens = torch.randint(0, 4096, (B,), dtype=torch.int32, device=device)
    return drafts, num_draft, q.to(dtype), p.to(dtype), uniforms, seq_lens


def _run_sample(drafts, num_draft, q, p, uniforms, seq_lens, device="cpu"):
    """Runs the op and the exact-order reference (the kernels' float32 summation order, so every
    discrete output must be equal). Returns (accepted, out_tokens)."""
    lens = seq_lens.clone()
    acc, out = clasp_ext.verify_sample(drafts, num_draft, q, p, uniforms, lens)
    cpu_args = [to_cpu(t) for t in (drafts, num_draft, q, p, uniforms, seq_lens)]
    r_acc, r_out, r_lens = reference.verify_sample(*cpu_args, exact_order=True)
    B, K = drafts.shape
    assert acc.dtype == torch.int32 and acc.shape == (B,)
    assert out.dtype == torch.int64 and out.shape == (B, K + 1)
    assert torch.equal(to_cpu(acc), r_acc), "acceptance decisions differ from the reference"
    assert torch.equal(to_cpu(out), r_out), "emitted tokens differ from the reference"
    assert torch.equal(to_cpu(lens), r_lens) and torch.equal(lens, seq_lens + acc + 1)
    assert_same_as_cpu_kernel(
        device,
        clasp_ext.verify_sample,
        (drafts, num_draft, q, p, uniforms, seq_lens.clone()),
        (acc, out),
        (0, 1),
    )
    return acc, out


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize(
    "B,K,V,zero_frac",
    (
        (1, 0, 1, 0.0),
        (5, 0, 64, 0.0),
        (64, 1, 7, 0.3),
        (64, 4, 1000, 0.5),
        (16, 8, 32000, 0.0),
        (2, 3, 262144, 0.0),
        (3, 16, 5000, 0.9),
    ),
)
def test_verify_sample_matches_reference(device, dtype, B, K, V, zero_frac):
    acc, out = _run_sample(*_sample_case(B, K, V, dtype, device, zero_frac), device)
    assert (out[torch.arange(B), acc.long()] >= 0).all() and (out < V).all()


def test_verify_sample_float64_reference_agrees_off_boundaries():
    """The plain float64 reference (the benchmark baseline) differs from the kernels only where a
    threshold sits within float32 rounding of a CDF boundary: rare at a large vocabulary."""
    B, K, V = 64, 4, 32000
    args = _sample_case(B, K, V, torch.float32, "cpu")
    acc, out = clasp_ext.verify_sample(*args[:5], args[5].clone())
    r_acc, r_out, _ = reference.verify_sample(*args)
    assert torch.equal(acc, r_acc)
    assert (out != r_out).any(dim=1).float().mean() <= 0.05


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_verify_sample_non_contiguous(device, dtype):
    B, K, V = 6, 3, 777
    drafts, num_draft, q, p, uniforms, seq_lens = _sample_case(B, K, V, dtype, device)
    q_big = torch.rand(B, K, V + 5, device=device).to(dtype)
    q_big[..., :V] = q
    p_big = torch.rand(2 * B, K + 1, V, device=device).to(dtype)
    p_big[::2] = p
    u_big = torch.rand(B, K + 1, 4, device=device)
    u_big[..., ::2] = uniforms
    lens_big = torch.zeros(B, 2, dtype=torch.int32, device=device)
    lens_big[:, 0] = seq_lens
    args = (drafts.t().contiguous().t(), num_draft, q_big[..., :V], p_big[::2], u_big[..., ::2])
    acc, out = clasp_ext.verify_sample(*args, lens_big[:, 0])
    e_acc, e_out = clasp_ext.verify_sample(drafts, num_draft, q, p, uniforms, seq_lens.clone())
    assert torch.equal(acc, e_acc) and torch.equal(out, e_out)
    assert torch.equal(lens_big[:, 0], seq_lens + acc + 1) and (lens_big[:, 1] == 0).all()
    _run_sample(drafts, num_draft, q, p, uniforms, seq_lens, device)


# ---- verify_sample: edge cases ------------------------------------------------------------------


def test_verify_sample_uniform_zero(device):
    """u = 0 accepts every draft the target gives mass (0 * q < p) and draws the first entry
    with positive mass."""
    B, K, V = 4, 3, 50
    drafts, num_draft, q, p, _, seq_lens = _sample_case(B, K, V, torch.float32, device)
    p[:, :, :5] = 0  # first entries without mass: the draw must skip them
    p[1, 1, drafts[1, 1]] = 0  # ... and one draft the target rejects whatever u
    num_draft[:] = K
    uniforms = torch.zeros(B, K + 1, 2, device=device)
    acc, out = _run_sample(drafts, num_draft, q, p, uniforms, seq_lens, device)
    for b in range(B):
        a = int(acc[b])
        zero = (p[b, :K].gather(1, drafts[b, :, None])[:, 0] == 0).nonzero()
        assert a == (int(zero[0]) if len(zero) else K)
        mass = (p[b, a] - q[b, a]).clamp_min(0) if a < K else p[b, a]
        assert int(out[b, a]) == int((mass > 0).nonzero()[0])


def test_verify_sample_uniform_near_one(device):
    """u = 1 - 2^-24: q = p still accepts (u * q < q), p slightly below q rejects, and the draw
    takes the last entry with positive mass."""
    B, K, V = 4, 2, 40
    p = _probs((B, K + 1, V), device)
    p[:, :, -4:] = 0
    q = p[:, :K].clone()
    # Row 3, position 1: a different draft distribution; its draft is the token with the largest
    # q / p, so it is rejected at u ~ 1 and the residual max(0, p - q) has mass.
    q[3, 1] = _probs((V,), device)
    drafts = torch.multinomial(q.reshape(-1, V), 1).reshape(B, K)
    drafts[3, 1] = (q[3, 1] / p[3, 1].clamp_min(1e-30)).argmax()
    # Row 1, position 1: the draft has slightly more draft than target mass -> rejected; the
    # residual has no mass then (q >= p everywhere), so the draw falls back to p.
    q[1, 1, drafts[1, 1]] *= 1.001
    uniforms = torch.full((B, K + 1, 2), ONE_MINUS, device=device)
    num_draft = torch.full((B,), K, dtype=torch.int32, device=device)
    acc, out = _run_sample(drafts, num_draft, q, p, uniforms, torch.zeros_like(num_draft), device)
    assert acc.tolist() == [K, 1, K, 1]
    assert out[0, K] == V - 5 and out[2, K] == V - 5  # bonus: last token with mass
    assert out[1, 1] == V - 5  # residual without mass: drawn from p
    residual = (p[3, 1] - q[3, 1]).clamp_min(0)
    assert int(out[3, 1]) == int(residual.nonzero()[-1])


def test_verify_sample_q_equal_p_accepts_everything(device):
    B, K, V = 512, 6, 100
    p = _probs((B, K + 1, V), device)
    q = p[:, :K].clone()
    drafts = torch.multinomial(q.reshape(-1, V), 1).reshape(B, K)
    uniforms = torch.rand(B, K + 1, 2, device=device)
    uniforms[: B // 4, :, 0] = ONE_MINUS  # the most demanding acceptance tests
    num_draft = torch.full((B,), K, dtype=torch.int32, device=device)
    acc, out = _run_sample(drafts, num_draft, q, p, uniforms, torch.zeros_like(num_draft), device)
    assert (acc == K).all()
    assert torch.equal(out[:, :K], drafts)
    bonus = out[:, K]
    assert (p[torch.arange(B), K, bonus] > 0).all()


def test_verify_sample_zero_target_mass_always_rejects(device):
    B, K, V = 256, 4, 30
    drafts, _, q, p, uniforms, seq_lens = _sample_case(B, K, V, torch.float32, device)
    reject_at = torch.randint(0, K, (B,), device=device)
    rows = torch.arange(B, device=device)
    p[rows, reject_at, drafts[rows, reject_at]] = 0  # the target never emits this draft
    uniforms[: B // 2, :, 0] = 0  # even with the most lenient acceptance test
    num_draft = torch.full((B,), K, dtype=torch.int32, device=device)
    acc, out = _run_sample(drafts, num_draft, q, p, uniforms, seq_lens, device)
    assert (acc <= reject_at.int()).all()
    at_reject = acc == reject_at.int()
    assert at_reject[: B // 2].all()  # u = 0 accepts everything before it
    emitted = out[rows, acc.long()]
    assert (emitted[at_reject] != drafts[rows, reject_at][at_reject]).all()
    assert (p[rows, acc.long(), emitted] > 0).all()


def test_verify_sample_degenerate_mass(device):
    """A residual without mass (target mass below the draft's everywhere) falls back to p; a
    target without any mass gives token 0. Both like the reference."""
    B, K, V = 3, 1, 16
    q = _probs((B, K, V), device)
    p = torch.cat([0.5 * q, _probs((B, 1, V), device)], dim=1)  # p <= q: residual max(0, p-q) = 0
    p[2] = 0  # no target mass at all
    drafts = torch.multinomial(q.reshape(-1, V), 1).reshape(B, K)
    uniforms = torch.full((B, K + 1, 2), 0.9, device=device)  # 0.9 q >= 0.5 q: rejected
    num_draft = torch.full((B,), K, dtype=torch.int32, device=device)
    acc, out = _run_sample(drafts, num_draft, q, p, uniforms, torch.zeros_like(num_draft), device)
    assert acc.tolist() == [0, 0, 0]
    assert (p[[0, 1], 0, out[:2, 0]] > 0).all()
    assert out[2, 0] == 0


# ---- verify_sample: statistics ------------------------------------------------------------------

N_SEQ = 200_000
DELTA = 1e-6  # allowed probability of a false failure per statistical check


def tv_bound(V: int, n: int) -> float:
    """Bound on the total variation between n samples' empirical distribution and the true one,
    exceeded with probability <= DELTA: E[TV] <= sqrt((V - 1) / n) / 2 (Cauchy-Schwarz over the
    V binomial deviations), and TV has bounded differences 1/n, so McDiarmid adds
    sqrt(ln(1/DELTA) / (2 n))."""
    return 0.5 * math.sqrt((V - 1) / n) + math.sqrt(math.log(1 / DELTA) / (2 * n))


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * (a.double() - b.double()).abs().sum().item()


# mix: q_k = mix * p_k + (1 - mix) * (another distribution): higher mix, more acceptance.
@pytest.mark.parametrize("V,K,mix", ((6, 1, 0.0), (7, 2, 0.5), (8, 4, 0.7)))
def test_verify_sample_distribution(device, V, K, mix, report):
    """One batch of N_SEQ sequences with fixed per-position p_k and q_k (drafts sampled from q):
    the token emitted at position k, over the sequences that reach it (accepted >= k), follows
    p_k (speculative sampling is exact), and the accepted counts follow the analytic law
    P(a >= k) = prod_{i <= k} beta_i, beta_i = sum_x min(p_i(x), q_i(x))."""
    p = _probs((K + 1, V), device, sharp=1.5)
    q = mix * p[:K] + (1 - mix) * _probs((K, V), device, sharp=1.5)
    p[0, 1] = 0  # a token the target never emits ...
    q[0, 2] = 0  # ... and one the draft never proposes
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    drafts = torch.multinomial(q, N_SEQ, replacement=True).t().contiguous()  # [N, K]
    uniforms = torch.rand(N_SEQ, K + 1, 2, device=device)
    num_draft = torch.full((N_SEQ,), K, dtype=torch.int32, device=device)
    seq_lens = torch.zeros(N_SEQ, dtype=torch.int32, device=device)
    acc, out = clasp_ext.verify_sample(
        drafts, num_draft, q.expand(N_SEQ, K, V), p.expand(N_SEQ, K + 1, V), uniforms, seq_lens
    )
    acc, out = acc.cpu().long(), out.cpu()
    p64, q64 = p.cpu().double(), q.cpu().double()

    lines = []
    for k in range(K + 1):
        reached = out[acc >= k, k]
        n_k = reached.numel()
        emp = torch.bincount(reached, minlength=V).double() / n_k
        bound = tv_bound(V, n_k)
        lines.append(f"pos {k}: n={n_k} TV={tv(emp, p64[k]):.5f} (bound {bound:.5f})")
        if k == 0:
            assert emp[1].item() == 0, "a token without target mass was emitted"
            # The test has power: emitting the drafts unchanged would fail it.
            assert tv(q64[0], p64[0]) > 3 * bound
        assert tv(emp, p64[k]) < bound, f"position {k}: emitted tokens do not follow p"

    beta = torch.minimum(p64[:K], q64).sum(-1)  # [K]
    reach = torch.cat([torch.ones(1, dtype=torch.float64), beta.cumprod(0)])  # P(a >= k)
    law = reach - torch.cat([reach[1:], torch.zeros(1, dtype=torch.float64)])  # P(a = k)
    mean = reach[1:].sum().item()  # E[a] = sum_{k=1..K} prod_{i<=k} beta_i
    std = math.sqrt((law * torch.arange(K + 1) ** 2).sum().item() - mean**2)
    tol_mean = 5 * std / math.sqrt(N_SEQ)  # 5 standard errors: false failure < 1e-6
    emp_mean = acc.double().mean().item()
    emp_law = torch.bincount(acc, minlength=K + 1).double() / N_SEQ
    report(
        f"verify_sample V={V} K={K} mix={mix} N={N_SEQ}: mean accepted {emp_mean:.4f} vs analytic "
        f"{mean:.4f} (tolerance {tol_mean:.4f}); accepted-count TV {tv(emp_law, law):.5f} "
        f"(bound {tv_bound(K + 1, N_SEQ):.5f}); " + "; ".join(lines)
    )
    assert abs(emp_mean - mean) < tol_mean
    assert tv(emp_law, law) < tv_bound(K + 1, N_SEQ)
    assert torch.equal(seq_lens.cpu(), (acc + 1).int())
