"""`winq train --grid nl4` (llama.cpp's IQ4_NL levels) from the command line, its GGUF export, and the one clean
error line of every refusal (another group size, the formats that store only uniform levels)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_cli import assert_clean_error, flat, invoke, train_args


@pytest.fixture(scope="module")
def ck_nl4(tiny_llama, text_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli-nl4") / "run"
    r = invoke(*train_args(tiny_llama, text_file, out, "--grid", "nl4", "--group-size", 32))
    assert r.exit_code == 0, (r.output, r.exception)
    return out


def test_train_help_lists_nl4():
    r = invoke("train", "--help")
    assert r.exit_code == 0 and "nl4" in r.stdout


def test_train_nl4_writes_the_grid(ck_nl4):
    q = json.loads((ck_nl4 / "winq.json").read_text())["quant"]
    assert (q["grid"], q["bits"], q["group_size"]) == ("nl4", 4, 32)


def test_export_nl4_to_gguf_is_iq4_nl(ck_nl4, tmp_path):
    out = tmp_path / "model.gguf"
    r = invoke("export", "--format", "gguf", "--checkpoint", ck_nl4, "--out", out)
    assert r.exit_code == 0, (r.output, r.exception)
    assert "IQ4_NL" in r.stdout and "max error 0" in flat(r.stdout)
    m = json.loads((tmp_path / "winq-export.json").read_text())
    assert {t["container"] for t in m["tensors"]} == {"IQ4_NL: native"} and m["summary"]["max_abs_err"] == 0.0


@pytest.mark.parametrize("fmt,what", [("onnx", "MatMulNBits"), ("gptq", "GPTQ")])
def test_export_nl4_elsewhere_is_refused_naming_gguf(ck_nl4, tmp_path, fmt, what):
    r = invoke("export", "--format", fmt, "--checkpoint", ck_nl4, "--out", tmp_path / "x")
    assert_clean_error(r, f"{what} cannot hold grid 'nl4'", "--format gguf")
    assert not (tmp_path / "x").exists()


def test_train_nl4_with_another_group_size_is_refused(tiny_llama, text_file, tmp_path):
    r = invoke(*train_args(tiny_llama, text_file, tmp_path / "o", "--grid", "nl4", "--group-size", 16))
    assert_clean_error(r, "grid 'nl4'", "--group-size 32", "got 16")
    assert not (tmp_path / "o").exists()
