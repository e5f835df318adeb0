"""Build clasp_ext with torch's extension tooling (ninja).

CUDA kernels are compiled when the installed torch is a CUDA build and CUDA_HOME points at a
toolkit (no GPU needed). CLASP_BUILD_CUDA=0/1 overrides that decision; TORCH_CUDA_ARCH_LIST picks
the architectures (default "8.0;9.0"). The sources come from csrc/SOURCES, which CMakeLists.txt
reads too.
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup


def import_torch():
    """Import the torch this extension will run with.

    The extension is ABI-bound to one torch build. Under pip's default build isolation the build
    environment has no torch (and installing a fresh one could pick another version), so look up
    the torch of the interpreter pip installs into and build against that one.
    """
    try:
        import torch  # noqa: F401

        return
    except ImportError:
        pass
    hidden = ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME", "PYTHONSAFEPATH")
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    probe = "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))"
    found = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    if found.returncode != 0:
        sys.exit(
            "clasp_ext: building needs PyTorch installed in the target environment first:\n"
            "    pip install torch && pip install --no-build-isolation -e ."
        )
    sys.path.append(found.stdout.strip().splitlines()[-1])
    print(f"clasp_ext: building against the environment's torch in {sys.path[-1]}", flush=True)


import_torch()
import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "8.0;9.0"


def read_sources():
    """Return {"cpu": [...], "cuda": [...], "python": [...]} from csrc/SOURCES."""
    groups, current = {"cpu": [], "cuda": [], "python": []}, None
    for line in (ROOT / "csrc" / "SOURCES").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            continue
        groups[current].append(line)
    return groups


def decide_cuda():
    """Return (build_cuda, reason)."""
    override = os.environ.get("CLASP_BUILD_CUDA")
    cuda_home = cpp_extension.CUDA_HOME
    torch_cuda = torch.version.cuda
    if override not in (None, "", "0", "1"):
        sys.exit(f"clasp_ext: CLASP_BUILD_CUDA must be 0 or 1, got {override!r}")
    if override == "0":
        return False, "CLASP_BUILD_CUDA=0"
    if torch_cuda is None:
        if override == "1":
            sys.exit(
                f"clasp_ext: CLASP_BUILD_CUDA=1 but torch {torch.__version__} is a CPU-only build;"
                " install a CUDA build of torch"
            )
        return False, f"torch {torch.__version__} is a CPU-only build"
    if cuda_home is None:
        if override == "1":
            sys.exit("clasp_ext: CLASP_BUILD_CUDA=1 but no CUDA toolkit found; set CUDA_HOME")
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    why = "CLASP_BUILD_CUDA=1" if override == "1" else "torch is a CUDA build"
    return True, f"{why}: torch {torch.__version__} (CUDA {torch_cuda}), CUDA_HOME={cuda_home}"


def make_extension():
    sources = read_sources()
    build_cuda, reason = decide_cuda()
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
    print(f"clasp_ext: CUDA kernels {'ON' if build_cuda else 'OFF'} ({reason})", flush=True)
    defines = [("CLASP_TORCH_VERSION", f'"{torch.__version__}"')]
    # -ffp-contract=off: the canonical reductions must not be fused differently than on the GPU.
    cxx = ["-O3", "-std=c++20", "-ffp-contract=off", "-fno-fast-math"]
    extra = {"cxx": cxx}
    files = sources["cpu"] + sources["python"]
    ext_cls = cpp_extension.CppExtension
    if build_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # honoured (and defaulted) by torch's tooling
        print(f"clasp_ext: TORCH_CUDA_ARCH_LIST={archs}", flush=True)
        files += sources["cuda"]
        defines += [
            ("CLASP_WITH_CUDA", None),
            ("CLASP_CUDA_VERSION", f'"{torch.version.cuda}"'),
            ("CLASP_CUDA_ARCHS", f'"{archs}"'),
        ]
        extra["nvcc"] = ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"] + [
            f"-D{k}" if v is None else f"-D{k}={v}" for k, v in defines
        ]
        ext_cls = cpp_extension.CUDAExtension
    return ext_cls(
        name="clasp_ext._C",
        sources=files,
        include_dirs=[str(ROOT / "csrc")],
        define_macros=defines,
        extra_compile_args=extra,
    )


setup(
    name="clasp_ext",
    version="0.1.0",
    description="CLaSp: lossless self-speculative decoding by in-context layer skip (PyTorch ops)",
    packages=find_packages(include=["clasp_ext", "clasp_ext.*"]),
    python_requires=">=3.10",
    # transformers: the releases tests/transformers_matrix.sh and tests/run.sh test (4.56.2, 5.0.0,
    # 5.17.0, 5.24.0); the adapter reads calling conventions off the model, not version strings.
    install_requires=["torch>=2.4", "transformers>=4.56.2,<5.25"],
    ext_modules=[make_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
