"""Package hygiene: the ops load without transformers; the decoding names load on first access;
the library never imports the command-line tooling (which may run pip into its cache)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_python(*args: str) -> subprocess.CompletedProcess:
    """A fresh interpreter in the repository root (the in-place build is importable there)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_import_for_the_ops_does_not_import_transformers():
    run_python(
        "-c",
        "import clasp_ext, sys; clasp_ext.cosine_scores; clasp_ext.ops; clasp_ext.reference; "
        "assert 'transformers' not in sys.modules, 'import clasp_ext imported transformers'",
    )


def test_decoding_names_import_transformers_on_first_access():
    run_python(
        "-c",
        "import clasp_ext, sys\n"
        "assert 'transformers' not in sys.modules\n"
        "gen = clasp_ext.generate\n"
        "assert 'transformers' in sys.modules\n"
        "from clasp_ext.decoding.loop import generate\n"
        "assert gen is generate\n"
        "import clasp_ext.decoding as d\n"
        "for name in ('ClaspConfig', 'ClaspDecoder', 'ClaspOutput', 'ClaspStats',\n"
        "             'UnsupportedModelError'):\n"
        "    assert getattr(clasp_ext, name) is getattr(d, name), name\n"
        "assert 'clasp_ext.cli' not in sys.modules, 'the library imported the CLI tooling'\n",
    )


def test_info_does_not_import_transformers():
    out = run_python(
        "-c",
        "import runpy, sys; sys.argv = ['clasp_ext.info']; "
        "runpy.run_module('clasp_ext.info', run_name='__main__'); "
        "assert 'transformers' not in sys.modules, 'clasp_ext.info imported transformers'",
    )
    assert "cosine_scores" in out.stdout
    run_python("-m", "clasp_ext.info")  # and the command itself runs


def test_all_and_dir():
    import clasp_ext

    names = dir(clasp_ext)
    for name in clasp_ext.__all__:
        assert name in names, name
    assert "hf" in clasp_ext.__all__ and "generate" in clasp_ext.__all__
    lazy = set(clasp_ext._LAZY_NAMES) | set(clasp_ext._LAZY_SUBMODULES)
    for name in set(clasp_ext.__all__) - lazy:
        assert name in vars(clasp_ext), f"{name} is in __all__ but not defined eagerly"
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        clasp_ext.no_such_name  # noqa: B018


def test_library_modules_do_not_run_pip():
    """Only the tooling in clasp_ext/cli may call pip (into its cache folder)."""
    for path in (REPO / "clasp_ext").rglob("*.py"):
        rel = path.relative_to(REPO / "clasp_ext")
        if rel.parts[0] == "cli" or rel.name == "__main__.py":  # the tooling and its entry point
            continue
        text = path.read_text()
        assert '"pip"' not in text and "'pip'" not in text, path
        assert "clasp_ext.cli" not in text and "from clasp_ext import cli" not in text, path
