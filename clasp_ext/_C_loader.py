"""Loads the compiled extension, which registers the `clasp` ops with the dispatcher."""

try:
    from clasp_ext import _C  # noqa: F401  (import registers torch.ops.clasp.*)
except ImportError as err:  # pragma: no cover - depends on the install
    raise ImportError(
        "clasp_ext: the compiled extension clasp_ext._C could not be loaded "
        f"({err}). Build it against the torch you run with: "
        "`pip install --no-build-isolation -e .` from the repository root "
        "(see README.md, 'Install')."
    ) from err

build_info = _C.build_info
