"""Per-step costs of CLaSp against one autoregressive step, and the speedup they imply.

Times, on one model and device, with a context of ``--context`` tokens in the cache:
- ``ar step``: the model's own forward of one token over transformers' DynamicCache (what
  ``model.generate`` runs per token);
- ``draft step`` at each skip count M: one token through the L - M kept layers and the draft head;
- ``verify``: one full forward over K + 1 tokens (the verify pass) for each K;
- ``draft forward`` of T tokens (``--draft-tokens``) at the projection's M on the decoder's
  low-bit draft copies (``draft_weights="auto"``): what one level of a draft tree of width T
  would cost against a draft step of one token;
- ``dp``: one run of the layer-search DP (SPEC section 2) at each M.

Then, for every ``--records`` file of bench_e2e.py, the speedup those costs imply for the tau and
draft lengths measured there: a projection (rounds of k drafts + one verify of k + 1 tokens + a DP
every ``update_interval`` rounds, against tau autoregressive steps), not a measurement.

    python bench/bench_step_costs.py --model qwen2.5-coder-1.5b --out bench/results/steps-cpu
    python bench/bench_step_costs.py --random-shape llama3-8b --device cuda --out $OUT/steps-h100
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # clasp_ext from this checkout

from clasp_ext.cli import models  # noqa: E402
from clasp_ext.decoding import ClaspDecoder  # noqa: E402
from clasp_ext.decoding import low_bit as low_bit_kinds  # noqa: E402
from clasp_ext.decoding.layer_search import dp_skip_search  # noqa: E402
from clasp_ext.decoding.phases import draft_step  # noqa: E402
from clasp_ext.timing import median_time  # noqa: E402

# Random weights of these shapes (costs only depend on the shape)
SHAPES = {
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
    # LLaMA-3.2-1B's shape (bench_cuda_graphs.py: launch overhead matters most at this size)
    "llama3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    # for the script's own test
    "tiny-llama": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=1024,
    ),
}


def random_model(shape: str, dtype, device):
    import transformers as tf

    cfg = tf.LlamaConfig(**SHAPES[shape], attn_implementation="sdpa")
    with torch.device(device):
        model = tf.LlamaForCausalLM(cfg).to(dtype).eval()
    return model


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmarks' model: ``--model`` (a named real model or a model folder) or
    ``--random-shape`` (random weights of one of SHAPES), and ``--dtype``."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a known model name or a model folder")
    src.add_argument("--random-shape", choices=sorted(SHAPES), help="random weights of this shape")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(models.DTYPES))


def load_model(args, device):
    """The model ``add_model_arguments`` names, on ``device`` (random weights seeded with 0)."""
    dtype = models.DTYPES[args.dtype]
    if args.model:
        return models.load(args.model, dtype=dtype, device=device)[0]
    torch.manual_seed(0)
    return random_model(args.random_shape, dtype, device)


def timer(device: torch.device, fn, repeats: int) -> float:
    """Median seconds of ``fn`` after two warm-up calls (clasp_ext.timing)."""
    return median_time(fn, device, repeats, warmup=2)


@torch.inference_mode()
def measure(model, args) -> dict:
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    V = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, min(V, 30000), (1, args.context), generator=gen).to(dev)
    dec = ClaspDecoder(
        model,
        max_new_tokens=max(args.verify_tokens) + model.config.num_hidden_layers,
        eos_token_id=[],
        max_draft=1,
    )
    dec.prefill(prompt)
    # the sequence's view of the loop's cache, its length, and the token the next round feeds
    a, cache, n = dec.adapter, dec.loop.cache.row(0), dec.committed
    L = a.num_layers
    tok = dec.loop._last[:1].clone()
    res = dict(
        num_layers=L,
        context=args.context,
        vocab=V,
        ar={},
        draft={},
        draft_low_bit={},
        verify={},
        dp={},
        wide={},
    )

    hf_cache = DynamicCache(config=model.config)
    # the cache keyword: cache= from transformers 5.24 on, past_key_values= before
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    model(input_ids=prompt, use_cache=True, **{kw: hf_cache})

    def ar_step():
        model(input_ids=tok, use_cache=True, **{kw: hf_cache})
        hf_cache.crop(-1)  # drop the token again

    res["ar"]["hf_step_s"] = timer(dev, ar_step, args.repeats)

    def draft():  # the loop's draft step (phases.draft_step) with dec.skip
        return draft_step(
            dec.config, a.forward, dec.draft_head, tok, n, cache, dec.skip, [dec.generator]
        )

    # this library's full forward of one token (the draft with nothing skipped)
    dec.skip = [False] * L
    res["ar"]["clasp_full_step_s"] = timer(dev, draft, args.repeats)

    target = torch.randn(1, L + 1, a.hidden_size, device=dev, dtype=a.dtype)
    for M in args.skip:
        if not 0 <= M < L:
            raise SystemExit(f"bench_step_costs: skip count {M} out of range for {L} layers")
        dec.skip = [i >= L - M for i in range(L)]  # the cost depends on the count only
        res["draft"][M] = timer(dev, draft, args.repeats)
        if M > 0:
            res["dp"][M] = timer(
                dev,
                lambda M=M: dp_skip_search(a, cache, target, n - 1, n, M),
                max(3, args.repeats // 2),
            )
    M = args.project_skip
    dec.skip = [i >= L - M for i in range(L)]
    # the draft step at the projection's M on each low-bit copy this torch has a kernel for (what
    # draft_weights="int8" / "int4" would run; "auto" picks by the linears' times below)
    for kind in low_bit_kinds.LOW_BIT_KINDS:
        try:  # the decoder's own constructor of the copies (refuses a kind with no kernel)
            copies = low_bit_kinds.low_bit_draft_for(a, kind, M)
        except ValueError as e:
            print(f"bench_step_costs: no {kind} draft step: {e}")
            continue
        copies.prepare(dec.skip)

        def low_bit_draft(copies=copies):
            with copies.active(dec.skip):
                return draft()

        res["draft_low_bit"][kind] = timer(dev, low_bit_draft, args.repeats)
    res["low_bit_linears"] = {str(k): v for k, v in low_bit_kinds.measure_kinds(a.layers).items()}
    low_bit = dec.loop.low_bit
    res["wide_weights"] = "original" if low_bit is None else low_bit.kind
    for T in args.draft_tokens:
        inp = tok.repeat(1, T)

        def wide(inp=inp):  # the kept layers on T tokens, on the draft's weights, then its head
            with low_bit.active(dec.skip) if low_bit is not None else contextlib.nullcontext():
                h, _ = a.forward(inp, n, cache, skip=dec.skip)
            return dec.draft_head.logits(h).argmax(-1)

        res["wide"][T] = timer(dev, wide, args.repeats)
    for T in args.verify_tokens:
        inp = tok.repeat(1, T)
        res["verify"][T] = timer(
            dev, lambda inp=inp: a.head(a.forward(inp, n, cache)[0]), args.repeats
        )
    return res


def project(costs: dict, records_path: Path, skip_count: int) -> list[dict]:
    """Projected speedup per clasp method of a bench_e2e run, from these per-step costs."""
    data = json.loads(records_path.read_text())
    rows = []
    ar = costs["ar"]["hf_step_s"]
    verify = {int(k): v for k, v in costs["verify"].items()}
    for r in data["summary"]:
        if r["group"] != "overall" or not r["method"].startswith("clasp") or not r["tau"]:
            continue
        recs = [x for x in data["records"] if x["method"] == r["method"] and x.get("rounds")]
        rounds = sum(x["rounds"] for x in recs)
        k = sum(x["drafted"] for x in recs) / rounds  # tokens verified per round, less one
        # draft forwards per round: counted since 2026-12-04 (lookup drafts run none); older
        # records charge one per drafted token, which overstates the methods that use lookup
        counted = all(x.get("draft_steps") is not None for x in recs)
        steps = sum(x["draft_steps"] for x in recs) / rounds if counted else k
        dp_per_round = sum(x["dp_runs"] for x in recs) / rounds
        # verify of k + 1 tokens: the nearest measured length at or above it
        vt = next((verify[t] for t in sorted(verify) if t >= k + 1), verify[max(verify)])
        draft = costs["draft"][skip_count]
        dp = costs["dp"].get(skip_count, 0.0)  # no DP run measured for M = 0
        round_s = steps * draft + vt + dp_per_round * dp
        rows.append(
            dict(
                records=str(records_path),
                method=r["method"],
                tau=r["tau"],
                drafted_per_round=k,
                draft_steps_per_round=steps,
                draft_steps_counted=counted,
                dp_runs_per_round=dp_per_round,
                projected_speedup=r["tau"] * ar / round_s,
                measured_speedup=r["speedup"],
            )
        )
    return rows


def markdown(costs: dict, meta: dict, projections: list[dict]) -> str:
    ar = costs["ar"]["hf_step_s"]
    full = costs["ar"]["clasp_full_step_s"]
    lines = [
        f"# Per-step costs: {meta['model']} {meta['dtype']} on {meta['device_name']}",
        "",
        f"{costs['num_layers']} layers, vocabulary {costs['vocab']}, {costs['context']} tokens "
        f"of context, median of {meta['repeats']} runs. Command: `{meta['command']}`",
        "",
        "| step | time (ms) | / ar step |",
        "|---|---|---|",
        f"| ar step (transformers forward, 1 token) | {ar * 1e3:.2f} | 1.00 |",
        f"| clasp full step (1 token, nothing skipped) | {full * 1e3:.2f} | {full / ar:.2f} |",
    ]
    for M, t in costs["draft"].items():
        lines.append(f"| draft step, M = {M} skipped | {t * 1e3:.2f} | {t / ar:.2f} |")
    for kind, t in costs.get("draft_low_bit", {}).items():
        lines.append(
            f"| draft step, M = {meta['project_skip']}, {kind} weights | {t * 1e3:.2f} "
            f"| {t / ar:.2f} |"
        )
    for T, t in costs["verify"].items():
        lines.append(f"| verify, {T} tokens | {t * 1e3:.2f} | {t / ar:.2f} |")
    for M, t in costs["dp"].items():
        lines.append(f"| DP run, M = {M} | {t * 1e3:.2f} | {t / ar:.2f} |")
    for T, t in costs.get("wide", {}).items():
        lines.append(
            f"| draft forward of {T} tokens, M = {meta['project_skip']}, "
            f"{costs['wide_weights']} weights | {t * 1e3:.2f} | {t / ar:.2f} |"
        )
    linears = costs.get("low_bit_linears") or {}
    if linears:
        base = linears["None"]
        cells = ", ".join(
            f"{'original' if k == 'None' else k} {t * 1e3:.2f} ms ({base / t:.2f}x)"
            for k, t in linears.items()
        )
        lines += [
            "",
            f"One token through the linears of the first decoder layers (low_bit.measure_kinds, "
            f'what draft_weights="auto" compares): {cells}; auto took '
            f"{costs['wide_weights']}.",
        ]
    if projections:
        lines += [
            "",
            f"## Projected speedup at M = {meta['project_skip']} (a projection, not a measurement)",
            "",
            "round time = s x draft step + verify(k + 1 tokens) + (DP runs per round) x DP run; "
            "speedup = tau x ar step / round time, with tau, k (drafted per round), s (layer-skip "
            "draft forwards per round; records older than 2026-12-04 do not count them, and s = k "
            "there, marked *) and DP runs per round measured by bench_e2e.py on the real model "
            "named in the records file.",
            "",
            "| records | method | tau | k | s | projected | measured there |",
            "|---|---|---|---|---|---|---|",
        ]
        for p in projections:
            star = "" if p["draft_steps_counted"] else "*"
            lines.append(
                f"| {Path(p['records']).parent.name} | {p['method']} | {p['tau']:.2f} "
                f"| {p['drafted_per_round']:.2f} | {p['draft_steps_per_round']:.2f}{star} "
                f"| {p['projected_speedup']:.2f}x | {p['measured_speedup']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--skip", type=int, nargs="+", default=None, help="M values (default 25-50%%)")
    p.add_argument("--verify-tokens", type=int, nargs="+", default=[1, 5, 9, 13, 17])
    p.add_argument("--draft-tokens", type=int, nargs="*", default=[1, 2, 4, 8])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--records", type=Path, nargs="*", default=[], help="bench_e2e records.json")
    p.add_argument("--project-skip", type=int, default=None, help="M for the projection")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    model = load_model(args, args.device)
    name = args.model or f"{args.random_shape} (random weights)"
    L = model.config.num_hidden_layers
    if args.skip is None:
        args.skip = sorted({0, round(0.25 * L), round(0.375 * L), round(0.5 * L)})
    if args.project_skip is None:
        args.project_skip = round(0.25 * L)
    if args.project_skip not in args.skip:
        args.skip = sorted({*args.skip, args.project_skip})
    costs = measure(model, args)
    device_name = (
        torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else f"CPU ({args.threads} threads)"
    )
    meta = dict(
        model=name,
        dtype=args.dtype,
        device_name=device_name,
        repeats=args.repeats,
        project_skip=args.project_skip,
        torch=torch.__version__,
        command="python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
    )
    projections = [r for path in args.records for r in project(costs, path, args.project_skip)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_costs.json").write_text(
        json.dumps(dict(meta=meta, costs=costs, projections=projections), indent=1)
    )
    text = markdown(costs, meta, projections)
    (args.out / "step_costs.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
