"""Low-bit copies of the draft's weights (``ClaspConfig(draft_weights="int8")``).

A layer-skip draft step reads every weight of the kept layers once per token, so on a
memory-bound device its cost is their bytes. An int8 copy with one scale per output channel
halves the bytes of a bf16 weight (quarters fp32), and ``torch._weight_int8pack_mm`` multiplies
with it directly. Only draft steps use the copies (``Int8Draft.active``): the verify pass, the
DP and the prefill run the model's own weights, so the output is exactly what it is without them;
the copies only change what is proposed, and how often it is accepted.

The copies are made per layer the first time the layer is kept by a draft (the skip set can
change after each DP run), and for the draft head's first ``size`` vocabulary rows
(``DraftHead``), so memory grows by about half of the kept layers' bf16 bytes; ``nbytes`` says how
much is held.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import Tensor, nn

DRAFT_WEIGHTS = ("auto", "original", "int8")
# "auto" considers int8 only for layers this large: below it a draft step is bound by per-call
# overheads, not by weight bytes, and a copy cannot pay (it also keeps tiny test models on one
# deterministic path).
AUTO_MIN_LAYER_BYTES = 8 << 20
# ... and takes it when one layer's linears at one token run at least this much faster on it
AUTO_MIN_SPEEDUP = 1.25
# torch._weight_int8pack_mm on CPU (torch 2.13, AVX-512) returns wrong values or crashes for
# some inner sizes K that are not a multiple of 16 (bf16, K = 7, 9, 200: relative errors up to
# 1e13, segfaults), and is right for every multiple of 16 we swept (16..8960, fp32 and bf16, 1-9
# rows, 1-256 outputs). Such a linear keeps its own weights in the draft; real models' hidden and
# MLP sizes are multiples of 64.
K_MULTIPLE = 16


class Int8Weight:
    """``x @ w.T (+ b)`` on a per-output-channel symmetric int8 copy of ``w`` [N, K]."""

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

    def __call__(self, x: Tensor) -> Tensor:
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.q, self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


# One int8 copy per linear module (and row count) per process, made once: decoders are created
# per call of ``clasp_ext.generate``, and quantizing the kept layers of a 1.5B model takes seconds.
# Keyed weakly by the module; remade when its weight tensor is replaced or modified in place.
_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def int8_copy(linear: nn.Module, rows: int | None = None) -> Int8Weight:
    """The (cached) int8 copy of ``linear``'s weight (its first ``rows`` rows when given)."""
    w = linear.weight
    stamp = (rows, w.data_ptr(), w._version, w.dtype, w.device)
    per_module = _COPIES.setdefault(linear, {})
    hit = per_module.get(rows)
    if hit is None or hit[0] != stamp:
        bias = getattr(linear, "bias", None)
        if rows is not None:
            w, bias = w[:rows], None if bias is None else bias[:rows]
        per_module[rows] = hit = (stamp, Int8Weight(w, bias))
    return hit[1]


def int8_linears(layer: nn.Module) -> list[nn.Linear]:
    """The linears of ``layer`` that get an int8 copy: plain ``nn.Linear`` of a supported shape
    (subclasses, e.g. quantized or LoRA layers, and other shapes keep their own forward)."""
    return [m for m in layer.modules() if type(m) is nn.Linear and Int8Weight.supports(m.weight)]


_AUTO: dict[tuple, bool] = {}


def int8_pays(layer: nn.Module, repeats: int = 7) -> bool:
    """draft_weights="auto": whether int8 copies make this decoder layer's linears faster at one
    token, measured (median of ``repeats`` after a warm-up, copies of this one layer only) once
    per process for each layer shape, dtype, device and thread count. Where the int8 matmul is
    missing, the layer is small, or it does not pay (fp32 on CPUs: the int8 kernel is slower than
    an fp32 GEMV there), False."""
    from clasp_ext.timing import median_time

    linears = int8_linears(layer)
    if not linears:
        return False
    w0 = linears[0].weight
    key = (
        tuple(tuple(m.weight.shape) for m in linears),
        w0.dtype,
        str(w0.device),
        torch.get_num_threads(),
    )
    if key not in _AUTO:
        nbytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
        ok = nbytes >= AUTO_MIN_LAYER_BYTES
        if ok:
            try:
                check_supported(w0.device, w0.dtype)
            except ValueError:
                ok = False
        if ok:
            copies = [int8_copy(m) for m in linears]  # the draft reuses them if int8 pays
            xs = [torch.randn(1, m.in_features, dtype=w0.dtype, device=w0.device) for m in linears]

            def original():
                for m, x in zip(linears, xs, strict=True):
                    torch.nn.functional.linear(x, m.weight, m.bias)

            def int8():
                for q, x in zip(copies, xs, strict=True):
                    q(x)

            with torch.inference_mode():
                t_orig = median_time(original, w0.device, repeats, warmup=1)
                t_int8 = median_time(int8, w0.device, repeats, warmup=1)
            ok = t_orig >= AUTO_MIN_SPEEDUP * t_int8
            if not ok:  # not used: free them
                for m in linears:
                    _COPIES.pop(m, None)
        _AUTO[key] = ok
    return _AUTO[key]


def check_supported(device: torch.device, dtype: torch.dtype) -> None:
    """Raises ValueError when this torch has no int8 weight matmul for the device / dtype."""
    try:
        w = Int8Weight(torch.ones(8, 32, device=device, dtype=dtype))
        w(torch.ones(1, 32, device=device, dtype=dtype))
    except (RuntimeError, NotImplementedError) as e:
        raise ValueError(
            f"clasp_ext: draft_weights='int8' needs torch._weight_int8pack_mm for {dtype} on "
            f"{device.type}, which this torch ({torch.__version__}) lacks: {e}. Use "
            "draft_weights='original'"
        ) from None


class Int8Draft:
    """int8 copies of every ``nn.Linear`` of the decoder layers a draft keeps, swapped in for
    the duration of ``active(skip)`` (an instance ``forward`` on each linear; removed after, so
    the model object is unchanged outside a draft)."""

    def __init__(self, layers):
        self.layers = layers
        self._copies: dict[int, list] = {}  # layer index -> [(linear, forward over the copy)]

    def _layer(self, i: int) -> list:
        if i not in self._copies:
            self._copies[i] = [(m, int8_copy(m)) for m in int8_linears(self.layers[i])]
        return self._copies[i]

    def prepare(self, skip: list[bool]) -> None:
        """Builds the copies a draft with ``skip`` uses (else built on first use, inside the first
        draft round, whose time a loop may be measuring)."""
        for i, skipped in enumerate(skip):
            if not skipped:
                self._layer(i)

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for pairs in self._copies.values() for _, w in pairs)

    @contextlib.contextmanager
    def active(self, skip: list[bool]):
        swapped = []
        try:
            for i, skipped in enumerate(skip):
                if not skipped:
                    for mod, w in self._layer(i):
                        mod.forward = w
                        swapped.append(mod)
            yield
        finally:
            for mod in swapped:
                mod.__dict__.pop("forward", None)


def int8_draft_for(adapter, draft_weights: str, num_skip: int) -> Int8Draft | None:
    """The draft's low-bit copies for ``ClaspConfig.draft_weights`` (None: the model's weights).
    "int8" is refused where this torch has no kernel; "auto" measures (``int8_pays``)."""
    if draft_weights == "int8":
        check_supported(adapter.device, adapter.dtype)
        return Int8Draft(adapter.layers)
    if draft_weights == "auto" and num_skip > 0 and int8_pays(adapter.layers[0]):
        return Int8Draft(adapter.layers)
    return None
