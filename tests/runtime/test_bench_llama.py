"""winq.runtime.bench.llama (llama-bench): finding llama-bench, its command line, parsing its JSON, and one real run.

data/llama_bench_tiny.json is the stdout of the real binary (built by `python -m winq.benchmarks.llama_bench build`
from llama-cpp-python 0.3.36's vendored llama.cpp) for the command of FIXTURE_ARGS on a tiny 4-bit llama GGUF
export, with only `model_filename` shortened to the file name (it was a temporary path). It was captured on a
loaded machine: its speeds are noise, only its form matters here.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from winq.errors import ConfigError
from winq.runtime.bench import llama as L

DATA = Path(__file__).parent / "data"
FIXTURE = DATA / "llama_bench_tiny.json"
FIXTURE_ARGS = dict(threads=2, n_prompt=16, n_gen=4, repeats=2)  # the run that printed the fixture (repack on)
BUILD_HINT = "python -m winq.benchmarks.llama_bench build"


def fixture_records() -> list[dict]:
    return L.parse_output(FIXTURE.read_text())


def _gguf_stub(path: Path) -> Path:
    path.write_bytes(b"GGUF" + b"\0" * 60)  # the magic is all run_llama_bench checks before starting the binary
    return path


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


# ---------------------------------------------------------------------------------------------
# parsing the real output


def test_parse_real_output():
    records = fixture_records()
    # -p 16 -n 4 -d 0,16: pp16 and tg4 at depth 0, then at depth 16
    assert [(r["n_prompt"], r["n_gen"], r["n_depth"]) for r in records] == [(16, 0, 0), (0, 4, 0), (16, 0, 16),
                                                                           (0, 4, 16)]
    argv, settings = L.bench_command("llama-bench", "model.gguf", repack=True, **FIXTURE_ARGS)
    res = L.result_from_records(records, argv, settings)
    pp, tg, tg0 = records[0], records[3], records[1]
    assert res["prefill_tok_s"] == pp["avg_ts"] and res["prefill_tok_s_std"] == pp["stddev_ts"]
    assert res["decode_tok_s"] == tg["avg_ts"] and res["decode_tok_s_std"] == tg["stddev_ts"]
    assert res["decode"]["n_depth"] == 16 and res["decode_empty"]["avg_ts"] == tg0["avg_ts"]
    assert res["prefill"]["samples_ns"] == [int(s) for s in pp["samples_ns"]] and len(pp["samples_ns"]) == 2
    # winq's statistic: tokens / median seconds (of two runs: their mean time)
    med = (int(tg["samples_ns"][0]) + int(tg["samples_ns"][1])) / 2 / 1e9
    assert res["decode"]["median_ts"] == pytest.approx(4 / med, rel=1e-12)
    # the settings llama-bench reports back are the ones asked for
    rep = res["reported"]
    assert (rep["n_threads"], rep["n_batch"], rep["n_ubatch"], rep["type_k"], rep["repack"]) == (2, 512, 512, "f16",
                                                                                                 True)
    assert rep["flash_attn"] == 0 and rep["load_mode"] == "mmap" and rep["backends"] == "CPU"
    assert res["records"] is records and res["cmdline"].endswith("-o json")


def test_parse_errors_name_the_problem():
    with pytest.raises(ConfigError, match="not JSON"):
        L.parse_output("| model | size |\n")
    with pytest.raises(ConfigError, match="not a list of tests"):
        L.parse_output('{"avg_ts": 1}')
    rec = fixture_records()[0]
    del rec["samples_ns"]
    with pytest.raises(ConfigError, match="lacks samples_ns"):
        L.parse_output(json.dumps([rec]))
    with pytest.raises(ConfigError, match=r"no test p0/n4@d16 \(has: p16/n0@d0, p0/n4@d0\)"):
        L.pick(fixture_records()[:2], 0, 4, 16)


# ---------------------------------------------------------------------------------------------
# finding the binary


def test_missing_binary_names_the_build_command(tmp_path, monkeypatch):
    monkeypatch.setenv("WINQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(L.ENV_VAR, raising=False)
    expected = tmp_path / "cache" / "llama.cpp" / L.LLAMA_CPP_PYTHON / "build" / "bin" / "llama-bench"
    assert L.default_binary() == expected
    with pytest.raises(ConfigError, match=f"llama-bench is not built .*{BUILD_HINT}.*{L.ENV_VAR}"):
        L.find_llama_bench()
    with pytest.raises(ConfigError, match=BUILD_HINT):  # run_llama_bench reaches the same error
        L.run_llama_bench(_gguf_stub(tmp_path / "m.gguf"), threads=1)


def test_env_var_overrides_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WINQ_CACHE", str(tmp_path / "cache"))
    exe = _executable(tmp_path / "my-llama-bench", "#!/bin/sh\n")
    monkeypatch.setenv(L.ENV_VAR, str(exe))
    assert L.find_llama_bench() == exe
    plain = tmp_path / "not-executable"
    plain.write_text("")
    for bad in (plain, tmp_path / "absent"):
        monkeypatch.setenv(L.ENV_VAR, str(bad))
        with pytest.raises(ConfigError, match=f"{L.ENV_VAR}=.* is not an executable file"):
            L.find_llama_bench()


def test_run_builds_the_command_and_parses_the_output(tmp_path, monkeypatch):
    """A stand-in binary (via the env var) that records its argv and prints the real fixture."""
    log = tmp_path / "argv.json"
    script = (f"#!{sys.executable}\nimport json, sys\nopen({str(log)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
              f"sys.stdout.write(open({str(FIXTURE)!r}).read())\n")
    monkeypatch.setenv(L.ENV_VAR, str(_executable(tmp_path / "llama-bench", script)))
    gguf = _gguf_stub(tmp_path / "m.gguf")
    res = L.run_llama_bench(gguf, repack=True, extra_args=["--poll", "0"], **FIXTURE_ARGS)
    argv = json.loads(log.read_text())
    assert argv == ["-m", str(gguf), "-t", "2", "-p", "16", "-n", "4", "-d", "0,16", "-r", "2", "-b", "512", "-ub",
                    "512", "-ctk", "f16", "-ctv", "f16", "-fa", "off", "-lm", "mmap", "--repack", "1", "-o", "json",
                    "--poll", "0"]
    assert res["cmd"][1:] == argv and res["binary"] == str(tmp_path / "llama-bench") and res["build"] is None
    assert res["settings"]["flash_attn"] == "off" and res["llama_bench_defaults"]["flash_attn"] == "auto"
    assert res["decode_tok_s"] == fixture_records()[3]["avg_ts"]


def test_failed_run_and_bad_options_raise_one_error(tmp_path, monkeypatch):
    monkeypatch.setenv(L.ENV_VAR, str(_executable(tmp_path / "llama-bench", "#!/bin/sh\necho boom >&2\nexit 3\n")))
    gguf = _gguf_stub(tmp_path / "m.gguf")
    with pytest.raises(ConfigError, match="(?s)llama-bench exited with 3: .* -o json\nboom"):
        L.run_llama_bench(gguf, threads=1)
    with pytest.raises(ConfigError, match="GGUF file .* not found"):
        L.run_llama_bench(tmp_path / "none.gguf", threads=1)
    (tmp_path / "x.gguf").write_bytes(b"nope")
    with pytest.raises(ConfigError, match="not a GGUF file"):
        L.run_llama_bench(tmp_path / "x.gguf", threads=1)
    with pytest.raises(ConfigError, match="threads must be an integer >= 1, got 0"):
        L.run_llama_bench(gguf, threads=0)
    with pytest.raises(ConfigError, match="flash_attn 'yes': choose from on, off, auto"):
        L.run_llama_bench(gguf, threads=1, flash_attn="yes")
    with pytest.raises(ConfigError, match="extra_args must be a sequence"):
        L.run_llama_bench(gguf, threads=1, extra_args="--poll 0")


def test_defaults_follow_the_llamacpp_backend(monkeypatch):
    monkeypatch.setenv("WINQ_LLAMACPP_EXTRA_BUFTS", "0")
    argv, s = L.bench_command("lb", "m.gguf", threads=3, n_prompt=600, n_gen=32)
    assert (s["n_batch"], s["n_ubatch"], s["repack"], s["decode_depth"]) == (640, 640, False, 600)
    assert argv[argv.index("--repack") + 1] == "0" and argv[argv.index("-d") + 1] == "0,600"
    _, s = L.bench_command("lb", "m.gguf", threads=3, decode_depth=0, warmup=False)
    assert s["decode_depth"] == 0 and s["warmup"] is False


# ---------------------------------------------------------------------------------------------
# the real binary on a tiny GGUF


def _real_binary() -> Path | None:
    if os.environ.get(L.ENV_VAR):
        return Path(os.environ[L.ENV_VAR])
    cache = Path(os.environ.get("WINQ_REAL_CACHE") or Path.home() / ".cache" / "winq")
    p = cache / "llama.cpp" / L.LLAMA_CPP_PYTHON / "build" / "bin" / "llama-bench"
    return p if p.is_file() else None


def _tiny_gguf(root: Path) -> Path:
    import winq
    from tinymodels import make_model_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from winq.checkpoint import save_checkpoint
    from winq.exporters import export

    base = make_model_dir(root / "base", "llama", seed=0, hidden=256, inter=512)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    cfg = winq.QuantConfig(bits=4, grid="lsq", group_size=-1, embed="float")
    ck = save_checkpoint(root / "ck", winq.prepare(model, cfg), AutoTokenizer.from_pretrained(str(base)), cfg, None)
    return export("gguf", ck, root / "model.gguf").out


def test_real_llama_bench_on_a_tiny_gguf(tmp_path):
    binary = _real_binary()
    if binary is None:
        pytest.skip(f"llama-bench is not built: run `{BUILD_HINT}` (or set {L.ENV_VAR})")
    gguf = _tiny_gguf(tmp_path)
    res = L.run_llama_bench(gguf, binary=binary, **FIXTURE_ARGS)
    recs = res["records"]
    assert [(r["n_prompt"], r["n_gen"], r["n_depth"]) for r in recs] == [(16, 0, 0), (0, 4, 0), (16, 0, 16),
                                                                         (0, 4, 16)]
    assert all(len(r["samples_ns"]) == 2 for r in recs)
    assert res["prefill_tok_s"] > 0 and res["decode_tok_s"] > 0 and res["decode"]["median_ts"] > 0
    rep = res["reported"]
    assert (rep["n_threads"], rep["n_batch"], rep["flash_attn"], rep["load_mode"]) == (2, 512, 0, "mmap")
    assert rep["model_n_params"] > 0 and rep["backends"] == "CPU"
