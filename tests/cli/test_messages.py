"""What a user reads: the pip command of a missing extra printed literally (rich must not take `[onnx]`
for markup), in errors and in --help; one clear line for an output path that cannot be created."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from test_cli import assert_clean_error, invoke


@pytest.fixture
def ck(tiny_ckpt) -> Path:
    return tiny_ckpt


def hide(monkeypatch, *modules):
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)  # `import m` raises ImportError, as when the extra is not installed


def test_export_without_the_onnx_extra_prints_the_pip_command(ck, tmp_path, monkeypatch):
    hide(monkeypatch, "onnx", "onnxruntime")
    r = invoke("export", "--format", "onnx", "--checkpoint", ck, "--out", tmp_path / "o")
    assert_clean_error(r, "ONNX export needs onnx and onnxruntime", 'run `pip install "winq[onnx]"`')
    assert not (tmp_path / "o").exists()


def test_eval_without_the_gptq_extra_prints_the_pip_command(ck, tmp_path, monkeypatch):
    hide(monkeypatch, "optimum", "gptqmodel")
    (tmp_path / "g").mkdir()
    r = invoke("eval", "--backend", "gptq", "--gptq", tmp_path / "g", "--checkpoint", ck)
    assert_clean_error(r, 'the gptq backend needs optimum and gptqmodel: run `pip install "winq[gptq]"`')


def test_bench_without_the_llamacpp_extra_prints_the_pip_command(ck, tmp_path, monkeypatch):
    hide(monkeypatch, "llama_cpp")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    r = invoke("bench", "--backend", "llamacpp", "--gguf", tmp_path / "m.gguf", "--no-baseline", "--out",
               tmp_path / "b.json")
    assert_clean_error(r, 'backend llamacpp needs llama-cpp-python: run `pip install "winq[llamacpp]"`')


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_help_names_the_extras_literally(command):
    r = invoke(command, "--help")
    assert r.exit_code == 0, r.output
    text = " ".join(r.stdout.split())
    for extra in ("gptq", "llamacpp", "onnx"):
        assert f'pip install "winq[{extra}]"' in text, (extra, text)


def test_an_output_that_cannot_be_created_is_one_error_line(ck):
    r = invoke("export", "--format", "gguf", "--checkpoint", ck, "--out", "/proc/winq-no-such/model.gguf")
    assert_clean_error(r, "cannot write /proc/winq-no-such/model.gguf", "cannot create its folder")
    r = invoke("export", "--format", "gptq", "--checkpoint", ck, "--out", "/proc/winq-no-such/g")
    assert_clean_error(r, "cannot write /proc/winq-no-such/g")
