"""The one tolerance table of the test suite.

Every kernel converts its inputs to float32 and accumulates in float32 whatever the input dtype
(SPEC.md section 4), and the references do the same from the same (exactly widened) inputs, so a
score of a float16 or bfloat16 input is compared at float32 accuracy: the two sides differ only by
the order of an fp32 reduction over d <= 4097 terms (observed: <= 2e-7 absolute on cosines). The
entries leave ~10x headroom for other reduction orders (the CUDA kernels).

Discrete outputs (DP choices, masks, accepted counts, tokens) and copied states are always
compared exactly; they have no entry here.
"""

from __future__ import annotations

import torch

# family -> dtype -> (atol, rtol). Families:
#   "cosine": cosine_scores, skip_search_step scores (values in [-1, 1])
#   "importance": layer_importance (1 - cos, values in [0, 2])
TOLERANCES: dict[str, dict[torch.dtype, tuple[float, float]]] = {
    "cosine": {
        torch.float32: (2e-6, 1e-5),
        torch.float16: (2e-6, 1e-5),
        torch.bfloat16: (2e-6, 1e-5),
    },
    "importance": {
        torch.float32: (2e-6, 1e-5),
        torch.float16: (2e-6, 1e-5),
        torch.bfloat16: (2e-6, 1e-5),
    },
}

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def tol(family: str, dtype: torch.dtype) -> dict[str, float]:
    """Keyword arguments for ``torch.testing.assert_close`` (``atol``, ``rtol``)."""
    atol, rtol = TOLERANCES[family][dtype]
    return {"atol": atol, "rtol": rtol}


def assert_scores_close(actual, expected, family: str, dtype: torch.dtype, msg: str = "") -> None:
    """Scores vs reference under the table; -inf / NaN must sit at the same places."""
    torch.testing.assert_close(
        actual.float().cpu(),
        expected.float().cpu(),
        equal_nan=True,
        msg=(lambda m: f"{msg}\n{m}") if msg else None,
        **tol(family, dtype),
    )
