"""What bench/gpu_check.sh asks pytest for on the GPU machine, checked without one: its marker
expression selects the CUDA parameter of every test taking `device` and the decoder's CUDA tests,
and nothing slow (device time on the lent machine is scarce, a wrong selection wastes a session).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def params(node_id: str) -> list[str]:
    m = re.search(r"\[(.*)\]$", node_id)
    return m.group(1).split("-") if m else []


def test_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def collect(marks: str) -> list[str]:
    """Node ids pytest collects from tests/ with the marker expression ``marks``."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
        + ["--continue-on-collection-errors", "-m", marks, "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert ids, proc.stdout[-2000:] + proc.stderr[-2000:]
    return ids


def test_cuda_selection():
    mark = re.search(r'^CUDA_MARK="([^"]+)"', SCRIPT.read_text(), re.M)
    assert mark, "gpu_check.sh defines CUDA_MARK"
    selected = collect(mark.group(1))
    everything = collect("not slow")
    # every CUDA parameter of the suite, and no CPU one
    cuda_params = {i for i in everything if "cuda" in params(i)}
    assert cuda_params <= set(selected), sorted(cuda_params - set(selected))[:5]
    cpu = [i for i in selected if "cpu" in params(i)]
    assert not cpu, f"CPU parameters selected: {cpu[:5]}"
    for name in ("errors", "opcheck", "similarity", "skip_search", "verify"):
        assert any(i.startswith(f"tests/test_ops_{name}.py::") for i in selected), name
    decoder = [i for i in selected if i.startswith("tests/test_decoding_cuda.py::")]
    assert decoder and len(decoder) == len(
        [i for i in everything if i.startswith("tests/test_decoding_cuda.py::")]
    )
    # and nothing slow: everything selected is also in the suite without the slow tests
    assert set(selected) <= set(everything), sorted(set(selected) - set(everything))[:5]
