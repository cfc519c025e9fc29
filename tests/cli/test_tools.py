"""`winq bench` and `winq inspect` end to end on tiny seeded models and hand-built GGUF / ONNX / GPTQ artifacts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import winq
from winq.cli.main import app
from winq.errors import ConfigError
from winq.runtime.inspection import inspect_artifact

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "400", "NO_COLOR": "1"})


def flat(s: str) -> str:
    return " ".join(s.split())


def assert_clean_error(r, *needles: str) -> str:
    """exit code 1, one `error:` line on stderr naming every needle, no traceback."""
    assert r.exit_code == 1, (r.exit_code, r.output, r.exception)
    assert isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.output
    errors = [l for l in r.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(errors) == 1, r.stderr
    msg = flat(errors[0])
    for n in needles:
        assert n in msg, (n, msg)
    return msg


@pytest.fixture(scope="module")
def ckpt(tiny_llama, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from winq.checkpoint import save_checkpoint

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    cfg = winq.QuantConfig(bits=4, group_size=-1, embed="float")
    winq.prepare(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in winq.quant_layers(model).values():
            m.alpha.mul_(1 + 0.2 * torch.rand(m.alpha.shape, generator=g))
    return save_checkpoint(tmp_path_factory.mktemp("tools") / "ckpt", model, tok, cfg, None)


# ---- bench -----------------------------------------------------------------------------------------


def test_bench_fakequant_packed_and_fp_baseline(ckpt, tmp_path):
    out = tmp_path / "res" / "bench.json"
    r = invoke("bench", "--backend", "fakequant,packed", "--checkpoint", ckpt, "--prompt-tokens", 24, "--gen-tokens", 3,
               "--repeats", 1, "--threads", 1, "--out", out)
    assert r.exit_code == 0, (r.output, r.exception)
    rep = json.loads(out.read_text())
    assert list(rep["results"]) == ["fakequant", "fp", "packed"]
    assert rep["prompt"] == {"data": "ptb", "split": "test", "tokens": 24}  # real PTB test ids
    assert rep["settings"]["gen_tokens"] == 3 and rep["settings"]["threads"] == 1 and rep["settings"]["repeats"] == 1
    m = rep["machine"]
    assert m["cpu_count"] >= 1 and m["threads"] == 1 and m["torch"] == torch.__version__
    weights = (ckpt / "model.safetensors").stat().st_size
    for name, res in rep["results"].items():
        for k in ("prefill_tok_s", "decode_tok_s", "prefill_s", "decode_s", "load_s", "rss_load_mb", "peak_rss_mb"):
            assert res[k] > 0, (name, k)
        assert res["size_bytes"] == weights and res["artifact"] == str(ckpt)
        assert res["n_prompt"] == 24 and res["n_gen"] == 3 and res["torch_threads"] == 1
    assert rep["results"]["fp"]["baseline_of"] == ["fakequant", "packed"]
    for name in ("fakequant", "packed"):
        res, fp = rep["results"][name], rep["results"]["fp"]
        assert res["baseline"] == "fp"
        assert res["speedup"]["decode"] == pytest.approx(res["decode_tok_s"] / fp["decode_tok_s"])
        assert res["speedup"]["prefill"] == pytest.approx(res["prefill_tok_s"] / fp["prefill_tok_s"])
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    text = flat(r.stdout)
    for needle in ("backend", "prefill", "decode", "tok/s", "peak", "fakequant", "packed", "fp", "baseline", "wrote "
                                                                                                             f"{out}"):
        assert needle in text, needle
    assert "[1/3] fakequant" in r.stderr and "[3/3] packed" in r.stderr


def test_bench_json_on_stdout(ckpt, tmp_path, text_file):
    out = tmp_path / "b.json"
    r = invoke("bench", "--backend", "packed", "--packed", ckpt, "--no-baseline", "--data", text_file,
               "--prompt-tokens", 8,
               "--gen-tokens", 2, "--repeats", 1, "--threads", 1, "--out", out, "--json")
    assert r.exit_code == 0, (r.output, r.exception)
    rep = json.loads(r.stdout)
    assert list(rep["results"]) == ["packed"] and "speedup" not in rep["results"]["packed"]
    assert rep["prompt"]["data"] == str(text_file) and rep["prompt"]["tokens"] == 8
    assert json.loads(out.read_text())["results"]["packed"]["size_bytes"] == (ckpt / "model.safetensors").stat().st_size


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--backend", "fakequant,tensorrt"], ["unknown backend "
                                               "'tensorrt'", "choose from fakequant, packed, fp, gptq, llamacpp, ort"]),
        (["--backend", "fakequant"], ["backend fakequant needs --checkpoint DIR"]),
        (["--backend", "gptq"], ["backend gptq needs --gptq FOLDER"]),
        (["--backend", "llamacpp", "--gguf", "/nonexistent/m.gguf"], ["--gguf /nonexistent/m.gguf: not found"]),
        (["--backend", "fakequant", "--checkpoint", "/nonexistent/ck"], ["--checkpoint /nonexistent/ck: not found"]),
        (["--prompt-tokens", "0", "--checkpoint", "."], ["--prompt-tokens must be an integer >= 1, got 0"]),
        (["--kernels", "--kernel-args", "--quick '"], ["--kernel-args", "No closing quotation"]),
    ],
)
def test_bench_bad_input(args, needles, tmp_path):
    r = invoke("bench", *args, "--out", tmp_path / "x.json")
    assert_clean_error(r, *needles)
    assert not (tmp_path / "x.json").exists()


def test_bench_llamacpp_and_ort_with_their_baselines(ckpt, tmp_path):
    """The llamacpp and ort workers call winq.runtime.llamacpp.bench / winq.runtime.ort.bench; the F16 GGUF and fp32
    ONNX baselines are built once into $WINQ_CACHE/bench and reused."""
    pytest.importorskip("llama_cpp", reason='backend llamacpp needs llama-cpp-python: pip install "winq[llamacpp]"')
    pytest.importorskip("onnxruntime", reason="backend ort needs onnxruntime")
    pytest.importorskip("onnx", reason="the ONNX export needs onnx")
    from winq.exporters import export

    gguf = export("gguf", ckpt, tmp_path / "gguf" / "model.gguf").out
    onnx_dir = export("onnx", ckpt, tmp_path / "onnx").out
    out = tmp_path / "b.json"
    args = ("bench", "--backend", "llamacpp,ort", "--gguf", gguf, "--onnx", onnx_dir, "--checkpoint", ckpt,
            "--prompt-tokens", 16,
            "--gen-tokens", 2, "--repeats", 1, "--threads", 1, "--out", out, "--json")
    r = invoke(*args)
    assert r.exit_code == 0, (r.output, r.exception)
    res = json.loads(r.stdout)["results"]
    assert list(res) == ["llamacpp", "llamacpp-f16", "ort", "ort-fp32"]
    assert "building the llamacpp-f16 baseline" in r.stderr and "building the ort-fp32 baseline" in r.stderr
    for name, x in res.items():
        assert x["prefill_tok_s"] > 0 and x["decode_tok_s"] > 0 and x["peak_rss_mb"] > 0 and x["n_prompt"] == 16, name
    assert res["llamacpp"]["size_bytes"] == gguf.stat().st_size
    assert res["ort"]["size_bytes"] == sum(f.stat().st_size for f in onnx_dir.rglob("*") if f.is_file())
    f16, fp32 = Path(res["llamacpp-f16"]["artifact"]), Path(res["ort-fp32"]["artifact"])
    assert f16.is_file() and res["llamacpp-f16"]["size_bytes"] == f16.stat().st_size > gguf.stat().st_size
    assert (fp32 / "model.onnx").is_file() and res["ort-fp32"]["size_bytes"] > res["ort"]["size_bytes"]
    assert res["llamacpp"]["baseline"] == "llamacpp-f16" and res["ort"]["baseline"] == "ort-fp32"
    r = invoke(*args[:-1])  # second run: the cached baselines are reused
    assert r.exit_code == 0, (r.output, r.exception)
    assert "building" not in r.stderr


def test_bench_gptq_folder_needs_config(ckpt, tmp_path):
    r = invoke("bench", "--backend", "gptq", "--gptq", tmp_path, "--no-baseline", "--out", tmp_path / "x.json")
    assert_clean_error(r, f"--gptq {tmp_path}: not a GPTQ export folder (no config.json)")


def test_bench_kernels_passes_arguments_and_exit_code(capfd):
    r = invoke("bench", "--kernels", "--kernel-args", "--help")
    assert r.exit_code == 0, (r.output, r.exception)
    assert "--quick" in capfd.readouterr().out  # the script's own argparse help, printed by the subprocess


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed where there is no CUDA GPU")
def test_bench_kernels_without_cuda_prints_the_scripts_message(capfd):
    r = invoke("bench", "--kernels", "--kernel-args", "--quick")
    assert r.exit_code == 1
    got = capfd.readouterr()
    assert "benchmarks/unpack_gemm.py needs a CUDA GPU" in got.out + got.err


# ---- inspect: GPTQ and checkpoints --------------------------------------------------------------------


@pytest.fixture(scope="module")
def gptq_dir(ckpt, tmp_path_factory) -> Path:
    from winq.exporters import export

    return export("gptq", ckpt, tmp_path_factory.mktemp("gptq") / "gptq").out


def test_inspect_gptq(gptq_dir, ckpt):
    rep = inspect_artifact(gptq_dir)
    rec = json.loads((gptq_dir / "winq-export.json").read_text())
    assert rep["format"] == "gptq"
    q = [t for t in rep["tensors"] if t["quantized"]]
    assert sorted(t["name"] for t in q) == sorted(t["name"] for t in rec["tensors"])
    by_name = {t["name"]: t for t in rec["tensors"]}
    for t in q:  # bytes and shapes read from the safetensors header agree with what the exporter recorded
        assert t["bits"] == 4 and t["shape"] == by_name[t["name"]]["shape"]
        assert t["bytes"] == by_name[t["name"]]["bytes"]
    assert rep["totals"]["bits_per_weight"] == pytest.approx(rec["summary"]["bits_per_weight"], abs=1e-4)
    assert rep["totals"]["file_bytes"] == sum(f.stat().st_size for f in gptq_dir.iterdir())
    assert rep["winq"]["quantization_config"]["bits"] == 4
    assert rep["winq"]["source"]["checkpoint"] == str(ckpt)
    assert rep["record"]["present"] and rep["record"]["clean"] and rep["record"]["tensors"] == len(q)


def test_inspect_gptq_dirty_record(gptq_dir, tmp_path):
    g = shutil.copytree(gptq_dir, tmp_path / "g")
    rec = json.loads((g / "winq-export.json").read_text())
    rec["tensors"][2]["max_abs_err"] = 1e-3
    (g / "winq-export.json").write_text(json.dumps(rec))
    rep = inspect_artifact(g)
    assert rep["record"]["present"] and not rep["record"]["clean"]
    assert any("1 tensors with max_abs_err != 0" in p for p in rep["record"]["problems"])
    r = invoke("inspect", g, "--no-tensors")
    assert r.exit_code == 0 and "present but NOT clean" in flat(r.stdout)
    (g / "winq-export.json").unlink()
    assert inspect_artifact(g)["record"]["problems"] == ["no winq-export.json"]


def test_inspect_checkpoint_cli(ckpt):
    r = invoke("inspect", ckpt, "--json")
    assert r.exit_code == 0, (r.output, r.exception)
    rep = json.loads(r.stdout)
    info = json.loads((ckpt / "winq.json").read_text())
    assert rep["format"] == "checkpoint" and rep["winq"] == info and rep["record"] is None
    q = [t for t in rep["tensors"] if t["quantized"]]
    assert sorted(t["name"] for t in q) == sorted(f"{m}.weight" for m in info["quantized_modules"])
    # per-row scales: 4 bits per weight + one float16 scale per row (nominal), from the weights' shapes
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        shapes = [f.get_slice(f"{m}.weight").get_shape() for m in info["quantized_modules"]]
    want = sum(4 * o * i + 16 * o for o, i in shapes) / sum(o * i for o, i in shapes)
    assert rep["totals"]["bits_per_weight"] == pytest.approx(want, abs=1e-4)
    assert {t["bits_per_weight"] for t in q} == {4.5, 4.25}  # 16 bits over rows of 32 and of 64 inputs
    assert rep["totals"]["file_bytes"] == (ckpt / "model.safetensors").stat().st_size
    r = invoke("inspect", ckpt)
    assert r.exit_code == 0 and "checkpoint" in r.stdout and "verification record: none" in flat(r.stdout)


# ---- inspect: GGUF built with gguf-py ------------------------------------------------------------------


def write_gguf(path: Path, meta: dict | None) -> Path:
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    w = GGUFWriter(str(path), "llama")
    if meta is not None:
        w.add_string("winq.export", json.dumps(meta))
    w.add_tensor("blk.0.attn_q.weight", quantize(rng.standard_normal((8, 64)).astype(np.float32),
                                                 GGMLQuantizationType.Q4_0),
                 raw_dtype=GGMLQuantizationType.Q4_0)
    w.add_tensor("blk.0.ffn_up.weight", quantize(rng.standard_normal((16, 64)).astype(np.float32),
                                                 GGMLQuantizationType.Q4_0),
                 raw_dtype=GGMLQuantizationType.Q4_0)
    w.add_tensor("token_embd.weight", rng.standard_normal((10, 64)).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_record(folder: Path, fmt: str, artifact: str | None, errs=(0.0, 0.0)) -> None:
    tensors = [{"name": f"t{i}", "max_abs_err": e} for i, e in enumerate(errs)]
    (folder / "winq-export.json").write_text(json.dumps({
        "format": fmt, "artifact": artifact, "summary": {"tensors": len(errs),
                                                         "max_abs_err": max(errs)}, "tensors": tensors}))


META = {"checkpoint": "runs/winq", "options": {"type": "auto", "keep": "f16"}, "winq": {"quant": {"bits": 4,
                                                                                                  "grid": "lsq"}}}


def test_inspect_gguf(tmp_path):
    f = write_gguf(tmp_path / "model.gguf", META)
    write_record(tmp_path, "gguf", "model.gguf")
    rep = inspect_artifact(f)
    assert rep["format"] == "gguf" and rep["winq"] == META
    t = {x["name"]: x for x in rep["tensors"]}
    assert t["blk.0.attn_q.weight"] == {"name": "blk.0.attn_q.weight", "type": "Q4_0", "bits": 4, "shape": [8, 64],
                                        "params": 512,
                                        "bytes": 8 * 2 * 18, "bits_per_weight": 4.5, "quantized": True}
    assert t["token_embd.weight"]["type"] == "F16" and t["token_embd.weight"]["bits_per_weight"] == 16.0
    assert t["token_embd.weight"]["shape"] == [10, 64] and not t["token_embd.weight"]["quantized"]
    tot = rep["totals"]
    assert tot["bits_per_weight"] == 4.5 and tot["quantized_tensors"] == 2 and tot["tensors"] == 3
    assert tot["file_bytes"] == f.stat().st_size and tot["types"] == {"Q4_0": 2, "F16": 1}
    assert rep["record"]["present"] and rep["record"]["clean"]
    r = invoke("inspect", f)
    assert r.exit_code == 0, (r.output, r.exception)
    text = flat(r.stdout)
    for needle in ("blk.0.ffn_up.weight", "Q4_0", "4.500 bits/weight", "present and clean"):
        assert needle in text, needle


def test_inspect_gguf_record_of_another_file_or_unclean(tmp_path):
    f = write_gguf(tmp_path / "model.gguf", None)
    write_record(tmp_path, "gguf", "other.gguf")
    rep = inspect_artifact(f)
    assert rep["winq"] is None and not rep["record"]["present"] and not rep["record"]["clean"]
    assert "describes 'other.gguf', not 'model.gguf'" in rep["record"]["problems"][0]
    write_record(tmp_path, "gguf", "model.gguf", errs=(0.0, 2.0**-10))
    rep = inspect_artifact(f)
    assert rep["record"]["present"] and not rep["record"]["clean"]
    assert any("summary max_abs_err is 0.0009765625" in p for p in rep["record"]["problems"])
    r = invoke("inspect", f, "--no-tensors")
    assert r.exit_code == 0 and "NOT clean" in r.stdout and "blk.0" not in r.stdout


def test_inspect_corrupt_and_unknown(tmp_path):
    good = write_gguf(tmp_path / "good.gguf", META)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(good.read_bytes()[:100])  # right magic, truncated
    r = invoke("inspect", bad)
    assert_clean_error(r, "corrupt or truncated GGUF", "winq inspect accepts a GGUF file")
    (tmp_path / "junk.gguf").write_bytes(b"NOPE" * 10)
    with pytest.raises(ConfigError, match="not a GGUF file"):
        inspect_artifact(tmp_path / "junk.gguf")
    (tmp_path / "x.txt").write_text("hi")
    assert_clean_error(invoke("inspect", tmp_path / "x.txt"), "unknown file "
                                                              "type", "a GPTQ export folder", "a winq checkpoint")
    (tmp_path / "empty").mkdir()
    assert_clean_error(invoke("inspect", tmp_path / "empty"), "without winq.json, model.onnx or config.json")
    assert_clean_error(invoke("inspect", tmp_path / "missing"), "not found")


# ---- inspect: ONNX built with onnx.helper -------------------------------------------------------------


def write_onnx(folder: Path, bits: int = 4, block: int = 32, meta: dict | None = None) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    K, N = 64, 16
    kb = K // block
    blob = block * bits // 8
    B = helper.make_tensor("w.B", TensorProto.UINT8, [N, kb, blob], np.arange(N * kb * blob, dtype=np.uint8) % 251)
    S = helper.make_tensor("w.scales", TensorProto.FLOAT, [N * kb], np.ones(N * kb, dtype=np.float32))
    Z = helper.make_tensor("w.zp", TensorProto.UINT8, [N * ((kb * bits + 7) // 8)], np.zeros(N * ((kb * bits + 7) // 8),
                                                                                             np.uint8))
    H = helper.make_tensor("lm_head", TensorProto.FLOAT, [N, 10], np.zeros(N * 10, dtype=np.float32))
    mm = helper.make_node("MatMulNBits", ["x", "w.B", "w.scales", "w.zp"], ["h"], name="layers.0.q_proj",
                          domain="com.microsoft",
                          K=K, N=N, bits=bits, block_size=block, accuracy_level=0)
    head = helper.make_node("MatMul", ["h", "lm_head"], ["y"])
    g = helper.make_graph([mm, head], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], initializer=[B, S, Z, H])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    if meta is not None:
        helper.set_model_props(model, {"winq.export": json.dumps(meta)})
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    return folder


def test_inspect_onnx(tmp_path):
    folder = write_onnx(tmp_path / "onnx", bits=4, block=32, meta=META)
    write_record(folder, "onnx", "onnx")
    (folder / "winq.json").write_text("{}")  # an ONNX export carries its checkpoint's winq.json: still ONNX
    rep = inspect_artifact(folder)
    assert rep["format"] == "onnx" and rep["winq"] == META
    tot = rep["totals"]
    assert tot["matmulnbits"] == 1 and tot["bits"] == {"4": 1} and tot["block_sizes"] == {"32": 1}
    mm = next(t for t in rep["tensors"] if t["type"] == "MatMulNBits")
    # B 16*2*16 bytes + scales 16*2*4 + zero points 16*1 over 16*64 weights
    assert mm["shape"] == [16, 64] and mm["bits"] == 4 and mm["block_size"] == 32
    assert mm["bytes"] == 512 + 128 + 16 and mm["bits_per_weight"] == pytest.approx(8 * 656 / 1024)
    head = next(t for t in rep["tensors"] if t["name"] == "lm_head")
    assert head["type"] == "FLOAT" and head["bits"] == 32 and not head["quantized"]
    assert rep["record"]["clean"]
    assert inspect_artifact(folder / "model.onnx")["totals"]["matmulnbits"] == 1  # the file itself works too
    r = invoke("inspect", folder, "--no-tensors")
    assert r.exit_code == 0, (r.output, r.exception)
    assert "1 MatMulNBits (bits {'4': 1}, block sizes {'32': 1})" in flat(r.stdout)


def test_inspect_onnx_two_bit_without_record(tmp_path):
    folder = write_onnx(tmp_path / "onnx2", bits=2, block=16)
    rep = inspect_artifact(folder)
    assert rep["totals"]["bits"] == {"2": 1} and rep["totals"]["block_sizes"] == {"16": 1} and rep["winq"] is None
    assert not rep["record"]["present"]


def test_inspect_corrupt_onnx(tmp_path):
    pytest.importorskip("onnx")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "model.onnx").write_bytes(b"\x08\x07garbage\xff\xff\xff")
    assert_clean_error(invoke("inspect", tmp_path / "o"), "corrupt ONNX model", "winq inspect accepts")
