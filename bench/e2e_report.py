"""Summaries of the end-to-end benchmark's per-prompt records: per method and category group, and
overall. Speedup is the geometric mean over prompts of ``speedup``: the wall-time ratio against
ar where the outputs are equal, else the method's time against ar's time to as many tokens (the
two measured back to back in one process); tokens/s is total new tokens over total wall time."""

from __future__ import annotations

import math
from collections import defaultdict

OVERALL = "overall"


def _geomean(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def _ratio(a, b):
    return a / b if b else float("nan")


def speedup(ar: dict, method: dict) -> float:
    """A method's speedup over ``ar`` on one prompt (records with ``wall_s`` and
    ``num_new_tokens``). The wall-time ratio where the outputs are equal. Where a near-tie made
    them differ in length (one stopping at an EOS the other passed), the same work on both sides:
    the method's wall time against ar's time to its ``n`` new tokens, read off ar's per-token
    timestamps (``token_times``, seconds from the call to each new token; past ar's last token,
    its mean decode step). ar's n-th timestamp leaves out the rest of its call (its last steps'
    bookkeeping), the method's wall time does not: a bias of a few milliseconds against the
    method. Without timestamps, seconds per new token, which charges the prefill to fewer tokens
    on the shorter side."""
    n, n_ar = method["num_new_tokens"], ar["num_new_tokens"]
    times = ar.get("token_times")
    if n == n_ar or not times or n < 1:
        per_token = lambda r: r["wall_s"] / max(1, r["num_new_tokens"])  # noqa: E731
        return per_token(ar) / per_token(method)
    if n <= len(times):
        ar_s = times[n - 1]
    else:
        step = (times[-1] - times[0]) / max(1, len(times) - 1)
        ar_s = ar["wall_s"] + (n - len(times)) * step
    return ar_s / method["wall_s"]


def summarize(records: list[dict], methods: list[str], groups: list[str]) -> list[dict]:
    """One row per (group, method), groups in the given order, then ``overall``."""
    by_prompt = defaultdict(dict)
    for r in records:
        by_prompt[r["prompt_key"]][r["method"]] = r
    rows = []
    for group in [*groups, OVERALL]:
        prompts = [
            p
            for p in by_prompt.values()
            if group == OVERALL or next(iter(p.values()))["group"] == group
        ]
        for m in methods:
            recs = [p[m] for p in prompts if m in p]
            if not recs:
                continue
            ratios = [speedup(p["ar"], p[m]) for p in prompts if m in p and "ar" in p]
            tokens = sum(r["num_new_tokens"] for r in recs)
            wall = sum(r["wall_s"] for r in recs)

            def total(key, rs=recs):
                vals = [r[key] for r in rs if r.get(key) is not None]
                return sum(vals) if vals else None

            def share(part, rs=recs):
                vals = [r["times"] for r in rs if r.get("times")]
                tot = sum(t["total"] for t in vals)
                return sum(t[part] for t in vals) / tot if vals and tot else None

            rounds, round_tokens = total("rounds"), total("round_tokens")
            drafted, accepted = total("drafted"), total("accepted")
            dp_runs = total("dp_runs")
            dp_time = sum(r["times"]["dp"] for r in recs if r.get("times"))
            verify_time = sum(r["times"]["verify"] for r in recs if r.get("times"))
            rows.append(
                dict(
                    group=group,
                    method=m,
                    prompts=len(recs),
                    tokens=tokens,
                    tokens_per_s=_ratio(tokens, wall),
                    speedup=_geomean(ratios) if ratios else float("nan"),
                    speedup_min=min(ratios, default=float("nan")),
                    speedup_max=max(ratios, default=float("nan")),
                    tau=_ratio(round_tokens, rounds) if rounds else None,
                    acceptance=_ratio(accepted, drafted) if drafted else None,
                    draft_share=share("draft"),
                    verify_share=share("verify"),
                    dp_share=share("dp"),
                    dp_vs_verify=(
                        _ratio(dp_time / dp_runs, verify_time / rounds)
                        if dp_runs and rounds and verify_time
                        else None
                    ),
                    identical=sum(1 for r in recs if r["equal_to_ar"]),
                    near_ties=sum(
                        1 for r in recs if (r.get("divergence") or {}).get("near_tie", False)
                    ),
                )
            )
    return rows


def _fmt(x, spec):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(rows: list[dict], methods: list[str], groups: list[str], header: str) -> str:
    out = [header, "", f"## Overall ({rows[-1]['prompts'] if rows else 0} prompts per method)", ""]
    out.append(
        "| method | speedup (geo. mean) | range | tokens/s | tau | acceptance | draft | verify "
        "| DP | DP run / verify | identical to ar | differences at near-ties |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["group"] != OVERALL:
            continue
        out.append(
            f"| {r['method']} | {_fmt(r['speedup'], '.2f')}x "
            f"| {_fmt(r['speedup_min'], '.2f')}-{_fmt(r['speedup_max'], '.2f')} "
            f"| {_fmt(r['tokens_per_s'], '.2f')} | {_fmt(r['tau'], '.2f')} "
            f"| {_fmt(r['acceptance'], '.2f')} | {_fmt(r['draft_share'], '.0%')} "
            f"| {_fmt(r['verify_share'], '.0%')} | {_fmt(r['dp_share'], '.1%')} "
            f"| {_fmt(r['dp_vs_verify'], '.2f')} | {r['identical']}/{r['prompts']} "
            f"| {r['near_ties']}/{r['prompts'] - r['identical']} |"
        )
    out += ["", "## Speedup over ar per category group (geometric mean; tau in brackets)", ""]
    present = [g for g in groups if any(r["group"] == g for r in rows)]
    out.append("| method | " + " | ".join(present) + " | overall |")
    out.append("|---|" + "---|" * (len(present) + 1))
    cell = {(r["group"], r["method"]): r for r in rows}
    for m in methods:
        parts = []
        for g in [*present, OVERALL]:
            r = cell.get((g, m))
            if r is None:
                parts.append("-")
                continue
            tau = f" ({r['tau']:.1f})" if r["tau"] is not None else ""
            parts.append(f"{_fmt(r['speedup'], '.2f')}x{tau}")
        out.append(f"| {m} | " + " | ".join(parts) + " |")
    return "\n".join(out) + "\n"


def chart(rows: list[dict], methods: list[str], groups: list[str], path, title: str) -> bool:
    """Grouped bars of speedup per category and method; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cell = {(r["group"], r["method"]): r["speedup"] for r in rows}
    present = [g for g in groups if any((g, m) in cell for m in methods)] + [OVERALL]
    shown = [m for m in methods if m != "ar"]
    width = 0.8 / max(1, len(shown))
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(present)), 4.5))
    for k, m in enumerate(shown):
        xs = [i + (k - (len(shown) - 1) / 2) * width for i in range(len(present))]
        ys = [cell.get((g, m), float("nan")) for g in present]
        ax.bar(xs, ys, width, label=m)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(present)), present)
    ax.set_ylabel("speedup over ar (geometric mean)")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=min(4, len(shown)))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
