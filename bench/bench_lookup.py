"""How often context-lookup drafts are right, by match length: the library's ``LookupIndex``
teacher-forced over ``model.generate``'s outputs, no model forward.

Two counts per index setting (``--ngram``, the longest n-gram matched, like
``ClaspConfig.lookup_ngram``), both deterministic (end-to-end timings of one lookup rule against
another differ by less than the machine's noise):

- per position: at every output position of each prompt (the context: prompt + ar's output so
  far) the index proposes up to ``--max-lookup`` tokens; a proposal's accepted length is its
  common prefix with ar's next tokens. Per match length n: how many positions matched, how often
  the first proposed token was right, the mean accepted length (what the cost policy's lookup
  sources, ``policy.lookup_source``, and their priors rest on);
- per round: the rounds a decoder that drafts only by lookup (n >= 2, as the cascade's prefix)
  would need for ar's output, each round its match's accepted tokens + 1. A rule can be right
  more often per position and save no rounds: decoding visits only the positions where a round
  starts, and a long copy jumps over the rest.

    python bench/bench_lookup.py --records bench/results/.../records.json --ngram 3 8 \\
        --out bench/results/lookup-...

``--records``: a bench_e2e records.json (its ``ar`` records' outputs and its meta: model, chat
template); the prompts come from ``--data`` by question id.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_e2e  # noqa: E402

from clasp_ext.decoding.lookup import LookupIndex  # noqa: E402


def accepted_len(proposal: list[int], future: list[int]) -> int:
    """How many leading proposed tokens equal the tokens that came."""
    n = 0
    for x, y in zip(proposal, future, strict=False):  # the output may end first
        if x != y:
            break
        n += 1
    return n


def teacher_forced(prompt: list[int], out: list[int], max_ngram: int, max_lookup: int) -> dict:
    """{match length n: [positions matched, first token right, tokens accepted]} over every
    output position of one prompt, with a ``LookupIndex(max_ngram)`` fed the tokens as decoding
    would (single-token matches included, as with ``policy="cost"``)."""
    tokens = list(prompt)
    index = LookupIndex(max_ngram)
    index.reset(tokens)
    counts: dict[int, list[int]] = {}
    for t, tok in enumerate(out[:-1]):
        tokens.append(tok)  # the context now ends with output token t
        proposal, n = index.match(max_lookup, min_ngram=1)
        if not proposal:
            continue
        a = accepted_len(proposal, out[t + 1 :])
        c = counts.setdefault(n, [0, 0, 0])
        c[0] += 1
        c[1] += a > 0
        c[2] += a
    return counts


def lookup_rounds(prompt: list[int], out: list[int], max_ngram: int, max_lookup: int) -> int:
    """The rounds a lookup-only decoder needs for ``out`` after ``prompt`` (its first token comes
    from the prefill): each round proposes the index's match (n >= 2) and emits the accepted
    tokens plus one (the verify's own token)."""
    tokens = list(prompt) + out[:1]
    index = LookupIndex(max_ngram)
    index.reset(tokens)
    t, rounds = 1, 0
    while t < len(out):
        proposal, _ = index.match(max_lookup, min_ngram=2)
        step = min(accepted_len(proposal, out[t:]) + 1, len(out) - t)
        tokens.extend(out[t : t + step])
        t += step
        rounds += 1
    return rounds


def merge(into: dict, counts: dict) -> None:
    for n, c in counts.items():
        acc = into.setdefault(n, [0, 0, 0])
        for i, v in enumerate(c):
            acc[i] += v


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=Path, nargs="+", required=True, help="bench_e2e records.json")
    p.add_argument("--data", type=Path, default=bench_e2e.DEFAULT_DATA)
    p.add_argument("--ngram", type=int, nargs="+", default=[3, 8], help="index settings compared")
    p.add_argument("--max-lookup", type=int, default=16)
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from clasp_ext.cli import models

    questions = {}
    for line in args.data.open():
        if line.strip():
            q = json.loads(line)
            questions[str(q["question_id"])] = q
    teachers, metas = [], []
    for path in args.records:
        data = json.loads(path.read_text())
        metas.append(data["meta"])
        teachers += [r for r in data["records"] if r["method"] == "ar"]
    # a prompt in several runs (another seed draws it too) counts once
    teachers = list({r["prompt_key"]: r for r in reversed(teachers)}.values())[::-1]
    meta = metas[0]
    setup = ("model", "dtype", "chat_template")  # what the prompts' token ids depend on
    if any(tuple(m[k] for k in setup) != tuple(meta[k] for k in setup) for m in metas):
        raise SystemExit("bench_lookup: the records come from different models or prompt formats")
    tok = AutoTokenizer.from_pretrained(
        str(models.prepare(meta["model"], models.DTYPES[meta["dtype"]]))
    )
    by_setting = {n: {} for n in args.ngram}
    by_group = {n: {} for n in args.ngram}
    rounds = {n: {} for n in args.ngram}  # per prompt key
    for r in teachers:
        q = questions[r["prompt_key"]]
        prompt = bench_e2e.encode(tok, q["turns"][0], meta["chat_template"])[0].tolist()
        for n in args.ngram:
            counts = teacher_forced(prompt, r["new_tokens"], n, args.max_lookup)
            merge(by_setting[n], counts)
            merge(by_group[n].setdefault(r["group"], {}), counts)
            rounds[n][r["prompt_key"]] = lookup_rounds(prompt, r["new_tokens"], n, args.max_lookup)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "records": [str(p) for p in args.records],
        "prompts": len(teachers),
        "max_lookup": args.max_lookup,
        "by_match_length": {n: by_setting[n] for n in args.ngram},
        "by_group": by_group,
        "lookup_only_rounds": rounds,
    }
    (args.out / "lookup.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [
        f"# Context lookup, teacher-forced: {meta['model']} {meta['dtype']}",
        "",
        f"{len(teachers)} prompts (ar's outputs in {', '.join(str(p) for p in args.records)}), "
        f"up to {args.max_lookup} tokens proposed per position. Command: "
        f"`python bench/bench_lookup.py {' '.join(sys.argv[1:])}`",
        "",
        "| lookup_ngram | match length n | positions | first token right | mean accepted |",
        "|---|---|---|---|---|",
    ]
    for n in args.ngram:
        for m, (pos, hit, acc) in sorted(by_setting[n].items()):
            lines.append(f"| {n} | {m} | {pos} | {hit / pos:.2f} | {acc / pos:.2f} |")
    lines += ["", "Tokens accepted by matches of 3 or more tokens, per group:", ""]
    groups = sorted({g for n in args.ngram for g in by_group[n]})
    lines.append("| lookup_ngram | " + " | ".join(groups) + " | all |")
    lines.append("|---|" + "---|" * (len(groups) + 1))
    for n in args.ngram:

        def long_accepted(counts):
            return sum(c[2] for m, c in counts.items() if m >= 3)

        cells = [str(long_accepted(by_group[n].get(g, {}))) for g in groups]
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {long_accepted(by_setting[n])} |")
    lines += ["", "Rounds of a lookup-only decoder (n >= 2) for ar's outputs, per group:", ""]
    keys = {g: [r["prompt_key"] for r in teachers if r["group"] == g] for g in groups}
    lines.append("| lookup_ngram | " + " | ".join(groups) + " | all |")
    lines.append("|---|" + "---|" * (len(groups) + 1))
    for n in args.ngram:
        cells = [str(sum(rounds[n][k] for k in keys[g])) for g in groups]
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {sum(rounds[n].values())} |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
