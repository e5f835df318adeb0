"""Real Gemma 3 270M (fetched and converted by clasp_ext.cli.models on first use): greedy CLaSp
equals model.generate on a few prompts. Slow: not in CI (select with -m slow)."""

from __future__ import annotations

import pytest
import torch
from test_decoding_greedy import assert_lossless, hf_greedy

from clasp_ext.decoding import generate

PROMPTS = [
    "def fibonacci(n):\n",
    "The capital of France is",
    "Once upon a time, there was a little",
]


@pytest.mark.slow
@torch.no_grad()
def test_gemma3_270m_greedy_equals_generate():
    models = pytest.importorskip("clasp_ext.cli.models")
    torch.set_num_threads(2)
    model, tok = models.load("gemma-3-270m", dtype=torch.float32)
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        want = hf_greedy(model, ids, 32)
        out = generate(model, ids, max_new_tokens=32, eos_token_id=[], num_skip_layers=8)
        assert_lossless(model, out.sequences[0].tolist(), want, ids.shape[1])
        assert out.stats.tau > 1.0
