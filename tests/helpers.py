"""Small helpers shared by the op tests (no mocks: everything calls the real ops)."""

from __future__ import annotations

import torch


def to_cpu(x):
    """Moves a tensor, or the tensors of a (nested) tuple/list, to the CPU."""
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, (tuple, list)):
        return type(x)(to_cpu(v) for v in x)
    return x


def assert_same_as_cpu_kernel(device: str, op, args, outputs, discrete: tuple[int, ...]) -> None:
    """SPEC section 4: discrete outputs of the CUDA kernel equal the CPU kernel's on the same
    inputs. No-op on CPU. `discrete` indexes the outputs (of a tuple) to compare exactly; mutated
    inputs are re-cloned so both kernels start from the same values."""
    if device == "cpu":
        return
    cpu_out = op(*to_cpu(args))
    if isinstance(outputs, torch.Tensor):
        outputs, cpu_out = (outputs,), (cpu_out,)
    for k in discrete:
        assert torch.equal(outputs[k].cpu(), cpu_out[k]), f"output {k}: CUDA != CPU kernel"


def strided_view(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A non-contiguous view holding the values of rank-3 ``x`` (unit-stride last dim unless
    the last dim has size 1), or ``x`` itself for layout "contiguous"."""
    B, n, d = x.shape
    if layout == "contiguous":
        return x
    if layout == "batch_slice":  # stride(0) = 2 * n * d
        base = torch.empty(2 * B, n, d, dtype=x.dtype, device=x.device).normal_()
        base[::2] = x
        return base[::2]
    if layout == "row_slice":  # stride(1) = 2 * d: candidates[:, ::2]
        base = torch.empty(B, 2 * n, d, dtype=x.dtype, device=x.device).normal_()
        base[:, ::2] = x
        return base[:, ::2]
    if layout == "transposed":  # [n, B, d] storage seen as [B, n, d]: strides (d, B * d, 1)
        base = x.transpose(0, 1).contiguous()
        return base.transpose(0, 1)
    if layout == "padded_rows":  # row pitch larger than d: strides (n * (d + 5), d + 5, 1)
        base = torch.empty(B, n, d + 5, dtype=x.dtype, device=x.device).normal_()
        base[..., :d] = x
        return base[..., :d]
    raise ValueError(layout)


def strided_rows(x: torch.Tensor) -> torch.Tensor:
    """A rank-2 [B, d] tensor as a view with batch stride 3 * d (a slice of a bigger tensor)."""
    B, d = x.shape
    base = torch.empty(B, 3, d, dtype=x.dtype, device=x.device).normal_()
    base[:, 1] = x
    return base[:, 1]


LAYOUTS = ("batch_slice", "row_slice", "transposed", "padded_rows")
