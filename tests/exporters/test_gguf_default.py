"""GGUF export of the built-in default model (SmolLM2-135M, 576-wide rows) at 4 and 2 bits, run by llama.cpp. Slow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _user_cache(monkeypatch):
    real = os.environ.get("WINQ_REAL_CACHE") or str(Path.home() / ".cache" / "winq")
    monkeypatch.setenv("WINQ_CACHE", real)


def winq(*args):
    r = subprocess.run([sys.executable, "-m", "winq.cli.main", *map(str, args)], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.parametrize("bits,types,max_gap", [(4, {"Q4_0"}, 5e-3), (2, {"Q2_K", "Q4_0"}, 1e-2)])
def test_default_model_gguf_runs_in_llamacpp(tmp_path, bits, types, max_gap):
    """max_gap: measured on 30-step default runs over 16k PTB tokens: +0.33% at 4 bits (ppl 77.9);
    on these 2-step runs and 1,024 tokens we allow 0.5% (4-bit) and 1% (2-bit, a model far from converged)."""
    pytest.importorskip("llama_cpp", reason='needs llama-cpp-python: pip install "winq[llamacpp]"')
    ck = tmp_path / "ck"
    winq("train", "--steps", 2, "--seq-len", 64, "--bits", bits, "--out", ck, "--no-progress", "--threads", 2)
    out = tmp_path / "gguf" / "model.gguf"
    m = json.loads(winq("export", "--format", "gguf", "--checkpoint", ck, "--out", out, "--json"))
    assert m["summary"]["max_abs_err"] == 0.0 and m["summary"]["tensors"] == 30 * 7
    assert set(m["info"]["types"]) == types  # 2-bit: down_proj (1536 = 6 x 256) in Q2_K, the 576-wide rows in Q4_0
    # transformers rebuilds the default model's tokenizer from the Q4_1 GGUF with a plain byte-level
    # pre-tokenizer (no per-digit split), so llama.cpp must use "gpt-2" to tokenize as it does
    assert m["info"]["pre_tokenizer"] == "gpt-2"
    from winq.runtime.llamacpp import tokenize
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ck))
    text = "The year 2024 had 366 days; it's 3.14 times — “naïve” <|im_start|>user"
    assert tokenize(out, text) == tok(text, add_special_tokens=False)["input_ids"]
    r = json.loads(winq("eval", "--backend", "fakequant,llamacpp", "--checkpoint", ck, "--gguf", out,
                        "--max-tokens", 1024, "--seq-len", 256, "--json", "--threads", 2))
    assert abs(r["ppl_relative_diff"]["llamacpp"]) < max_gap, r
    assert r["results"]["llamacpp"]["top1_agreement"] > 0.9
