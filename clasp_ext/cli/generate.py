"""``python -m clasp_ext generate``: stream a CLaSp generation, print its statistics, and with
``--compare`` check it against the model's own ``generate`` and print the measured speedup."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from clasp_ext.cli import calibrate, models, options
from clasp_ext.cli.models import DTYPES


def load_model(name_or_path: str, dtype: torch.dtype, device: str):
    """(model, tokenizer) from a known model name (fetched and converted on first use), a model
    folder or a .gguf file: see ``clasp_ext.cli.models``."""
    return models.load(name_or_path, dtype=dtype, device=device)


def _parser() -> argparse.ArgumentParser:
    from clasp_ext.decoding.config import FIRST_DP, POLICIES

    p = argparse.ArgumentParser(prog="python -m clasp_ext", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text with CLaSp self-speculative decoding")
    options.add_model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--compare", action="store_true", help="also run model.generate and compare")
    options.add_setup_knobs(g)
    g.add_argument("--draft-exit-threshold", type=float, default=None)
    g.add_argument("--update-interval", type=int, default=None)
    g.add_argument(
        "--lookup-ngram", type=int, default=None, help="draft by context lookup first; 0 = off"
    )
    g.add_argument("--skip-strategy", default=None, help="dp, static, importance, random or 0,3,5")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument(
        "--policy",
        choices=POLICIES,
        default=None,
        help="cost (default): per round, draft only where it pays; fixed: always draft",
    )
    g.add_argument(
        "--first-dp",
        choices=FIRST_DP,
        default=None,
        help="first skip-set search on the prompt's last token or the first output token",
    )
    calibrate.add_parser(sub)
    return p


# the ClaspConfig fields only generate takes (calibrate shares options.SETUP_KNOBS)
_GENERATE_KNOBS = (
    "draft_exit_threshold",
    "update_interval",
    "lookup_ngram",
    "seed",
    "policy",
    "first_dp",
)


def _config_overrides(args) -> dict:
    o = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
    )
    o.update(options.given(args, options.SETUP_KNOBS))
    o.update(options.given(args, _GENERATE_KNOBS))
    if args.skip_strategy is not None:
        s = args.skip_strategy
        o["skip_strategy"] = [int(x) for x in s.split(",") if x] if s[:1].isdigit() else s
    return o


class _TextStream:
    """Prints the decoded continuation as tokens arrive."""

    def __init__(self, tokenizer, out):
        self.tok = tokenizer
        self.out = out
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, new_tokens: list[int]) -> None:
        self.ids.extend(new_tokens)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for more
            return
        self.out.write(text[self.printed :])
        self.out.flush()
        self.printed = len(text)


def main(argv=None, out=None) -> int:
    out = out or sys.stdout
    args = _parser().parse_args(argv)
    if args.command == "calibrate":
        return calibrate.run(args, load_model, out)
    from clasp_ext.decoding import ClaspDecoder

    model, tok = load_model(args.model, DTYPES[args.dtype], args.device)
    if args.chat:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": args.prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    else:
        ids = tok(args.prompt, return_tensors="pt").input_ids
    ids = ids.to(model.device)
    stream = _TextStream(tok, out)
    dec = ClaspDecoder(model, callback=stream, **_config_overrides(args))
    with torch.no_grad():  # warm-up, so neither timed method pays first-call costs
        model(ids)
    start = time.perf_counter()
    dec.prefill(ids)
    while not dec.finished:
        dec.step()
    t_clasp = time.perf_counter() - start
    out.write("\n")
    s = dec.stats
    new = s.new_tokens
    low_bit = dec.low_bit_bytes
    out.write(
        f"\n[clasp] {new} tokens in {t_clasp:.2f} s ({new / max(t_clasp, 1e-9):.1f} tok/s); "
        f"rounds {s.rounds}, tau {s.tau:.2f} tokens/round, acceptance {s.acceptance_rate:.2f}, "
        f"DP runs {s.dp_runs}, rounds plain/lookup/layer-skip {s.plain_rounds}/"
        f"{s.lookup_rounds}/{s.layer_skip_rounds}, sibling hits {s.branch_hits}/"
        f"{s.branch_rounds} rounds, skip {s.skip_layers}\n"
        f"[clasp] time: prefill {s.time_prefill:.2f} s, draft {s.time_draft:.2f} s, verify "
        f"{s.time_verify:.2f} s, DP {s.time_dp:.2f} s, other {s.time_other:.2f} s; host syncs "
        f"per round {s.host_syncs_per_round:.2f}\n"
    )
    if low_bit:
        out.write(f"[clasp] {dec.low_bit.kind} draft weight copies: {low_bit / 2**20:.0f} MiB\n")
    if dec.cost_table is not None:
        t = dec.cost_table
        out.write(
            f"[clasp] cost table (policy={dec.config.policy}): calibrated in "
            f"{t.calibration_s:.1f} s once for this setup, cached at {t.path or '(not saved)'}; "
            f"verify of 1/{max(t.verify_s)} tokens {t.verify(1) * 1e3:.0f}/"
            f"{t.verify(max(t.verify_s)) * 1e3:.0f} ms, draft step {t.draft_step_s * 1e3:.0f} ms\n"
        )
    if not args.compare:
        return 0
    c = dec.config
    kwargs = dict(max_new_tokens=c.max_new_tokens, pad_token_id=tok.pad_token_id or 0)
    kwargs["eos_token_id"] = c.eos_token_id or None
    if c.greedy:
        kwargs["do_sample"] = False
    else:
        kwargs.update(do_sample=True, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p)
    start = time.perf_counter()
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    t_ar = time.perf_counter() - start
    n_ar = ref.shape[1] - ids.shape[1]
    out.write(
        f"[compare] model.generate: {n_ar} tokens in {t_ar:.2f} s "
        f"({n_ar / max(t_ar, 1e-9):.1f} tok/s); speedup {t_ar / max(t_clasp, 1e-9):.2f}x "
        f"(per token {(t_ar / max(n_ar, 1)) / (t_clasp / max(new, 1)):.2f}x)\n"
    )
    if not c.greedy:
        out.write("[compare] sampling: outputs are random draws, not compared token by token\n")
        return 0
    same = ref[0].tolist() == dec.tokens
    out.write(f"[compare] outputs identical: {'yes' if same else 'NO'}\n")
    if same:
        return 0
    return 0 if _explain_divergence(model, ref[0], dec.tokens, ids.shape[1], out) else 1


def _explain_divergence(model, ref: torch.Tensor, tokens: list[int], prompt_len: int, out) -> bool:
    """At the first differing token, report the full model's top-2 logit gap over the reference
    sequence. Returns True when the step is a floating-point near-tie (SPEC section 4): a gap
    within two units in the last place of the logits' dtype, where a batched verify pass and a
    one-token step may round differently; False means a real mismatch."""
    a = ref.tolist()
    i = next((j for j in range(min(len(a), len(tokens))) if a[j] != tokens[j]), None)
    if i is None:  # one sequence is a prefix of the other: a length difference, never a tie
        out.write(f"[compare] lengths differ: {len(a)} vs {len(tokens)} tokens\n")
        return False
    with torch.no_grad():
        logits = model(ref[None, :i]).logits[0, -1]
    top = logits.topk(2)
    v0, v1 = (float(x) for x in top.values)
    ulp = torch.finfo(logits.dtype).eps * max(abs(v0), 1.0)
    tie = v0 - v1 <= 2 * ulp
    out.write(
        f"[compare] first difference at new token {i - prompt_len}: model.generate chose "
        f"{a[i]}, CLaSp {tokens[i]}; the full model's top-2 logits there are {v0:.4f} and "
        f"{v1:.4f} (gap {v0 - v1:.2g}, {logits.dtype} ulp {ulp:.2g}): "
        + ("a floating-point near-tie, allowed by SPEC section 4\n" if tie else "NOT a near-tie\n")
    )
    return tie
