"""Build information and `python -m clasp_ext.info`."""

from __future__ import annotations

import re
import subprocess
import sys

import torch

import clasp_ext
from clasp_ext.info import kernel_table
from clasp_ext.ops import OP_NAMES

SIX_OPS = (
    "cosine_scores",
    "layer_importance",
    "skip_search_step",
    "skip_search_backtrack",
    "verify_greedy",
    "verify_sample",
)


def test_build_info_fields():
    info = clasp_ext.build_info()
    assert set(info) >= {"torch_version", "with_cuda", "cuda_version", "cuda_archs", "compiler"}
    assert isinstance(info["with_cuda"], bool)
    # Built against the torch it runs with (the ABI must match).
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["compiler"] and info["compiler"] != "unknown"
    if info["with_cuda"]:
        assert re.fullmatch(r"\d+\.\d+(\.\d+)?", info["cuda_version"])
        assert info["cuda_archs"]
    else:
        assert info["cuda_version"] == ""


def test_every_op_is_registered_with_cpu_kernel_and_fake():
    assert tuple(OP_NAMES) == SIX_OPS
    table = kernel_table()
    for name in SIX_OPS:
        assert hasattr(torch.ops.clasp, name)
        assert table[name]["CPU"], f"{name} has no CPU kernel"
        assert table[name]["fake"], f"{name} has no fake implementation"
        assert table[name]["CUDA"] == clasp_ext.build_info()["with_cuda"]


def test_info_module_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "clasp_ext.info"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.strip().startswith("torch_version") for line in lines)
    cuda = "yes" if clasp_ext.build_info()["with_cuda"] else "no"
    for name in SIX_OPS:
        row = [line.split() for line in lines if line.split()[:1] == [name]]
        assert row == [[name, "yes", cuda, "yes"]], f"{name}: {row}"
