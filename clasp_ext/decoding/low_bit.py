"""Low-bit copies of the draft's weights (``ClaspConfig(draft_weights="int8" | "int4")``).

A layer-skip draft step reads every weight of the kept layers once per token, so on a
memory-bound device its cost is their bytes. An int8 copy with one scale per output channel
halves the bytes of a bf16 weight (``torch._weight_int8pack_mm`` multiplies with it directly);
an int4 copy with a scale and a zero per group of ``INT4_GROUP`` inputs quarters them
(``torch._weight_int4pack_mm_for_cpu`` on CPUs, the tinygemm kernel ``_weight_int4pack_mm`` on
CUDA). Only draft steps use the copies (``LowBitDraft.active``): the verify pass, the DP and the
prefill run the model's own weights, so the output is exactly what it is without them; the
copies only change what is proposed, and how often it is accepted.

The copies are made per layer the first time the layer is kept by a draft (the skip set can
change after each DP run), and for the draft head's first ``size`` vocabulary rows
(``DraftHead``); ``nbytes`` says how much is held.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOW_BIT_KINDS = ("int8", "int4")
DRAFT_WEIGHTS = ("auto", "original", *LOW_BIT_KINDS)
# "auto" considers low-bit copies only for layers this large: below it a draft step is bound by
# per-call overheads, not by weight bytes, and a copy cannot pay (it also keeps tiny test models
# on one deterministic path).
AUTO_MIN_LAYER_BYTES = 8 << 20
# ... and takes int8 when one layer's linears at one token run at least this much faster on it
AUTO_MIN_SPEEDUP = 1.25
# ... and int4 over int8 when it runs this much faster again: an int4 draft is accepted a little
# less often (Qwen2.5-1.5B bf16, one run of 6 prompts: 0.79 of draft tokens against 0.81).
# bench/bench_low_bit.py: AMX Xeon bf16, int4 1.5x faster than int8 (int4 chosen); on the AVX2
# EPYC int4 was 0.83x of int8's speed (../shared/research/quantized_draft.md; int8 chosen).
AUTO_INT4_OVER_INT8 = 1.2
# ... timed over this many bytes of consecutive layers (see auto_kind)
AUTO_MEASURE_BYTES = 512 << 20
# torch._weight_int8pack_mm on CPU (torch 2.13, AVX-512) returns wrong values or crashes for
# some inner sizes K that are not a multiple of 16 (bf16, K = 7, 9, 200: relative errors up to
# 1e13, segfaults), and is right for every multiple of 16 we swept (16..8960, fp32 and bf16, 1-9
# rows, 1-256 outputs). Such a linear keeps its own weights in the draft; real models' hidden and
# MLP sizes are multiples of 64.
K_MULTIPLE = 16
# int4: inputs per (scale, zero) group. 32 is the most accurate size the kernels take (on random
# weights 7.8% relative error per linear against 10% at 128, for 18% more bytes; speed within 2%
# on the AVX2 EPYC: ../shared/research/quantized_draft.md). The CPU packing needs N % 16 == 0
# (CUDA's N % 8).
INT4_GROUP = 32
_INT4_INNER_K_TILES = 2  # CUDA packing: K must be a multiple of 16 x this = 32 = INT4_GROUP


class Int8Weight:
    """``x @ w.T (+ b)`` on a per-output-channel symmetric int8 copy of ``w`` [N, K]."""

    kind = "int8"

    @staticmethod
    def supports(weight: Tensor) -> bool:
        return weight.dim() == 2 and weight.shape[1] % K_MULTIPLE == 0

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        if not self.supports(weight):
            raise ValueError(
                f"clasp_ext: an int8 copy needs a 2-D weight whose inner size is a multiple of "
                f"{K_MULTIPLE}, got {tuple(weight.shape)}"
            )
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        self.q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(weight.dtype)
        self.bias = None if bias is None else bias.detach()
        self.out_features = weight.shape[0]

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * self.scale.element_size()

    def dequantized(self) -> Tensor:
        """The fp32 weight this copy multiplies by (the tests' reference)."""
        return self.q.float() * self.scale.float()[:, None]

    def __call__(self, x: Tensor) -> Tensor:
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.q, self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def int4_quantize(weight: Tensor, group: int = INT4_GROUP) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric 4-bit codes of ``weight`` [N, K] per group of ``group`` inputs, in the
    kernels' (tinygemm) convention ``w = (q - 8) * scale + zero``: codes int32 [N, K] in 0..15,
    scale and zero fp32 [N, K / group] (the group's minimum maps to code 0, its maximum to 15)."""
    N, K = weight.shape
    w = weight.detach().float().reshape(N, K // group, group)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.int32)
    return q.reshape(N, K), scale, lo + 8 * scale


class Int4Weight:
    """``x @ w.T (+ b)`` on a group-wise asymmetric int4 copy of ``w`` [N, K]."""

    kind = "int4"

    @staticmethod
    def supports(weight: Tensor) -> bool:
        return weight.dim() == 2 and weight.shape[1] % INT4_GROUP == 0 and weight.shape[0] % 16 == 0

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        if not self.supports(weight):
            raise ValueError(
                f"clasp_ext: an int4 copy needs a 2-D weight with an inner size that is a "
                f"multiple of {INT4_GROUP} and an output size that is a multiple of 16, got "
                f"{tuple(weight.shape)}"
            )
        q, scale, zero = int4_quantize(weight)
        self.cuda = weight.device.type == "cuda"
        if self.cuda:  # tinygemm: two codes per byte, then its tiled layout
            pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            self.packed = torch._convert_weight_to_int4pack(pairs, _INT4_INNER_K_TILES)
        else:
            self.packed = torch._convert_weight_to_int4pack_for_cpu(q, _INT4_INNER_K_TILES)
        # [K / group, N, 2]: each group's (scale, zero) per output, in the activations' dtype
        self.scale_zeros = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
        self.scale_zeros = self.scale_zeros.to(weight.dtype)
        self.bias = None if bias is None else bias.detach()
        self.out_features = weight.shape[0]

    @property
    def nbytes(self) -> int:
        sz = self.scale_zeros
        return self.packed.numel() * self.packed.element_size() + sz.numel() * sz.element_size()

    def dequantized(self, codes: Tensor) -> Tensor:
        """The fp32 weight this copy multiplies by, from its ``codes`` (``int4_quantize``; the
        packed layout is the kernel's own): the tests' reference."""
        sz = self.scale_zeros.float().transpose(0, 1)  # [N, K / group, 2]
        q = codes.float().reshape(sz.shape[0], sz.shape[1], -1)
        return ((q - 8) * sz[..., :1] + sz[..., 1:]).reshape(codes.shape)

    def __call__(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if self.cuda:
            y = torch._weight_int4pack_mm(x2, self.packed, INT4_GROUP, self.scale_zeros)
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, INT4_GROUP, self.scale_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


KINDS = {"int8": Int8Weight, "int4": Int4Weight}

# One copy per linear module (and kind and row count) per process, made once: decoders are
# created per call of ``clasp_ext.generate``, and quantizing the kept layers of a 1.5B model
# takes seconds. Keyed weakly by the module; remade when its weight tensor is replaced or
# modified in place.
_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def low_bit_copy(linear: nn.Module, kind: str = "int8", rows: int | None = None):
    """The (cached) ``kind`` copy of ``linear``'s weight (its first ``rows`` rows when given)."""
    w = linear.weight
    stamp = (w.data_ptr(), w._version, w.dtype, w.device)
    per_module = _COPIES.setdefault(linear, {})
    hit = per_module.get((kind, rows))
    if hit is None or hit[0] != stamp:
        bias = getattr(linear, "bias", None)
        if rows is not None:
            w, bias = w[:rows], None if bias is None else bias[:rows]
        per_module[(kind, rows)] = hit = (stamp, KINDS[kind](w, bias))
    return hit[1]


def low_bit_linears(layer: nn.Module, kind: str = "int8") -> list[nn.Linear]:
    """The linears of ``layer`` that get a ``kind`` copy: plain ``nn.Linear`` of a supported
    shape (subclasses, e.g. quantized or LoRA layers, and other shapes keep their own forward)."""
    cls = KINDS[kind]
    return [m for m in layer.modules() if type(m) is nn.Linear and cls.supports(m.weight)]


_AUTO: dict[tuple, str | None] = {}


def auto_kind(layers, repeats: int = 7) -> str | None:
    """draft_weights="auto": which copy makes the decoder layers' linears fastest at one token
    (``choose_kind`` over ``measure_kinds``), measured once per process for each layer shape,
    dtype, device and thread count; the copies of the kinds not chosen are freed."""
    layers = list(layers)
    linears = low_bit_linears(layers[0]) if layers else []
    if not linears:
        return None
    w0 = linears[0].weight
    key = (
        tuple(tuple(m.weight.shape) for m in linears),
        w0.dtype,
        str(w0.device),
        torch.get_num_threads(),
    )
    if key not in _AUTO:
        choice = choose_kind(measure_kinds(layers, repeats))
        for m in (m for layer in _measured_layers(layers) for m in low_bit_linears(layer)):
            for k in [k for k in _COPIES.get(m, {}) if k[0] != choice]:
                _COPIES[m].pop(k)
        _AUTO[key] = choice
    return _AUTO[key]


def choose_kind(times: dict) -> str | None:
    """The rule over ``measure_kinds``' times: "int4" where it runs at least
    ``AUTO_INT4_OVER_INT8`` x faster than int8 (or ``AUTO_MIN_SPEEDUP`` x faster than the model's
    weights where int8 does not pay), else "int8" where that runs ``AUTO_MIN_SPEEDUP`` x faster
    than the model's weights, else None (the layers are small, the kernels are missing, or
    neither pays: fp32 on CPUs, where an fp32 GEMV is faster than either kernel)."""
    choice = None
    if "int8" in times and times[None] >= AUTO_MIN_SPEEDUP * times["int8"]:
        choice = "int8"
    if (
        "int4" in times
        and times[choice] >= (AUTO_INT4_OVER_INT8 if choice else AUTO_MIN_SPEEDUP) * times["int4"]
    ):
        choice = "int4"
    return choice


def _measured_layers(layers: list) -> list:
    """The first of ``layers`` that hold ``AUTO_MEASURE_BYTES`` of linear weights (at least one)."""
    layer_bytes = sum(
        m.weight.numel() * m.weight.element_size() for m in low_bit_linears(layers[0])
    )
    return layers[: max(1, min(len(layers), -(-AUTO_MEASURE_BYTES // max(layer_bytes, 1))))]


def measure_kinds(layers, repeats: int = 7) -> dict:
    """Median seconds of one token through the linears of the first decoder layers of ``layers``
    holding ``AUTO_MEASURE_BYTES`` (one after another, as a draft step runs them: one layer alone
    can sit in a large last-level cache, an int4 Qwen2.5-1.5B layer is 29 MB, which favours
    whichever copy fits) on the model's weights (key None) and on each low-bit kind this torch
    has a kernel for, interleaved (``timing.median_times``). Empty where a layer's weights are
    under ``AUTO_MIN_LAYER_BYTES``. The copies it makes stay cached (``low_bit_copy``)."""
    from clasp_ext.timing import median_times

    layers = list(layers)
    linears = low_bit_linears(layers[0]) if layers else []
    if sum(m.weight.numel() * m.weight.element_size() for m in linears) < AUTO_MIN_LAYER_BYTES:
        return {}
    used = _measured_layers(layers)
    linears = [m for layer in used for m in low_bit_linears(layer)]
    w0 = linears[0].weight
    xs = {id(m): torch.randn(1, m.in_features, dtype=w0.dtype, device=w0.device) for m in linears}
    runs = {
        None: [
            (functools.partial(F.linear, weight=m.weight, bias=m.bias), xs[id(m)]) for m in linears
        ]
    }
    for kind in LOW_BIT_KINDS:
        try:
            check_supported(kind, w0.device, w0.dtype)
        except ValueError:
            continue
        ms = [m for layer in used for m in low_bit_linears(layer, kind)]
        runs[kind] = [(low_bit_copy(m, kind), xs[id(m)]) for m in ms]
    with torch.inference_mode():
        return median_times(
            {kind: functools.partial(_run_all, calls) for kind, calls in runs.items()},
            w0.device,
            repeats,
        )


def _run_all(calls) -> None:
    for f, x in calls:
        f(x)


def check_supported(kind: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raises ValueError when this torch has no ``kind`` weight matmul for the device / dtype."""
    try:
        w = KINDS[kind](torch.ones(16, 32, device=device, dtype=dtype))
        w(torch.ones(1, 32, device=device, dtype=dtype))
    except (RuntimeError, NotImplementedError) as e:
        op = "_weight_int8pack_mm" if kind == "int8" else "_weight_int4pack_mm(_for_cpu)"
        raise ValueError(
            f"clasp_ext: draft_weights={kind!r} needs torch.{op} for {dtype} on "
            f"{device.type}, which this torch ({torch.__version__}) lacks: {e}. Use "
            "draft_weights='original'"
        ) from None


class LowBitDraft:
    """``kind`` copies of every ``nn.Linear`` of the decoder layers a draft keeps, swapped in for
    the duration of ``active(skip)`` (an instance ``forward`` on each linear; removed after, so
    the model object is unchanged outside a draft). ``mlp_blocks`` (skip_unit="mlp": a skipped
    layer still runs its attention): each layer's MLP module, whose linears a skipped layer's
    draft does not run and so gets no copy of."""

    def __init__(self, layers, kind: str = "int8", mlp_blocks: list | None = None):
        self.layers = layers
        self.kind = kind
        self.mlp_blocks = mlp_blocks
        # (layer index, whole layer?) -> [(linear, forward over the copy)]; the attention-only
        # and whole-layer lists of one layer share their copies (low_bit_copy caches per module)
        self._copies: dict[tuple[int, bool], list] = {}

    def _layer(self, i: int, whole: bool = True) -> list:
        if (i, whole) not in self._copies:
            linears = low_bit_linears(self.layers[i], self.kind)
            if not whole:  # the attention and norms a skipped layer still runs
                in_mlp = {id(m) for m in self.mlp_blocks[i].modules()}
                linears = [m for m in linears if id(m) not in in_mlp]
            self._copies[i, whole] = [(m, low_bit_copy(m, self.kind)) for m in linears]
        return self._copies[i, whole]

    def _drafted(self, skip: list[bool]):
        """(layer index, whole layer?) of the layers a draft with ``skip`` runs."""
        for i, skipped in enumerate(skip):
            if not skipped:
                yield i, True
            elif self.mlp_blocks is not None:
                yield i, False

    def prepare(self, skip: list[bool]) -> None:
        """Builds the copies a draft with ``skip`` uses (else built on first use, inside the first
        draft round, whose time a loop may be measuring)."""
        for i, whole in self._drafted(skip):
            self._layer(i, whole)

    @property
    def nbytes(self) -> int:
        unique = {id(m): w for pairs in self._copies.values() for m, w in pairs}
        return sum(w.nbytes for w in unique.values())

    @contextlib.contextmanager
    def active(self, skip: list[bool]):
        swapped = []
        try:
            for i, whole in self._drafted(skip):
                for mod, w in self._layer(i, whole):
                    mod.forward = w
                    swapped.append(mod)
            yield
        finally:
            for mod in swapped:
                mod.__dict__.pop("forward", None)


def low_bit_draft_for(adapter, draft_weights: str, num_skip: int) -> LowBitDraft | None:
    """The draft's low-bit copies for ``ClaspConfig.draft_weights`` (None: the model's weights),
    for the adapter's ``skip_unit``. "int8" / "int4" are refused where this torch has no kernel;
    "auto" measures (``auto_kind``)."""
    mlps = adapter.mlp_blocks() if adapter.skip_unit == "mlp" else None
    if draft_weights in KINDS:
        check_supported(draft_weights, adapter.device, adapter.dtype)
        return LowBitDraft(adapter.layers, draft_weights, mlps)
    if draft_weights == "auto" and num_skip > 0:
        kind = auto_kind(adapter.layers)
        return None if kind is None else LowBitDraft(adapter.layers, kind, mlps)
    return None
