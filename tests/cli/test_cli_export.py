"""`winq export --format gguf` and `winq eval --backend fakequant,llamacpp` from the command line:
format-specific options, the record beside the file, and one clean error for every refusal."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from test_cli import assert_clean_error, invoke, train_args

LLAMACPP_REASON = 'needs llama-cpp-python: pip install "winq[llamacpp]"'


@pytest.fixture(scope="module")
def ck4(tiny_llama, text_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli-gguf") / "run4"
    r = invoke(*train_args(tiny_llama, text_file, out, "--bits", 4))
    assert r.exit_code == 0, (r.output, r.exception)
    return out


@pytest.fixture(scope="module")
def gguf_file(ck4) -> Path:
    out = ck4.parent / "export" / "model.gguf"
    r = invoke("export", "--format", "gguf", "--checkpoint", ck4, "--out", out)
    assert r.exit_code == 0, (r.output, r.exception)
    assert "max error 0" in " ".join(r.stdout.split()) and "Q4_0" in r.stdout
    return out


def test_export_gguf_writes_file_and_record(gguf_file):
    assert gguf_file.read_bytes()[:4] == b"GGUF"
    m = json.loads((gguf_file.parent / "winq-export.json").read_text())
    assert m["artifact"] == "model.gguf" and m["summary"]["max_abs_err"] == 0.0
    assert {t["container"].split(":")[0] for t in m["tensors"]} == {"Q4_0"}


def test_export_gguf_json_and_type_option(ck4, tmp_path):
    r = invoke("export", "--format", "gguf", "--checkpoint", ck4, "--out", tmp_path / "m.gguf", "--type", "q8_0",
               "--keep", "f32", "--json")
    assert r.exit_code == 0, (r.output, r.exception)
    out = json.loads(r.stdout)
    assert out["info"]["types"] == ["Q8_0"] and out["summary"]["max_abs_err"] == 0.0
    assert out["summary"]["float_max_abs_err"] == 0.0  # --keep f32


def test_export_gguf_bad_type(ck4, tmp_path):
    r = invoke("export", "--format", "gguf", "--checkpoint", ck4, "--out", tmp_path / "m.gguf", "--type", "q7_k")
    assert_clean_error(r, "unknown GGUF type 'q7_k'", "q4_0", "q3_k")
    assert not (tmp_path / "m.gguf").exists()


def test_export_gguf_type_that_cannot_hold_the_grid(ck4, tmp_path):
    r = invoke("export", "--format", "gguf", "--checkpoint", ck4, "--out", tmp_path / "m.gguf", "--type", "q2_k")
    assert_clean_error(r, "--type q2_k cannot hold lsq 4-bit", "q4_0")


def test_export_option_of_another_format(ck4, tmp_path):
    r = invoke("export", "--format", "gguf", "--checkpoint", ck4, "--out", tmp_path / "m.gguf", "--checkpoint-format",
               "gptq_v2")
    assert_clean_error(r, "--checkpoint-format is an option of --format gptq")
    r = invoke("export", "--format", "gptq", "--checkpoint", ck4, "--out", tmp_path / "g", "--type", "q4_0")
    assert_clean_error(r, "--type is an option of --format gguf")


def test_export_unknown_format(ck4, tmp_path):
    r = invoke("export", "--format", "safetensors4", "--checkpoint", ck4, "--out", tmp_path / "x")
    assert_clean_error(r, "unknown export format 'safetensors4'", "gguf", "gptq")


def test_export_gguf_into_a_folder_path(ck4, tmp_path):
    r = invoke("export", "--format", "gguf", "--checkpoint", ck4, "--out", tmp_path)
    assert_clean_error(r, "is a folder", "model.gguf")


def test_export_gguf_refuses_existing_file(gguf_file, ck4):
    r = invoke("export", "--format", "gguf", "--checkpoint", ck4, "--out", gguf_file)
    assert_clean_error(r, "--overwrite")


def test_eval_llamacpp_needs_gguf(ck4, text_file):
    r = invoke("eval", "--backend", "fakequant,llamacpp", "--checkpoint", ck4, "--data", text_file)
    assert_clean_error(r, "backend llamacpp needs --gguf FILE")


def test_eval_llamacpp_missing_file(ck4, text_file, tmp_path):
    pytest.importorskip("llama_cpp", reason=LLAMACPP_REASON)
    r = invoke("eval", "--backend", "llamacpp", "--gguf", tmp_path / "nope.gguf", "--checkpoint", ck4, "--data",
               text_file)
    assert_clean_error(r, "nope.gguf not found")


def test_eval_fakequant_and_llamacpp(ck4, gguf_file, text_file):
    pytest.importorskip("llama_cpp", reason=LLAMACPP_REASON)
    r = invoke("eval", "--backend", "fakequant,llamacpp", "--checkpoint", ck4, "--gguf", gguf_file, "--data", text_file,
               "--seq-len", 32, "--max-tokens", 400, "--json")
    assert r.exit_code == 0, (r.output, r.exception)
    out = json.loads(r.stdout)
    res = out["results"]
    assert list(res) == ["fakequant", "llamacpp", "fp"]  # the float model is added: KL to it for every backend
    assert out["float_reference"] == "fp"
    assert res["llamacpp"]["kl_float"] > 0 and 0 < res["fakequant"]["top1_float"] <= 1
    assert res["llamacpp"]["tokens"] == res["fakequant"]["tokens"] > 300
    assert math.isfinite(res["llamacpp"]["ppl"])
    # exact weights; llama.cpp's 8-bit activations leave a small gap (below 6.3e-4 on the tiny models of test_gguf.py)
    assert abs(out["ppl_relative_diff"]["llamacpp"]) < 5e-3
    assert res["llamacpp"]["kl"] < 1e-2 and res["llamacpp"]["top1_agreement"] > 0.9
