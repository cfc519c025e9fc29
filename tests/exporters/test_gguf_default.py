"""GGUF export of the built-in default model (SmolLM2-135M, 576-wide rows) at 4 and 2 bits, run by llama.cpp. Slow."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _user_cache(user_cache):
    """The default model comes from the user's cache (tests/conftest.py)."""


def winq(*args):
    r = subprocess.run([sys.executable, "-m", "winq.cli.main", *map(str, args)], capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.parametrize("bits,types", [(4, {"Q4_0"}), (2, {"Q2_K", "Q4_0"})])
def test_default_model_gguf_runs_in_llamacpp(tmp_path, bits, types):
    """Weights: max error 0 in the file. Graph: llama.cpp running the same dequantized weights
    stored as F32 matches the fake-quant logits (measured max |dlogit| 3e-4 on a 2-bit run).
    Quantized file: llama.cpp quantizes activations to 8 bits in its dot products. At 4 bits the
    perplexity gap was +0.33% on 16k tokens (30-step per-row run) and +0.76% on 1,024 tokens (the GPTQ-started
    group-32 default, 2 steps); we allow 1%. A 2-step
    2-bit model is far from converged (ppl in the millions, logits up to ~30) and there 8-bit
    activations move perplexity by up to 15% and flip 38% of the top-1 choices even where the lead
    exceeds 1.0 (measured), so at 2 bits the F32-graph check and exactness are what is asserted."""
    pytest.importorskip("llama_cpp", reason='needs llama-cpp-python: pip install "winq[llamacpp]"')
    import torch
    from transformers import AutoTokenizer

    from winq.checkpoint import load_checkpoint
    from winq.evaluate import eval_ids
    from winq.exporters.gguf import write_f16_gguf
    from winq.runtime.llamacpp import load_llamacpp, tokenize

    ck = tmp_path / "ck"
    per_row = ["--group-size", -1] if bits == 2 else []  # 2-bit per-row scales: down_proj's rows fit Q2_K's blocks
    winq("train", "--steps", 2, "--seq-len", 64, "--bits", bits, *per_row, "--out", ck, "--no-progress", "--threads", 2)
    out = tmp_path / "gguf" / "model.gguf"
    m = json.loads(winq("export", "--format", "gguf", "--checkpoint", ck, "--out", out, "--json"))
    assert m["summary"]["max_abs_err"] == 0.0 and m["summary"]["tensors"] == 30 * 7
    assert set(m["info"]["types"]) == types  # 2-bit: down_proj (1536 = 6 x 256) in Q2_K, the 576-wide rows in Q4_0
    # transformers rebuilds the default model's tokenizer from the Q4_1 GGUF with a plain byte-level
    # pre-tokenizer (no per-digit split), so llama.cpp must use "gpt-2" to tokenize as it does
    assert m["info"]["pre_tokenizer"] == "gpt-2"
    tok = AutoTokenizer.from_pretrained(str(ck))
    text = "The year 2024 had 366 days; it's 3.14 times — “naïve” <|im_start|>user"
    assert tokenize(out, text) == tok(text, add_special_tokens=False)["input_ids"]

    torch.set_num_threads(2)
    net, tok, _ = load_checkpoint(ck)
    ids = eval_ids(tok, "ptb", "test", 1024)[:256]
    with torch.no_grad():
        ref = net(input_ids=ids[None]).logits[0]
    f32 = write_f16_gguf(ck, tmp_path / "f32" / "model.gguf", keep="f32")
    same = load_llamacpp(f32, threads=2, n_ctx=256)(ids)
    assert (same - ref).abs().max() < 1e-2
    got = load_llamacpp(out, threads=2, n_ctx=256)(ids)
    assert got.shape == ref.shape and torch.isfinite(got).all()
    if bits == 4:
        top2 = ref.topk(2, dim=-1).values
        confident = (top2[:, 0] - top2[:, 1]) > 1.0
        assert confident.sum() > 5
        assert (got.argmax(-1)[confident] == ref.argmax(-1)[confident]).float().mean() >= 0.95
        r = json.loads(winq("eval", "--backend", "fakequant,llamacpp", "--checkpoint", ck, "--gguf", out,
                            "--max-tokens", 1024, "--seq-len", 256, "--json", "--threads", 2))
        # the activation-rounding gap: +0.33% on the per-row 30-step model, +0.76% on 1,024 tokens for the
        # GPTQ-started default (group 32, 2 steps), both measured; 1% allowed
        assert abs(r["ppl_relative_diff"]["llamacpp"]) < 1e-2, r
        assert r["results"]["llamacpp"]["top1_agreement"] > 0.9
