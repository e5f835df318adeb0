"""The command line on a tiny model folder made in the test (no downloads)."""

from __future__ import annotations

import io

import pytest
import torch
from decoding_models import tiny_model

from clasp_ext.cli import generate as cli
from clasp_ext.cli.generate import main
from clasp_ext.decoding import cost_model

torch.set_num_threads(1)


@pytest.fixture
def model_dir(monkeypatch, tmp_path):
    """A tiny Qwen2 and a word-level tokenizer; the loader is replaced so nothing is fetched."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(252)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    model = tiny_model("qwen2", layers=4, window=4)
    seen = {}

    def fake_load(name, dtype, device):
        seen["args"] = (name, dtype, device)
        return model.to(dtype), fast

    monkeypatch.setattr(cli, "load_model", fake_load)
    yield tmp_path
    assert seen["args"] == (str(tmp_path), torch.float32, "cpu")


def run_cli(command: str, model_dir, *args: str) -> tuple[int, str]:
    """``python -m clasp_ext <command> --model <the tiny model> --dtype float32 <args>``:
    (exit code, printed text)."""
    out = io.StringIO()
    rc = main([command, "--model", str(model_dir), "--dtype", "float32", *args], out=out)
    return rc, out.getvalue()


def test_cli_generate_compare(model_dir):
    rc, text = run_cli(
        "generate",
        model_dir,
        *("--prompt", "w5 w9 w17 w3", "--max-new-tokens", "16", "--compare", "--max-draft", "3"),
    )
    assert rc == 0, text
    assert "outputs identical: yes" in text
    assert "tau" in text and "speedup" in text


def test_cli_sampling(model_dir):
    rc, text = run_cli(
        "generate",
        model_dir,
        *("--prompt", "w5 w9", "--max-new-tokens", "8", "--temperature", "0.8", "--seed", "3"),
        "--compare",
    )
    assert rc == 0
    assert "not compared token by token" in text


@pytest.mark.measured_cost_table
def test_cli_calibrate_and_cost_policy(model_dir, monkeypatch):
    monkeypatch.setenv("CLASP_CACHE", str(model_dir / "cache"))
    monkeypatch.delenv("CLASP_COST_TABLES", raising=False)
    monkeypatch.setattr(cost_model, "_MEMORY", {})  # earlier tests measured this setup
    rc, text = run_cli("calibrate", model_dir, "--max-draft", "3")
    assert rc == 0, text
    assert "verify ms" in text and "draft step" in text and "DP run" in text
    assert f"cache: {model_dir / 'cache' / 'cost_tables'}" in text
    rc, text = run_cli(
        "generate",
        model_dir,
        *("--prompt", "w5 w9 w17 w3", "--max-new-tokens", "12", "--max-draft", "3"),
        *("--policy", "cost", "--compare"),
    )
    assert rc == 0, text
    assert "outputs identical: yes" in text
    assert "plain/lookup/layer-skip" in text
