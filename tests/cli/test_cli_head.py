"""`winq export --keep` / `--keep-head` from the command line: the measured cost is printed, never called exact,
and a width the type cannot store is one clean error naming the valid choices."""

from __future__ import annotations

from test_cli import assert_clean_error, invoke

EVAL = 256


def test_cli_keep_prints_the_cost_and_refuses_bad_widths(tiny_ckpt, tmp_path):
    out = tmp_path / "g" / "model.gguf"
    r = invoke("export", "--format", "gguf", "--checkpoint", tiny_ckpt, "--out", out, "--keep", "q6_k")
    assert_clean_error(r, "--keep q6_k", "choose one of f16, f32")
    assert not out.exists() and not (tmp_path / "g" / "winq-export.json").exists()
    r = invoke("export", "--format", "gguf", "--checkpoint", tiny_ckpt, "--out", out, "--keep", "q8_0",
               "--keep-eval-tokens", EVAL)
    assert r.exit_code == 0, (r.output, r.exception)
    flat = " ".join(r.output.split())
    assert "NOT exact" in flat and "measured perplexity cost" in flat
    r = invoke("export", "--format", "gptq", "--checkpoint", tiny_ckpt, "--out", tmp_path / "q", "--keep-head",
               "int8")
    assert_clean_error(r, "--keep-head is an option of --format onnx")
