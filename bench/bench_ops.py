"""Kernel microbenchmark: every clasp op against its reference, eager and under torch.compile.

    python bench/bench_ops.py --device cpu --threads 2          # full CPU table
    python bench/bench_ops.py --device cuda                     # full GPU table
    python bench/bench_ops.py --device cpu --quick              # CI smoke (< 60 s, no compile)

Sizes are decode sizes (batch 1): hidden d in {2048, 4096, 8192}, up to M+1 = 41 DP cells or
candidates, up to K = 16 drafts, vocabularies of current models. For each case the three
implementations run interleaved, one call each per repetition, so that load drifting on a shared
machine hits them alike; the table reports medians (JSON adds p10/p90 and every sample).

GPU timings are CUDA events around one call with the L2 cache flushed before it (the inputs of the
largest cases fit in an H100's 50 MB L2, which would overstate the bandwidth); launches queued
while the flush runs overlap it, as in triton.testing.do_bench. CPU timings are time.perf_counter
around one call, caches warm.

Results: a table on stdout, JSON (records + environment) at --out and the same table as markdown
next to it. Both files are rewritten after every case, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from clasp_ext import build_info, ops, reference  # noqa: E402
from clasp_ext.ops import OP_NAMES  # noqa: E402
from clasp_ext.timing import cpu_description, cpu_name  # noqa: E402

IMPLS = ("clasp", "eager", "compiled")

# Peak HBM bandwidth in GB/s, first substring match of the device name wins (so the specific
# names come before the generic ones).
PEAK_BANDWIDTH_GBS = (
    ("H200", 4800),
    ("H100 PCIe", 2000),
    ("H100 NVL", 3900),
    ("H100", 3350),  # SXM, named "NVIDIA H100 80GB HBM3"
    ("A100-SXM4-40GB", 1555),
    ("A100-PCIE-40GB", 1555),
    ("A100 80GB PCIe", 1935),
    ("A100", 2039),
)

# What each op must reach against the eager reference (issue 2, section 5).
TARGET_SPEEDUP = {"cpu": 1.0, "cuda": 3.0}

HIDDEN = (2048, 4096, 8192)
LAYERS = {2048: 28, 4096: 32, 8192: 80}  # L of a model with that hidden size (1.5B, 8B, 70B)
CELLS = (17, 41)  # M+1: half the layers of an 8B model and of a 70B model skipped
BACKTRACK = ((32, 17), (80, 41))  # (L, M+1) of those two models
DRAFTS = (4, 16)
VOCABS = (32000, 128256, 152064, 262144)
DTYPES = (torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------
# Case table: which sizes each op runs at, and how its inputs are built.


@dataclass
class Prepared:
    """Inputs of one case, built once, and what the timer needs to know about them."""

    args: tuple
    bytes_moved: int  # the traffic the op cannot avoid, for the bandwidth column
    reset: Callable[[], None] = lambda: None  # restores inputs the op mutates
    info: dict = field(default_factory=dict)  # extra facts for the JSON (e.g. accepted drafts)


def _randn(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, device="cpu").to(device=device, dtype=dtype)


def _elt(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _seq_lens(B, device):
    """seq_lens (mutated in place by the clasp verify ops) and a reset that restores it."""
    pristine = torch.full((B,), 100, dtype=torch.int32, device=device)
    seq_lens = pristine.clone()
    return seq_lens, lambda: seq_lens.copy_(pristine)


def make_cosine_scores(s, dtype, device, gen):
    B, n, d = s["B"], s["n"], s["d"]
    cand, target = _randn((B, n, d), dtype, device, gen), _randn((B, d), dtype, device, gen)
    return Prepared((cand, target), B * (n + 1) * d * _elt(dtype) + B * n * 4)


def make_layer_importance(s, dtype, device, gen):
    B, L, d = s["B"], s["L"], s["d"]
    hidden = _randn((B, L + 1, d), dtype, device, gen)
    return Prepared((hidden,), B * (L + 1) * d * _elt(dtype) + B * L * 4)


def make_skip_search_step(s, dtype, device, gen):
    # layer = M makes every cell reachable (reach = M) with both choices (l = min(layer, M) = M):
    # the largest row of the DP.
    B, W, d = s["B"], s["cells"], s["d"]
    M = W - 1
    prev, computed = _randn((B, W, d), dtype, device, gen), _randn((B, M, d), dtype, device, gen)
    target = _randn((B, d), dtype, device, gen)
    rows = M + M + 1 + W  # read prev[0..M-1], computed, target; write next
    return Prepared((prev, computed, target, M), B * rows * d * _elt(dtype) + B * W * 5)


def make_skip_search_backtrack(s, dtype, device, gen):
    B, L, W = s["B"], s["L"], s["cells"]
    choices = torch.randint(0, 2, (B, L, W), generator=gen, dtype=torch.uint8).to(device)
    return Prepared((choices, W - 1), B * L * (W + 1))


def make_verify_greedy(s, dtype, device, gen):
    # Drafts equal the target's argmax, so all K are accepted: every row of the logits is needed.
    B, K, V = s["B"], s["K"], s["V"]
    logits = _randn((B, K + 1, V), dtype, device, gen)
    drafts = logits[:, :K].float().argmax(dim=-1)
    num_draft = torch.full((B,), K, dtype=torch.int32, device=device)
    seq_lens, reset = _seq_lens(B, device)
    nbytes = B * (K + 1) * V * _elt(dtype) + B * (K * 8 + 4 + 8 + 4 + (K + 1) * 8)
    return Prepared((drafts, num_draft, logits, seq_lens), nbytes, reset, {"accepted": K})


def make_verify_sample(s, dtype, device, gen):
    # q and p are different softmaxed distributions. The drafts are where q exceeds p the most, the
    # first K//2 acceptance uniforms are 0 (accept) and the next is ~1 (reject), so every call
    # takes the residual path at a fixed position: it reads K gathered p/q pairs plus the full p
    # and q rows at the rejection.
    B, K, V = s["B"], s["K"], s["V"]
    q = torch.softmax(torch.randn((B, K, V), generator=gen), dim=-1)
    p = torch.softmax(torch.randn((B, K + 1, V), generator=gen), dim=-1)
    drafts = (q - p[:, :K]).argmax(dim=-1)
    uniforms = torch.rand((B, K + 1, 2), generator=gen)
    uniforms[:, : K // 2, 0] = 0.0
    uniforms[:, K // 2 :, 0] = 0.999999
    num_draft = torch.full((B,), K, dtype=torch.int32)
    seq_lens, reset = _seq_lens(B, device)
    args = [drafts, num_draft, q.to(dtype), p.to(dtype), uniforms]
    args = tuple(a.to(device) for a in args) + (seq_lens,)
    accepted = reference.verify_sample(*args)[0]
    rows = int((1 + (accepted < args[1]).int()).sum())  # p row, plus the q row if rejected
    nbytes = (rows * V + 2 * B * K) * _elt(dtype) + uniforms.numel() * 4 + B * (K + 1) * 8
    return Prepared(args, nbytes, reset, {"accepted": accepted.tolist()})


MAKERS = {name: globals()[f"make_{name}"] for name in OP_NAMES}


def case_table(quick: bool) -> list[tuple[str, dict, torch.dtype | None]]:
    """(op, sizes, dtype) of every case; dtype None where the op has no float input."""
    hidden, cells, drafts, vocabs, backtrack = HIDDEN, CELLS, DRAFTS, VOCABS, BACKTRACK
    if quick:
        hidden, cells, drafts, vocabs, backtrack = (4096,), (41,), (16,), (128256,), BACKTRACK[-1:]
    shapes = {
        "cosine_scores": [{"B": 1, "n": w, "d": d} for d in hidden for w in cells],
        "layer_importance": [{"B": 1, "L": LAYERS[d], "d": d} for d in hidden],
        "skip_search_step": [{"B": 1, "cells": w, "d": d} for d in hidden for w in cells],
        "skip_search_backtrack": [{"B": 1, "L": L, "cells": w} for L, w in backtrack],
        "verify_greedy": [{"B": 1, "K": k, "V": v} for v in vocabs for k in drafts],
        "verify_sample": [{"B": 1, "K": k, "V": v} for v in vocabs for k in drafts],
    }
    cases = []
    for op in OP_NAMES:
        dtypes = (None,) if op == "skip_search_backtrack" else DTYPES
        cases += [(op, s, dt) for s in shapes[op] for dt in dtypes]
    return cases


# ---------------------------------------------------------------------------------------------
# Timing.


class Timer:
    """Times one call: CUDA events on the GPU (L2 flushed first), perf_counter on the CPU."""

    L2_FLUSH_BYTES = 256 << 20  # larger than any current L2

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.flush_buf = torch.empty(self.L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn: Callable[[], object]) -> float:
        """Microseconds of one fn() call."""
        if self.cuda:
            self.flush_buf.zero_()
            self.start.record()
            fn()
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end) * 1e3
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def time_interleaved(impls, reset, timer, reps, budget_s, min_reps, warmup=3):
    """{impl: [us, ...]}: each repetition calls every impl once, reset (untimed) before each call.

    The order rotates between repetitions so no implementation always runs right after the same
    other one. With reps=None the count adapts: as many as fit in budget_s, at least min_reps.
    """
    for fn in impls.values():
        for _ in range(warmup):
            reset()
            fn()
    timer.sync()
    names = list(impls)
    samples = {name: [] for name in names}

    def one_round(r):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            reset()
            timer.sync()
            samples[name].append(timer(impls[name]))

    t0 = time.perf_counter()
    one_round(0)
    if reps is None:
        round_s = time.perf_counter() - t0
        reps = max(min_reps, min(2000, int(budget_s / max(round_s, 1e-9))))
    for r in range(1, reps):
        one_round(r)
    return samples


def summarize(us: list[float]) -> dict:
    """Order statistics of the samples (the raw samples would make the JSON megabytes long)."""
    dec = statistics.quantiles(us, n=10, method="inclusive") if len(us) > 1 else [us[0]] * 9
    stats = {"median_us": statistics.median(us), "p10_us": dec[0], "p90_us": dec[8]}
    stats.update(min_us=min(us), mean_us=statistics.fmean(us))
    return {k: round(v, 3) for k, v in stats.items()} | {"n": len(us)}


# ---------------------------------------------------------------------------------------------
# One case.


def _error(err: Exception) -> str:
    first = str(err).strip().splitlines()
    return f"{type(err).__name__}: {first[0][:160] if first else ''}"


def _outputs(x) -> list[torch.Tensor]:
    return list(x) if isinstance(x, tuple | list) else [x]


def check_against_reference(op, prep) -> str:
    """'ok' when the clasp outputs match the reference's (each run on freshly reset inputs).

    verify_sample is checked against the reference's exact_order mode (the kernels' float32
    summation order, CPU only): the default float64 draw may pick a neighbouring token when a
    uniform lands within rounding of a CDF boundary, which is not a kernel bug.
    """
    prep.reset()
    got = _outputs(getattr(ops, op)(*prep.args))
    prep.reset()
    if op == "verify_sample":
        cpu_args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in prep.args]
        want = _outputs(reference.verify_sample(*cpu_args, exact_order=True))
    else:
        want = _outputs(getattr(reference, op)(*prep.args))
    for i, (g, w) in enumerate(zip(got, want, strict=False)):  # refs may return more (seq_lens)
        w = w.to(device=g.device, dtype=g.dtype)
        same = (
            torch.allclose(g.float(), w.float(), rtol=1e-3, atol=1e-3)
            if g.is_floating_point()
            else torch.equal(g, w)
        )
        if not same:
            return f"MISMATCH in output {i}"
    return "ok"


def compile_reference(op, prep) -> tuple[Callable | None, dict]:
    """The reference under torch.compile(fullgraph=True): (fn, record) or (None, reason)."""
    torch._dynamo.reset()  # fresh cache per case: no recompile limit, no dynamic-shape fallback
    fn = torch.compile(getattr(reference, op), fullgraph=True, dynamic=False)
    t0 = time.perf_counter()
    try:
        prep.reset()
        fn(*prep.args)
        if prep.args[0].is_cuda:
            torch.cuda.synchronize()
    except Exception as err:  # graph breaks and inductor failures are results, not crashes
        return None, {"status": "fail", "error": _error(err)}
    return fn, {"status": "ok", "compile_s": round(time.perf_counter() - t0, 2)}


def run_case(op, sizes, dtype, device, args, timer, deadline) -> dict:
    rec = {"op": op, "sizes": sizes, "dtype": str(dtype).removeprefix("torch.") if dtype else "-"}
    rec["load_avg_1min"] = os.getloadavg()[0]  # other processes make CPU timings noisy
    gen = torch.Generator().manual_seed(0)
    prep = MAKERS[op](sizes, dtype, device, gen)
    rec.update(bytes_moved=prep.bytes_moved, info=prep.info, impls={})
    impls = {
        "clasp": lambda: getattr(ops, op)(*prep.args),
        "eager": lambda: getattr(reference, op)(*prep.args),
    }
    try:
        rec["check"] = check_against_reference(op, prep)
    except Exception as err:  # a failing kernel should not stop the other cases
        rec["check"] = _error(err)
        rec["impls"]["clasp"] = {"status": "fail", "error": rec["check"]}
        del impls["clasp"]

    if args.no_compile or args.quick:
        rec["impls"]["compiled"] = {"status": "skip", "error": "--no-compile/--quick"}
    elif time.perf_counter() > deadline:
        rec["impls"]["compiled"] = {"status": "skip", "error": "--time-budget spent"}
    else:
        compiled, rec["impls"]["compiled"] = compile_reference(op, prep)
        if compiled is not None:
            impls["compiled"] = lambda: compiled(*prep.args)

    budget = 0.3 if args.quick else (0.6 if device.type == "cuda" else 1.5)
    samples = time_interleaved(
        impls, prep.reset, timer, args.reps, budget, min_reps=5 if args.quick else 20
    )
    for name, us in samples.items():
        rec["impls"].setdefault(name, {"status": "ok"}).update(summarize(us))
    return rec


# ---------------------------------------------------------------------------------------------
# Reporting.


def peak_bandwidth(device_name: str) -> float | None:
    for key, gbs in PEAK_BANDWIDTH_GBS:
        if key.lower() in device_name.lower():
            return gbs
    return None


def derive(rec, peak, target):
    """Speedups and bandwidth from the medians (None where an implementation is missing)."""
    med = {k: v.get("median_us") for k, v in rec["impls"].items()}
    clasp = med.get("clasp")
    for ref in ("eager", "compiled"):
        rec[f"speedup_vs_{ref}"] = med[ref] / clasp if clasp and med.get(ref) else None
    rec["gbs"] = rec["bytes_moved"] / (clasp * 1e3) if clasp else None
    rec["pct_peak"] = 100 * rec["gbs"] / peak if rec["gbs"] and peak else None
    s = rec["speedup_vs_eager"]
    rec["meets_target"] = None if s is None else s >= target


def _cell(impl: dict) -> str:
    if impl.get("status") != "ok":  # the full error is in the JSON
        return f"{impl.get('status', '?')}: {impl.get('error', '')[:60]}".replace("|", "/")
    return f"{impl['median_us']:.1f} ({impl['p10_us']:.1f}-{impl['p90_us']:.1f})"


def _num(x, fmt):
    return "-" if x is None else format(x, fmt)


def markdown_table(records, env) -> str:
    device_type = env["device"]
    head = (
        f"{env['device_name']}; torch {env['torch']}; {env['threads']} threads; 1-min load "
        f"average at start {env['load_avg_start'][0]:.1f}, end {env['load_avg_end'][0]:.1f}\n\n"
    )
    cols = ["op", "shape", "dtype", "clasp us", "eager us", "compiled us", "vs eager"]
    cols += ["vs compiled", "GB/s", "% peak", "target", "check"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        shape = " ".join(f"{k}={v}" for k, v in r["sizes"].items())
        target = {None: "-", True: "ok", False: "MISS"}[r["meets_target"]]
        row = [r["op"], shape, r["dtype"]] + [_cell(r["impls"].get(i, {})) for i in IMPLS]
        row += [_num(r["speedup_vs_eager"], ".2f"), _num(r["speedup_vs_compiled"], ".2f")]
        row += [_num(r["gbs"], ".1f"), _num(r["pct_peak"], ".1f"), target]
        row.append(r["check"].replace("|", "/"))
        lines.append("| " + " | ".join(row) + " |")
    note = (
        f"\nTimes: median (p10-p90) in microseconds per call; target: clasp >= "
        f"{TARGET_SPEEDUP[device_type]:g}x faster than eager. GB/s counts the bytes the op must "
        "move (bench_ops.py, make_*)."
    )
    return head + "\n".join(lines) + "\n" + note + "\n"


def environment(device) -> dict:
    env = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_model": cpu_description(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "clasp_build": build_info(),
        "load_avg_start": os.getloadavg(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        env["git_commit"] = None
    if device.type == "cuda":
        env["peak_bandwidth_gbs"] = peak_bandwidth(env["device_name"])
    return env


def default_out(env) -> Path:
    slug = "cpu"
    if env["device"] == "cuda":  # the card's name, e.g. ops_nvidia_h100_80gb_hbm3.json
        slug = re.sub(r"[^a-z0-9]+", "_", env["device_name"].lower()).strip("_")
    return ROOT / "bench" / "results" / f"ops_{slug}.json"


def save(out: Path, env, records):
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(env, load_avg_end=os.getloadavg())
    out.write_text(json.dumps({"environment": env, "records": records}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown_table(records, env))


# ---------------------------------------------------------------------------------------------


def round_robin_by_op(cases) -> list[int]:
    """Case indices taking one case of each op in turn, so that when --time-budget runs out the
    compiled column is missing evenly across ops rather than for every case of the last ops."""
    per_op = {}
    for i, (op, _, _) in enumerate(cases):
        per_op.setdefault(op, []).append(i)
    rows = itertools.zip_longest(*per_op.values())
    return [i for row in rows for i in row if i is not None]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--ops", nargs="+", choices=OP_NAMES, default=list(OP_NAMES))
    p.add_argument("--quick", action="store_true", help="few sizes and reps, no compile (CI)")
    p.add_argument("--reps", type=int, help="repetitions per case (default: adaptive)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU kernels)")
    p.add_argument(
        "--time-budget",
        type=float,
        help="seconds after which the remaining cases skip torch.compile (keeps GPU runs bounded)",
    )
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/ops_<device>.json)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_ops: --device cuda but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(device)
    out = args.out or default_out(env)
    peak = env.get("peak_bandwidth_gbs")
    target = TARGET_SPEEDUP[device.type]
    print(f"# {env['device_name']}, torch {env['torch']}, {env['threads']} threads -> {out}")
    timer = Timer(device)
    t_start = time.perf_counter()
    deadline = t_start + (args.time_budget if args.time_budget else float("inf"))
    cases = [c for c in case_table(args.quick) if c[0] in args.ops]
    done = {}  # case index -> record; saved in case-table order
    for k, idx in enumerate(round_robin_by_op(cases), 1):
        op, sizes, dtype = cases[idx]
        rec = run_case(op, sizes, dtype, device, args, timer, deadline)
        derive(rec, peak, target)
        done[idx] = rec
        records = [done[i] for i in sorted(done)]
        save(out, env, records)
        meds = {i: rec["impls"][i].get("median_us") for i in IMPLS if i in rec["impls"]}
        print(
            f"[{k}/{len(cases)} {time.perf_counter() - t_start:.0f}s] {op} {sizes} "
            f"{rec['dtype']}: " + ", ".join(f"{i} {_num(v, '.1f')}" for i, v in meds.items()),
            flush=True,
        )
    env["total_s"] = round(time.perf_counter() - t_start, 1)
    save(out, env, records)
    print()
    print(markdown_table(records, dict(env, load_avg_end=os.getloadavg())))
    print(f"total {env['total_s']} s; wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
