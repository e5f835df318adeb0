"""Every decoder-only causal LM family of the installed transformers (its causal-LM mapping) decodes
losslessly with CLaSp or is refused up front with UnsupportedModelError: never a crash inside the
loop, never a wrong token (tests/family_walk.py builds each family tiny with random weights)."""

from __future__ import annotations

import pytest
import torch
from family_walk import check_family, model_types

torch.set_num_threads(1)

# Families that must decode (the list and the families README names as tested); a
# regression that turns one of them into a refusal fails here instead of passing as "refused".
MUST_WORK = {
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma3_text",
    "granite",
    "granitemoe",
    "cohere",
    "cohere2",
    "phi",
    "phi3",
    "falcon",
    "mixtral",
    "qwen2_moe",
    "deepseek_v3",
}


@pytest.mark.parametrize("model_type", model_types())
def test_family_decodes_losslessly_or_is_refused(model_type, report):
    result = check_family(model_type)  # raises on a wrong token or a crash inside the loop
    if result.status == "not built":
        pytest.skip(f"no tiny model of {model_type}: {result.reason}")
    if model_type in MUST_WORK:
        assert result.status == "works", f"{model_type} is refused: {result.reason}"
    assert result.status in ("works", "refused")
    if result.status == "refused":
        assert result.reason, "a refusal must say what is missing"
        report(f"family {model_type}: refused ({result.reason[:120]})")
