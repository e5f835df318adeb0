"""Pure-PyTorch reference implementations of every `clasp` op.

They are the test oracle and the benchmark baseline: plain composites of ATen ops, written for
clarity, computing in float32 (or float64 where a sum decides a discrete outcome). Signatures and
semantics match ``clasp_ext.ops``; they do not mutate ``seq_lens`` in place but return a tuple
that includes the updated lengths only where noted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

COS_EPS = 1e-8  # same clamp as the kernels and F.cosine_similarity


def cosine_scores(candidates: Tensor, target: Tensor, compute_dtype=torch.float32) -> Tensor:
    c = candidates.to(compute_dtype)
    t = target.to(compute_dtype).unsqueeze(1)
    return F.cosine_similarity(c, t, dim=-1, eps=COS_EPS).float()


def layer_importance(hidden: Tensor, compute_dtype=torch.float32) -> Tensor:
    h = hidden.to(compute_dtype)
    return (1.0 - F.cosine_similarity(h[:, :-1], h[:, 1:], dim=-1, eps=COS_EPS)).float()


def skip_search_step(
    prev: Tensor, computed: Tensor, target: Tensor, layer: int, compute_dtype=torch.float32
) -> tuple[Tensor, Tensor, Tensor]:
    """One DP row i = layer + 1, cell by cell as SPEC.md section 2 states it."""
    B, W, d = prev.shape
    M = W - 1
    i = layer + 1
    num_keep = min(layer, M)
    reach = min(i, M)
    nxt = torch.zeros_like(prev, memory_format=torch.contiguous_format)
    choice = torch.zeros(B, W, dtype=torch.uint8, device=prev.device)
    score = torch.full((B, W), float("-inf"), dtype=torch.float32, device=prev.device)

    def cos(x: Tensor) -> Tensor:
        return cosine_scores(x.unsqueeze(1), target, compute_dtype)[:, 0]

    nxt[:, 0] = target
    score[:, 0] = cos(target)
    for j in range(1, reach + 1):
        skip = prev[:, j - 1]
        s_skip = cos(skip)
        if j <= num_keep:
            keep = computed[:, j - 1]
            s_keep = cos(keep)
            take_skip = ~(s_keep > s_skip)  # ties (and NaN) go to skip
        else:  # j == i <= M: every layer so far skipped
            s_keep = torch.full_like(s_skip, float("-inf"))
            keep = skip
            take_skip = torch.ones(B, dtype=torch.bool, device=prev.device)
        nxt[:, j] = torch.where(take_skip[:, None], skip, keep)
        choice[:, j] = take_skip.to(torch.uint8)
        score[:, j] = torch.where(take_skip, s_skip, s_keep)
    return nxt, choice, score


def skip_search_backtrack(choices: Tensor, num_skip: int) -> Tensor:
    B, L, _ = choices.shape
    ch = choices.cpu()
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        j = num_skip
        for i in range(L - 1, -1, -1):
            skip = j > 0 and bool(ch[b, i, j])
            mask[b, i] = skip
            j -= int(skip)
    return mask.to(choices.device)


def _emit(draft_tokens: Tensor, accepted: Tensor, last_token: Tensor) -> Tensor:
    """[drafts accepted..., last_token, -1, ...] per row."""
    B, K = draft_tokens.shape
    pos = torch.arange(K + 1, device=draft_tokens.device)
    padded = torch.cat([draft_tokens, draft_tokens.new_full((B, 1), -1)], dim=1)
    out = torch.where(pos < accepted[:, None], padded, torch.full_like(padded, -1))
    return out.scatter(1, accepted.long()[:, None], last_token.long()[:, None])


def _accepted_prefix(matches: Tensor, num_draft: Tensor) -> Tensor:
    K = matches.shape[1]
    valid = torch.arange(K, device=matches.device) < num_draft[:, None]
    return torch.cumprod((matches & valid).int(), dim=1).sum(dim=1).int()


def verify_greedy(
    draft_tokens: Tensor, num_draft: Tensor, target_logits: Tensor, seq_lens: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (accepted, out_tokens, new_seq_lens)."""
    y = target_logits.float().argmax(dim=-1)  # [B, K+1]; first index of the max, NaN largest
    K = draft_tokens.shape[1]
    accepted = _accepted_prefix(draft_tokens == y[:, :K], num_draft)
    last = y.gather(1, accepted.long()[:, None])[:, 0]
    return accepted, _emit(draft_tokens, accepted, last), seq_lens + accepted + 1


def _inverse_cdf(mass: Tensor, u: Tensor) -> Tensor:
    """Row-wise draw of index e with probability mass[e] / sum(mass), by threshold u * total.
    Returns -1 for rows without positive mass."""
    mass = torch.nan_to_num(mass.double(), nan=0.0).clamp_min(0.0)
    cum = mass.cumsum(dim=-1)
    total = cum[:, -1]
    thr = (u.double() * total)[:, None]
    idx = torch.searchsorted(cum, thr, right=True)[:, 0]  # first index with cum > thr
    V = mass.shape[-1]
    # Rounding can leave thr >= total: take the last entry with positive mass.
    positive = torch.arange(V, device=mass.device).expand_as(mass).masked_fill(mass <= 0, -1)
    last_pos = positive.max(dim=-1).values
    idx = torch.where(idx >= V, last_pos, idx)
    # Land on an entry with positive mass (zero-mass entries cannot be drawn).
    idx = torch.where(mass.gather(1, idx.clamp(0, V - 1)[:, None])[:, 0] > 0, idx, last_pos)
    return torch.where(total > 0, idx, torch.full_like(idx, -1))


SEG_LEN = 1024  # segment length of the kernels' canonical probability scan (clasp_math.h)


def _inverse_cdf_canonical(mass: Tensor, u: Tensor) -> Tensor:
    """The kernels' exact float32 draw (clasp::inverse_cdf_pick), vectorised over rows.

    Segment masses are left-to-right float32 sums of SEG_LEN entries, the total the left-to-right
    sum of segment masses, and the walk uses those same partial sums, so the chosen index is
    bitwise what the kernels choose. Slow (a Python loop per summation step): an oracle only.
    """
    B, V = mass.shape
    mass = mass.float()
    mass = torch.where(mass > 0, mass, torch.zeros_like(mass))  # NaN and negatives count as 0
    nseg = (V + SEG_LEN - 1) // SEG_LEN
    m = F.pad(mass, (0, nseg * SEG_LEN - V)).view(B, nseg, SEG_LEN)
    seg = torch.zeros(B, nseg)
    for e in range(SEG_LEN):
        seg = seg + m[:, :, e]
    total = torch.zeros(B)
    for k in range(nseg):
        total = total + seg[:, k]
    thr = u.float() * total
    cum = torch.zeros(B)
    chosen = torch.full((B,), -1, dtype=torch.long)
    crossed = torch.zeros(B, dtype=torch.bool)
    cum_at = torch.zeros(B)
    for k in range(nseg):
        nxt = cum + seg[:, k]
        hit = ~crossed & (nxt > thr)
        cum_at = torch.where(hit, cum, cum_at)
        chosen = torch.where(hit | (~crossed & (seg[:, k] > 0)), torch.full_like(chosen, k), chosen)
        crossed |= hit
        cum = torch.where(crossed, cum, nxt)
    rows = torch.arange(B)
    seg_vals = m[rows, chosen.clamp_min(0)]  # [B, SEG_LEN]
    c = cum_at
    pick = torch.full((B,), -1, dtype=torch.long)
    last_pos = torch.full((B,), -1, dtype=torch.long)
    for e in range(SEG_LEN):
        me = seg_vals[:, e]
        last_pos = torch.where(me > 0, torch.full_like(last_pos, e), last_pos)
        c = c + me
        pick = torch.where((pick < 0) & crossed & (c > thr) & (me > 0), e, pick)
    within = torch.where(pick >= 0, pick, last_pos)
    idx = torch.where(within >= 0, chosen * SEG_LEN + within, torch.full_like(within, -1))
    return torch.where((total > 0) & (chosen >= 0), idx, torch.full_like(idx, -1))


def verify_sample(
    draft_tokens: Tensor,
    num_draft: Tensor,
    draft_probs: Tensor,
    target_probs: Tensor,
    uniforms: Tensor,
    seq_lens: Tensor,
    exact_order: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (accepted, out_tokens, new_seq_lens).

    By default the draw uses float64 cumulative sums (the plain composite a user would write; a
    threshold within float32 rounding of a CDF boundary can land on the neighbouring token).
    exact_order=True reproduces the kernels' float32 summation order, and with it their tokens
    bit for bit (CPU tensors only; slow)."""
    B, K = draft_tokens.shape
    p = target_probs.float()
    q = draft_probs.float()
    if K > 0:
        p_tok = p[:, :K].gather(2, draft_tokens[:, :, None])[:, :, 0]
        q_tok = q.gather(2, draft_tokens[:, :, None])[:, :, 0]
        accept = uniforms[:, :K, 0] * q_tok < p_tok
    else:
        accept = torch.zeros(B, 0, dtype=torch.bool, device=p.device)
    accepted = _accepted_prefix(accept, num_draft)
    rows = torch.arange(B, device=p.device)
    a = accepted.long()
    p_row = p[rows, a]
    u_draw = uniforms[rows, a, 1]
    rejected = accepted < num_draft
    if K > 0:
        q_row = q[rows, a.clamp(max=K - 1)]
        residual = torch.where(rejected[:, None], (p_row - q_row).clamp_min(0.0), p_row)
    else:
        residual = p_row
    draw = _inverse_cdf_canonical if exact_order else _inverse_cdf
    tok = draw(residual, u_draw)
    tok = torch.where(tok >= 0, tok, draw(p_row, u_draw))  # residual without mass
    tok = tok.clamp_min(0)
    return accepted, _emit(draft_tokens, accepted, tok), seq_lens + accepted + 1
