"""`python -m clasp_ext.info`: how the extension was built and which kernels each op has."""

from __future__ import annotations

import torch

from clasp_ext import build_info
from clasp_ext.ops import OP_NAMES


def kernel_table() -> dict[str, dict[str, bool]]:
    """{op: {dispatch key: has a kernel}} for the CPU, CUDA and Meta (fake) keys."""
    table = {}
    for name in OP_NAMES:
        qualified = f"clasp::{name}"
        table[name] = {
            key: torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key)
            for key in ("CPU", "CUDA")
        }
        table[name]["fake"] = (
            torch._library.simple_registry.singleton.find(qualified).fake_impl.kernel is not None
        )
    return table


def main() -> None:
    info = build_info()
    print("clasp_ext build")
    for key in ("torch_version", "with_cuda", "cuda_version", "cuda_archs", "compiler"):
        print(f"  {key:<14} {info[key]}")
    print(f"  runtime torch  {torch.__version__}")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible"
    print(f"  GPU            {gpu}")
    print()
    print(f"  {'op':<24}{'CPU':>6}{'CUDA':>6}{'fake':>6}")
    for name, keys in kernel_table().items():
        row = "".join(f"{'yes' if keys[k] else 'no':>6}" for k in ("CPU", "CUDA", "fake"))
        print(f"  {name:<24}{row}")


if __name__ == "__main__":
    main()
