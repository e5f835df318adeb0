"""Does a sublayer skip set (KnapSpec) draft better than CLaSp's whole-layer set at the same cost?

KnapSpec (ICML 2026) skips attention and MLP blocks separately, each weighted by its measured
latency, by a knapsack DP over the 2L blocks. This script measures the question behind it on real
prompts, offline, before any of it goes into the decoding loop:

1. the blocks' latencies: one decoder layer at 1 token whole and with its MLP returning zeros
   (attention = the latter, MLP = the difference), with the draft's low-bit copies where
   ``draft_weights="auto"`` uses them, as integer costs (the cheaper block = 1);
2. on each prompt, at prefill (the target the decoder's default DP uses: the prompt's last
   token), CLaSp's whole-layer DP (``layer_search.dp_skip_search``) at M skipped layers and the
   knapsack DP at budgets of the same cost (``knapsack_skip_search`` below: SPEC section 2's
   recurrence with a skip moving ``cost`` columns instead of one, every block's target the full
   model's state after it);
3. for every skip set, its draft's first-token accuracy on ar's output, teacher-forced: the draft
   of each output position over the full model's K/V of the positions before it, as every round's
   first draft token sees it (all positions in one masked call); ``tau`` = the mean over start
   positions of 1 + the correct run from there (at most ``--max-draft``): a round's tokens if
   later draft tokens did as well;
4. every set's 1-token draft step, timed interleaved with the full model's (``timing``).

    python bench/bench_sublayer_dp.py --model qwen2.5-coder-1.5b --dtype bfloat16 \\
        --records bench/results/.../records.json --out bench/results/sublayer-dp-...

``--records``: a bench_e2e records.json whose ``ar`` outputs are the teacher (else each prompt is
generated here with ``model.generate``, greedy).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_e2e  # noqa: E402

from clasp_ext import timing  # noqa: E402
from clasp_ext.cli import models  # noqa: E402
from clasp_ext.decoding import layer_search, low_bit  # noqa: E402
from clasp_ext.decoding.adapter import ATTN_NAMES, MLP_NAMES, ModelAdapter  # noqa: E402


class Blocks:
    """Each layer's attention and MLP blocks, and a context that makes chosen ones return zeros
    (the residual then adds nothing: the layer without that block)."""

    def __init__(self, adapter: ModelAdapter):
        def find(layer, names):
            for n in names:
                if isinstance(getattr(layer, n, None), torch.nn.Module):
                    return getattr(layer, n)
            raise SystemExit(f"bench_sublayer_dp: no {names} block in {type(layer).__name__}")

        self.attn = [find(layer, ATTN_NAMES) for layer in adapter.layers]
        self.mlp = [find(layer, MLP_NAMES) for layer in adapter.layers]

    @contextlib.contextmanager
    def zeroed(self, attn=(), mlp=()):
        mods = [(self.attn[i], _zero_attention) for i in attn]
        mods += [(self.mlp[i], _zero_mlp) for i in mlp]
        for m, f in mods:
            m.forward = f
        try:
            yield
        finally:
            for m, _ in mods:
                m.__dict__.pop("forward", None)


def _zero_attention(hidden_states, *args, **kwargs):
    return torch.zeros_like(hidden_states), None


def _zero_mlp(hidden_states, *args, **kwargs):
    return torch.zeros_like(hidden_states)


def _cos(x, target):  # [1, n, d] against [1, d] -> [n], in fp32
    return F.cosine_similarity(x[0].float(), target.float().expand(x.shape[1], -1), dim=-1)


@torch.no_grad()
def knapsack_skip_search(adapter, blocks, cache, target_hidden, target_pos, scratch, costs, budget):
    """The knapsack DP over the 2L blocks (block 2l: layer l's attention, 2l + 1: its MLP).
    Column t holds the state whose skipped blocks cost t; a block kept computes it on every live
    column (one call, SPEC section 2's candidate layout), a block skipped moves column t - cost
    to t; cosine with the full model's state after the block decides, ties to skip. The target
    after an attention block, which the verify pass does not keep, is column 0's own result (no
    block skipped so far: the full model). Returns (attention skipped [L], MLP skipped [L], cosine
    at the end) for the set that skips exactly ``budget``."""
    L = adapter.num_layers
    W = int(budget)
    d = target_hidden.shape[-1]
    state = target_hidden.new_zeros(1, W + 1, d)
    state[:, 0] = target_hidden[:, 0]
    live = torch.zeros(W + 1, dtype=torch.bool)
    live[0] = True
    pos_ids = torch.full((1, W + 1), target_pos, dtype=torch.long, device=state.device)
    pos_emb = adapter.position_embeddings(state, pos_ids)
    masks = adapter.candidate_masks(target_pos, scratch, W + 1)
    remaining = [sum(costs[u + 1 :]) for u in range(2 * L)]
    choices = []
    cache.set_write(scratch)
    score = None
    for u in range(2 * L):
        layer, is_mlp = divmod(u, 2)
        c = costs[u]
        cols = live.nonzero()[:, 0]
        n = len(cols)
        pe = adapter.first_positions(pos_emb, n)
        mk = {w: m[..., :n, : scratch + n] for w, m in masks.items()}
        zero = dict(attn=[layer]) if is_mlp else dict(mlp=[layer])
        with blocks.zeroed(**zero), adapter.masked_attention():
            computed = adapter.run_layer(layer, state[:, cols], pos_ids[:, :n], pe, mk, cache)
        if is_mlp:
            target = target_hidden[:, layer + 1]
        else:
            assert int(cols[0]) == 0  # column 0 is always live and kept: the full model's state
            target = computed[:, 0]
        last = u == 2 * L - 1
        norm = adapter.final_norm if last else (lambda x: x)
        keep = torch.full((W + 1,), -2.0)
        keep[cols] = _cos(norm(computed), norm(target)).cpu()
        skip = torch.full((W + 1,), -2.0)
        if c <= W:  # costs are >= 1
            prev_scores = _cos(norm(state), norm(target)).cpu()
            skip[c:] = torch.where(live[:-c], prev_scores[: W + 1 - c], -2.0)
        take_skip = (skip >= keep) & (skip > -2.0)
        new = state.clone()
        new[:, cols] = computed
        if c <= W:
            src = torch.arange(W + 1) - c
            idx = take_skip.nonzero()[:, 0]
            new[:, idx] = state[:, src[idx]]
        best = torch.maximum(keep, skip)
        live = best > -2.0
        live &= torch.arange(W + 1) + remaining[u] >= W  # columns that can still reach the budget
        live[0] = True  # and column 0, the full model: the next attention block's target
        state = new
        choices.append(take_skip)
        score = best
    if not live[W]:
        raise ValueError(f"bench_sublayer_dp: budget {W} cannot be skipped exactly")
    attn_skip, mlp_skip = [False] * L, [False] * L
    t = W
    for u in range(2 * L - 1, -1, -1):
        if choices[u][t]:
            (mlp_skip if u % 2 else attn_skip)[u // 2] = True
            t -= costs[u]
    assert t == 0
    return attn_skip, mlp_skip, float(score[W])


@torch.no_grad()
def draft_hidden(adapter, blocks, lowbit, cache, ids, positions, scratch, attn_skip, mlp_skip):
    """The draft with these blocks skipped for tokens ``ids`` [n] at ``positions`` [n] (ints),
    each over the cache slots before its position and its own scratch slot (scratch + q): every
    round's first draft token, teacher-forced. Returns the last layer's output [1, n, d] (before
    the final norm)."""
    pos = torch.tensor(positions, device=adapter.device)
    masks = adapter.candidate_masks(pos, scratch, len(positions))
    h = adapter.embed(ids[None])
    pos_ids = pos[None]
    pe = adapter.position_embeddings(h, pos_ids)
    whole = [a and m for a, m in zip(attn_skip, mlp_skip, strict=True)]
    attn_only = [i for i, (a, m) in enumerate(zip(attn_skip, mlp_skip, strict=True)) if a and not m]
    mlp_only = [i for i, (a, m) in enumerate(zip(attn_skip, mlp_skip, strict=True)) if m and not a]
    cache.set_write(scratch)
    active = lowbit.active(whole) if lowbit is not None else contextlib.nullcontext()
    with active, blocks.zeroed(attn_only, mlp_only), adapter.masked_attention():
        for i in range(adapter.num_layers):
            if not whole[i]:
                h = adapter.run_layer(i, h, pos_ids, pe, masks, cache)
    return h


def accuracy(correct: list[bool], max_draft: int) -> tuple[float, float]:
    """(first-token accuracy, tau): tau = mean over starts of 1 + the correct run from there,
    capped at ``max_draft`` (the verify's bonus token is the 1)."""
    runs, run = [], 0
    for ok in reversed(correct):
        run = run + 1 if ok else 0
        runs.append(1 + min(run, max_draft))
    return sum(correct) / len(correct), statistics.mean(runs)


def block_costs(adapter, blocks, lowbit, cache, ctx: int, repeats: int) -> tuple[float, float]:
    """Seconds of one layer's attention block and MLP block at 1 token over ``ctx`` cached slots,
    the draft's low-bit copies active: drafts that run only the middle four layers, whole and with
    their MLPs returning zeros, and one that runs no layer (embedding and head), interleaved;
    attention = (without MLP - none) / 4, MLP = (whole - without MLP) / 4."""
    ids = torch.zeros(1, dtype=torch.long, device=adapter.device)
    L = adapter.num_layers
    mid = set(range(L // 2 - 2, L // 2 + 2))
    others = [i not in mid for i in range(L)]
    every = [True] * L

    def draft(skip_attn, skip_mlp):
        return lambda: draft_hidden(
            adapter, blocks, lowbit, cache, ids, [ctx], ctx + 1, skip_attn, skip_mlp
        )

    fns = {
        "whole": draft(others, others),
        "attention": draft(others, every),  # the middle layers' MLPs return zeros
        "none": draft(every, every),
    }
    times = timing.interleaved_times(fns, adapter.device, repeats, warmup=2)
    med = {k: statistics.median(v) for k, v in times.items()}
    return (med["attention"] - med["none"]) / len(mid), (med["whole"] - med["attention"]) / len(mid)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(models.DTYPES))
    p.add_argument("--data", type=Path, default=bench_e2e.DEFAULT_DATA)
    p.add_argument("--per-category", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--records", type=Path, help="bench_e2e records.json with ar's outputs")
    p.add_argument("--skip", type=int, nargs="+", default=[8, 10, 12], help="whole-layer M")
    p.add_argument("--draft-weights", default="auto", choices=["auto", *low_bit.KINDS, "original"])
    p.add_argument(
        "--keep-blocks",
        type=int,
        nargs="*",
        default=[],
        help="blocks the knapsack DP never skips (2l: layer l's attention, 2l + 1: its MLP)",
    )
    p.add_argument("--max-draft", type=int, default=8)
    p.add_argument("--repeats", type=int, default=15, help="timed calls per draft step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(range(min(args.threads, os.cpu_count() or 1))))
    model, tok = models.load(args.model, dtype=models.DTYPES[args.dtype])
    model.eval()
    adapter = ModelAdapter(model)
    blocks = Blocks(adapter)
    L = adapter.num_layers
    chat = getattr(tok, "chat_template", None) is not None
    prompts = bench_e2e.load_prompts(args.data, args.per_category, args.seed)
    teacher = {}
    if args.records:
        recs = json.loads(args.records.read_text())["records"]
        teacher = {r["prompt_key"]: r["new_tokens"] for r in recs if r["method"] == "ar"}
    kind = None
    if args.draft_weights != "original":
        auto = args.draft_weights == "auto"
        kind = low_bit.auto_kind(adapter.layers) if auto else args.draft_weights
    lowbit = low_bit.LowBitDraft(adapter.layers, kind) if kind else None
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"bench_sublayer_dp: {timing.cpu_description()}, {args.threads} threads, draft {kind}")

    with torch.inference_mode():
        cache = adapter.new_cache(4096)
        prompt_ids = bench_e2e.encode(tok, prompts[0]["turns"][0], chat)
        adapter.forward(prompt_ids, 0, cache)
        ctx = prompt_ids.shape[1]
        t_attn, t_mlp = block_costs(adapter, blocks, lowbit, cache, ctx, args.repeats * 2)
        unit = min(t_attn, t_mlp)
        c_attn, c_mlp = max(1, round(t_attn / unit)), max(1, round(t_mlp / unit))
        costs = [c_attn, c_mlp] * L
        W_most = max(args.skip) * (c_attn + c_mlp)
        for u in args.keep_blocks:  # a cost no budget affords
            costs[u] = W_most + 1
        print(
            f"block costs at 1 token: attention {t_attn * 1e3:.2f} ms, MLP {t_mlp * 1e3:.2f} ms "
            f"-> weights {c_attn} / {c_mlp}"
        )
        rows = []
        for prompt in prompts:
            key = str(prompt["question_id"])
            ids = bench_e2e.encode(tok, prompt["turns"][0], chat)
            P = ids.shape[1]
            if key in teacher:
                out = teacher[key]
            else:
                gen = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
                out = gen[0, P:].tolist()
            full = torch.cat([ids[0], torch.tensor(out, dtype=torch.long)])
            N = full.shape[0]
            cache.reset()
            _, hs = adapter.forward(ids, 0, cache, keep_hidden="last")
            target_hidden = torch.cat(hs, 1)  # [1, L + 1, d] of the prompt's last token
            adapter.forward(full[None, P:], P, cache)  # the full model's K/V of the output
            scratch = N
            sets = {
                "full": ([False] * L, [False] * L, 0.0)
            }  # name -> (attn, MLP skipped, search s)
            for M in args.skip:
                t0 = time.perf_counter()
                mask = layer_search.dp_skip_search(adapter, cache, target_hidden, P - 1, scratch, M)
                dt = time.perf_counter() - t0
                m = mask[0].tolist()
                sets[f"layers M={M}"] = (m, m, dt)
                W = M * (c_attn + c_mlp)
                t0 = time.perf_counter()
                a, mm, _score = knapsack_skip_search(
                    adapter, blocks, cache, target_hidden, P - 1, scratch, costs, W
                )
                sets[f"blocks W={W}"] = (a, mm, time.perf_counter() - t0)
            positions = list(range(P - 1, N - 1))
            truth = full[P:].tolist()
            steps = {}
            for name, (a, m, dt) in sets.items():
                # the full model with its own weights (the verify); every draft with the copies
                lb = None if name == "full" else lowbit
                h = draft_hidden(
                    adapter, blocks, lb, cache, full[P - 1 : N - 1], positions, scratch, a, m
                )
                logits = adapter.head(h)[0]
                correct = [
                    int(x) == y for x, y in zip(logits.argmax(-1).tolist(), truth, strict=True)
                ]
                acc, tau = accuracy(correct, args.max_draft)
                # the DP's objective for this set: the cosine of its draft of the target token
                # (the model's own weights, as the DP ran it) with the full model's last state
                at = draft_hidden(adapter, blocks, None, cache, full[P - 1 : P], [P - 1], N, a, m)
                target_cos = float(
                    _cos(adapter.final_norm(at), adapter.final_norm(target_hidden[:, L]))[0]
                )
                steps[name] = functools.partial(
                    draft_hidden, adapter, blocks, lb, cache, full[N - 1 :], [N - 1], N, a, m
                )
                rows.append(
                    dict(
                        prompt=key,
                        group=prompt["group"],
                        set=name,
                        attn_skipped=sum(a),
                        mlp_skipped=sum(m),
                        first_token_accuracy=acc,
                        tau=tau,
                        target_cos=target_cos,
                        search_s=dt,
                        attn_layers=[i for i in range(L) if a[i]],
                        mlp_layers=[i for i in range(L) if m[i]],
                    )
                )
            times = timing.interleaved_times(steps, adapter.device, args.repeats, warmup=2)
            full_s = statistics.median(times["full"])
            for r in rows[-len(sets) :]:
                r["draft_step_vs_full"] = statistics.median(times[r["set"]]) / full_s
            print(
                f"{key} {prompt['group']:14s} "
                + "  ".join(
                    f"{r['set']}: a{r['attn_skipped']}/m{r['mlp_skipped']} cos "
                    f"{r['target_cos']:.4f} acc "
                    f"{r['first_token_accuracy']:.2f} tau {r['tau']:.2f} step "
                    f"{r['draft_step_vs_full']:.2f}"
                    for r in rows[-len(sets) :]
                    if r["set"] != "full"
                ),
                flush=True,
            )
            _save(args, rows, dict(attn_s=t_attn, mlp_s=t_mlp, weights=[c_attn, c_mlp], kind=kind))
    print((args.out / "table.md").read_text())


def _save(args, rows, costs):
    summary = {}
    for name in dict.fromkeys(r["set"] for r in rows):
        rs = [r for r in rows if r["set"] == name]
        summary[name] = {
            k: statistics.mean(r[k] for r in rs)
            for k in (
                "attn_skipped",
                "mlp_skipped",
                "first_token_accuracy",
                "tau",
                "target_cos",
                "draft_step_vs_full",
                "search_s",
            )
        }
    meta = dict(
        command="python " + " ".join(sys.argv),
        machine=bench_e2e.machine_description(args.threads),
        model=args.model,
        dtype=args.dtype,
        block_costs=costs,
        keep_blocks=args.keep_blocks,
    )
    (args.out / "records.json").write_text(
        json.dumps(dict(meta=meta, summary=summary, rows=rows), indent=1)
    )
    lines = [
        f"# Sublayer (knapsack) vs whole-layer skip sets: {args.model} {args.dtype}",
        "",
        f"{meta['machine']['cpu']}, {args.threads} threads. Block costs at 1 token: attention "
        f"{costs['attn_s'] * 1e3:.2f} ms, MLP {costs['mlp_s'] * 1e3:.2f} ms (weights "
        f"{costs['weights'][0]} / {costs['weights'][1]}), draft weights {costs['kind']}. Means "
        f"over {len({r['prompt'] for r in rows})} prompts; accuracy and tau teacher-forced on ar's "
        "output; draft step = median 1-token draft over the full model's, timed interleaved.",
        "",
        f"Command: `{meta['command']}`",
        "",
        "| set | attn skipped | MLP skipped | cosine at the target | first-token accuracy | tau | "
        "draft step / full | search s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['attn_skipped']:.1f} | {s['mlp_skipped']:.1f} | "
            f"{s['target_cos']:.4f} | {s['first_token_accuracy']:.3f} | {s['tau']:.2f} | "
            f"{s['draft_step_vs_full']:.3f} | "
            f"{s['search_s']:.2f} |"
        )
    # each cost's block set against its whole-layer set, prompt by prompt (the means above can
    # hide a split)
    names = list(summary)
    lines += [
        "",
        "| pair | prompts where blocks draft better: accuracy / tau (ties) |",
        "|---|---|",
    ]
    for layers, blocks in zip(names[1::2], names[2::2], strict=False):
        by = {(r["prompt"], r["set"]): r for r in rows}
        prompts = [p for p, n in by if n == layers and (p, blocks) in by]
        counts = []
        for key in ("first_token_accuracy", "tau"):
            d = [by[p, blocks][key] - by[p, layers][key] for p in prompts]
            counts.append(f"{sum(x > 0 for x in d)} / {len(d)} ({sum(x == 0 for x in d)})")
        lines.append(f"| {blocks} vs {layers} | accuracy {counts[0]}, tau {counts[1]} |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
