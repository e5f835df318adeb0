"""A measured cost table of one decoding setup: what a verify forward of T tokens, a layer-skip
draft step and a skip-set DP run cost on this model, dtype, device and machine.

Whether speculation pays depends on the hardware far more than on the algorithm: on a GPU at batch
1, or a CPU with bf16 matrix units, verifying 16 tokens costs about one step; on a CPU without them
it costs 3x (fp32) to 13x (bf16) a step. So the per-round policy (policy.py) decides from timings,
not assumptions. They are taken once per setup with ``ModelAdapter.forward`` (the forward the loop
runs) on a scratch cache whose first ``context`` slots stand for a realistic context (their
contents do not change the cost, so nothing is prefilled), and cached in memory and on disk
(``$CLASP_CACHE/cost_tables/<key>.json``, default ``~/.cache/clasp_ext``; or the folder
``$CLASP_COST_TABLES``), keyed by everything that changes the timings: model shape, dtype, device
and its name, attention implementation (the model's and the one the decoding forwards run), torch
threads, skip count, draft vocabulary, draft weights, torch version.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from clasp_ext.decoding.layer_search import dp_skip_search
from clasp_ext.timing import cpu_description, interleaved_times, median_time

# 2: a slow 1-token verify measured again; 3: interleaved minima, and one table per setup for
# every longest verify up to the one it measured (no max_tokens in the key)
SCHEMA = 3
DEFAULT_CONTEXT = 128
DEFAULT_REPEATS = 3

_MEMORY: dict[str, CostTable] = {}


@dataclass
class CostTable:
    """Seconds per verify forward of T new tokens (``verify_s``, measured at 1, 2, 4, ... and the
    largest T; ``verify(T)`` interpolates), per layer-skip draft token (``draft_step_s``: the kept
    layers, the draft head, the exit-threshold read) and per DP run (``dp_s``)."""

    verify_s: dict[int, float]
    draft_step_s: float
    dp_s: float
    setup: dict = field(default_factory=dict)
    context: int = DEFAULT_CONTEXT
    repeats: int = 0
    calibration_s: float = 0.0  # wall time the measurement took
    path: str | None = None  # where it was read from / written to (not serialised)

    def __post_init__(self):
        self.verify_s = dict(sorted((int(t), float(s)) for t, s in self.verify_s.items()))
        if 1 not in self.verify_s:
            raise ValueError("clasp_ext: a cost table needs verify_s[1] (one plain step)")

    @property
    def measured(self) -> bool:
        """Timed on this setup (not a synthetic table): loops may scale it by their rounds'
        measured times (policy.TimeScale)."""
        return self.repeats > 0

    def verify(self, T: int) -> float:
        """Verify cost of T tokens: linear between the measured T, extrapolated past the largest
        along the last segment (never downward). Measured dips are kept: on some CPUs a 1-token
        forward takes a slower matrix-vector path than 2 tokens do (bf16 here: 218 ms vs 172 ms),
        so verifying one draft token costs less than a plain step."""
        ts = list(self.verify_s)
        vs = [self.verify_s[t] for t in ts]
        if T <= ts[0]:
            return vs[0]
        for i in range(1, len(ts)):
            if T <= ts[i]:
                return vs[i - 1] + (vs[i] - vs[i - 1]) * (T - ts[i - 1]) / (ts[i] - ts[i - 1])
        if len(ts) == 1:
            return vs[0]
        slope = max(0.0, (vs[-1] - vs[-2]) / (ts[-1] - ts[-2]))
        return vs[-1] + slope * (T - ts[-1])

    @property
    def step_s(self) -> float:
        return self.verify_s[1]

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("path")
        d["schema"] = SCHEMA
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str) -> CostTable:
        d = json.loads(text)
        if d.pop("schema", None) != SCHEMA:
            raise ValueError("clasp_ext: cost table of another schema version")
        return cls(**d)

    def describe(self) -> str:
        """The table as text: ms per T and the ratio to one step, draft step, DP."""
        one = self.step_s
        lines = [f"{'T':>4} {'verify ms':>10} {'x step':>7}"]
        lines += [f"{t:>4} {s * 1e3:>10.2f} {s / one:>7.2f}" for t, s in self.verify_s.items()]
        d, dp = self.draft_step_s, self.dp_s
        lines.append(
            f"draft step {d * 1e3:.2f} ms ({d / one:.2f}x), DP run {dp * 1e3:.2f} ms "
            f"({dp / one:.2f}x)"
        )
        lines.append(
            f"context {self.context} tokens, fastest of {self.repeats} interleaved calls, "
            f"calibration took {self.calibration_s:.2f} s ({self.calibration_s / one:.0f} steps' "
            "worth)"
        )
        return "\n".join(lines)


# ---------------------------------------------------------------------- the setup key
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return cpu_description()
    return device.type


def setup_of(adapter, draft_head, num_skip: int, context: int, low_bit=None, batch=1) -> dict:
    """Everything the timings depend on (the cache key). Not the longest verify: one table
    serves every longest verify up to the one it measured (``get_cost_table``)."""
    cfg = adapter.config
    rows = {"batch": int(batch)} if batch > 1 else {}  # batch-1 keys as before batches existed
    return dict(
        **rows,
        model=getattr(cfg, "_name_or_path", "") or type(adapter.model).__name__,
        model_class=type(adapter.model).__name__,
        num_layers=adapter.num_layers,
        hidden_size=adapter.hidden_size,
        intermediate_size=getattr(cfg, "intermediate_size", None),
        vocab_size=adapter.vocab_size,
        dtype=str(adapter.dtype).removeprefix("torch."),
        device=adapter.device.type,
        device_name=device_name(adapter.device),
        attn_implementation=adapter.attn_implementation,
        # what the decoding forwards run (attention.py's packed sdpa, or the model's own)
        forward_attention=adapter.forward_attn_implementation,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        num_skip=int(num_skip),
        # what a skipped layer leaves out (a key only when not the whole layer: older keys hold)
        **({"skip_unit": adapter.skip_unit} if adapter.skip_unit != "layer" else {}),
        draft_vocab=draft_head.size,
        draft_weights="original" if low_bit is None else low_bit.kind,
        context=int(context),
    )


def key_of(setup: dict) -> str:
    digest = hashlib.sha1(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(setup["model"])).name)[:48] or "model"
    return f"{name}-{setup['dtype']}-{setup['device']}-{digest}"


def cache_path(key: str) -> Path:
    """``$CLASP_COST_TABLES/<key>.json`` when that is set, else under ``$CLASP_CACHE``."""
    folder = os.environ.get("CLASP_COST_TABLES")
    if not folder:
        base = os.environ.get("CLASP_CACHE") or Path.home() / ".cache" / "clasp_ext"
        folder = Path(base) / "cost_tables"
    return Path(folder) / f"{key}.json"


# ---------------------------------------------------------------------- measurement
def verify_lengths(max_tokens: int) -> list[int]:
    """1, 2, 4, ... below ``max_tokens`` / 2, and ``max_tokens`` itself (9 -> 1, 2, 4, 9): doubling
    keeps the calibration cheap; the policy interpolates between them."""
    ts, t = [], 1
    while 2 * t <= max_tokens:
        ts.append(t)
        t *= 2
    return [*ts, max(1, max_tokens)]


@torch.inference_mode()
def calibrate(
    adapter,
    draft_head,
    num_skip: int,
    max_tokens: int,
    *,
    context: int = DEFAULT_CONTEXT,
    repeats: int = DEFAULT_REPEATS,
    low_bit=None,
    batch: int = 1,
) -> CostTable:
    """Times verify (every layer + the full head) for T = 1, 2, 4, ... ``max_tokens`` new tokens,
    one draft step (the last ``num_skip`` layers skipped: the cost depends on the count only) and
    one DP run. The verifies and the draft step: the fastest of ``repeats`` calls each, in
    interleaved rounds after one untimed round (the fastest of two where a call costs over 2
    steps); the DP run: the median of ``repeats``. The draft step runs on
    ``low_bit``'s copies when one is given (low_bit.py), as the loop's does. Where
    verify is flat (GPU, bf16 matrix units) that is about 3 x (number of T + 2) steps; where it
    grows like T, about 3 + 2 x (2 + 4 + ... + max_tokens) steps plus two DP runs (a DP run costs
    about verify(M)).

    ``batch`` > 1 (batch.py): the same forwards on ``batch`` rows at once, T new tokens per row
    (verify_s[T] is then the cost of T tokens for every row); no DP run is timed, since a batch
    runs the DP per sequence, once, when it joins (dp_s = 0).
    """
    t_start = time.perf_counter()
    L, dev = adapter.num_layers, adapter.device
    M = int(num_skip)
    cache = adapter.new_cache(context + max(max_tokens, M) + 2)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, adapter.vocab_size, (batch, max_tokens), generator=gen).to(dev)

    def verify(T):
        h, hs = adapter.forward(ids[:, :T], context, cache, keep_hidden="all")
        return adapter.head(h).argmax(-1).tolist()  # the loop reads the verdict back too

    skip = [i >= L - M for i in range(L)]

    def draft():
        with low_bit.active(skip) if low_bit is not None else contextlib.nullcontext():
            h, _ = adapter.forward(ids[:, :1], context, cache, skip=skip)
        logits = draft_head.logits(h)[:, -1]
        top1 = logits.float().softmax(-1).amax(-1)  # the exit-threshold read
        return torch.cat([logits.argmax(-1).double(), top1.double()]).tolist()

    # every verify length and the draft step in interleaved rounds (a drift of the machine's
    # speed hits them alike), each length's fastest call (an interrupted call only adds time):
    # measured one after another with medians of 3, two calibrations of one setup on the 2-core
    # AVX-512 EPYC read verify 1/2/4/8 = 192/180/245/263 and 160/154/154/191 ms, and the policy
    # chose other draft lengths from each (bench/results/calibration-*)
    fns = {T: (lambda T=T: verify(T)) for T in verify_lengths(max_tokens)}
    fns["draft"] = draft
    first = interleaved_times(fns, dev, 1, warmup=1)
    # a call over two plain steps (a long verify where verify grows like T) is timed once more
    # only: there repeating costs the most
    cheap = 2 * first[1][0]
    more = {n: min(repeats, 2 if ts[0] > cheap else repeats) - 1 for n, ts in first.items()}
    times = {n: first[n] + ts for n, ts in interleaved_times(fns, dev, more, 0, rotation=1).items()}
    draft_s = min(times.pop("draft"))
    verify_s = without_spikes({T: min(ts) for T, ts in times.items()})
    dp_s = 0.0
    if M > 0 and batch == 1:
        target = torch.randn(1, L + 1, adapter.hidden_size, generator=gen).to(dev, adapter.dtype)
        dp_s = median_time(
            lambda: dp_skip_search(adapter, cache, target, context - 1, context, M).tolist(),
            dev,
            repeats,
            cheap_s=cheap,
        )
    return CostTable(
        verify_s=verify_s,
        draft_step_s=draft_s,
        dp_s=dp_s,
        context=context,
        repeats=repeats,
        calibration_s=time.perf_counter() - t_start,
    )


# A verify of more tokens never costs less than one of fewer, past the first token (one token may
# take a slower matrix-vector path: that dip is real, and kept). A T measured above a longer one is
# a sample the machine interrupted: on a shared 2-core VM a verify of 2 tokens once read 3.89
# steps between 1.00 at 1 token and 1.73 at 4, and the policy, reading verifying 2-3 tokens as
# 2-4 steps, ran plain steps for a whole benchmark run (bench/results/README.md). It is capped at
# the longer one's cost (``without_spikes``).


def _longer_min(verify_s: dict[int, float]) -> dict[int, float]:
    """For each measured T >= 2, the lowest cost of a longer measured T (inf for the longest)."""
    out, low = {}, float("inf")
    for t in sorted(verify_s, reverse=True):
        if t >= 2:
            out[t] = low
        low = min(low, verify_s[t])
    return out


def without_spikes(verify_s: dict[int, float]) -> dict[int, float]:
    """``verify_s`` with the cost of each T >= 2 capped at that of every longer measured T."""
    low = _longer_min(verify_s)
    return {t: min(s, low.get(t, s)) for t, s in sorted(verify_s.items())}


def get_cost_table(
    adapter,
    draft_head,
    num_skip: int,
    max_tokens: int,
    *,
    context: int = DEFAULT_CONTEXT,
    repeats: int = DEFAULT_REPEATS,
    low_bit=None,
    batch: int = 1,
    refresh: bool = False,
) -> CostTable:
    """The setup's table: from memory, else from disk, else measured (and saved); a table whose
    longest verify is shorter than ``max_tokens`` is measured again up to it (so decoders of one
    setup whose longest rounds differ read one table, not two calibrations that disagree by the
    machine's noise). ``refresh`` measures again. A table that cannot be written (read-only home)
    is kept in memory only."""
    setup = setup_of(adapter, draft_head, num_skip, context, low_bit, batch)
    key = key_of(setup)
    path = cache_path(key)
    table = _MEMORY.get(key)
    if table is None:
        try:
            table = CostTable.from_json(path.read_text())
            table.path = str(path)
        except (OSError, ValueError, TypeError):
            pass
    if table is not None and table.setup != setup:  # a hash collision or a hand-edited file
        table = None
    if table is not None:
        if not refresh and max(table.verify_s) >= max_tokens:
            _MEMORY[key] = table
            return table
        max_tokens = max(max_tokens, max(table.verify_s))  # the new table serves the old's too
    table = calibrate(
        adapter,
        draft_head,
        num_skip,
        max_tokens,
        context=context,
        repeats=repeats,
        low_bit=low_bit,
        batch=batch,
    )
    table.setup = setup
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(table.to_json())
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
        table.path = str(path)
    except OSError as e:
        warnings.warn(f"clasp_ext: could not save the cost table to {path}: {e}", stacklevel=2)
    old = _MEMORY.get(key)
    if old is not None:  # decoders holding the shorter table read the new one too
        vars(old).update(vars(table))
        table = old
    _MEMORY[key] = table
    return table
