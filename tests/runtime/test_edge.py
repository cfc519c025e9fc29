"""benchmarks/edge.py (`winq bench --shape`): shapes, the per-token latency figures of the timing loop, and one
end-to-end run on a tiny shape (build, exact exports, timing, report)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from winq.benchmarks import edge
from winq.errors import ConfigError
from winq.runtime.backends import Session, latency_ms, percentile, time_session


def test_shipped_shapes_are_the_real_models_sizes():
    """Parameter counts of the shipped configs equal the published ones (tied embeddings counted once)."""
    assert set(edge.shape_names()) >= {"llama-3.2-1b", "qwen3-0.6b", "llama-100m"}
    assert edge.n_params(edge.hf_config(edge.load_shape("llama-3.2-1b"))) == 1_235_814_400  # Llama-3.2-1B
    qwen = edge.n_params(edge.hf_config(edge.load_shape("qwen3-0.6b")))
    assert qwen - 151936 * 1024 == pytest.approx(0.44e9, rel=0.01)  # Qwen3-0.6B: 0.44B non-embedding
    small = edge.load_shape("llama-100m")
    assert small["config"]["hidden_size"] % 256 == 0 and small["config"]["intermediate_size"] % 256 == 0
    assert 100e6 <= edge.n_params(edge.hf_config(small)) <= 130e6


def test_shape_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown shape 'nope': choose one of .*llama-3.2-1b"):
        edge.load_shape("nope")
    with pytest.raises(ConfigError, match="file not found"):
        edge.load_shape(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not a JSON file"):
        edge.load_shape(str(bad))
    bad.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ConfigError, match="not a causal LM config .*model_type"):
        edge.load_shape(str(bad))
    with pytest.raises(ConfigError, match="unknown edge type q5_k: choose from f16, q2_k"):
        edge.parse_types("q4_0,q5_k")
    # a plain Hugging Face config.json is a shape too, named after its folder
    d = tmp_path / "my-model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(edge.load_shape("llama-100m")["config"]))
    assert edge.load_shape(str(d / "config.json"))["name"] == "my-model"


def test_percentiles_and_latency():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    assert percentile(list(range(101)), 90) == 90
    lat = latency_ms([0.010, 0.020, 0.030, 0.040, 1.0])
    assert lat["p50"] == pytest.approx(30.0) and lat["max"] == pytest.approx(1000.0) and lat["n"] == 5
    assert lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]


class Recording(Session):
    """Records every call; logits make the argmax the last token + 1."""

    def __init__(self):
        self.calls = []

    def logits(self, ids):
        raise NotImplementedError

    def prefill(self, ids):
        import numpy as np

        self.calls.append(("prefill", len(ids)))
        out = np.zeros(1000, dtype=np.float32)
        out[(ids[-1] + 1) % 1000] = 1
        return out

    def step(self, token):
        import numpy as np

        self.calls.append(("step", token))
        out = np.zeros(1000, dtype=np.float32)
        out[(token + 1) % 1000] = 1
        return out


def test_time_session_prefill_lengths_and_per_token_latency():
    s = Recording()
    res = time_session(s, list(range(100, 132)), n_gen=5, repeats=2, prefill_lengths=[8, 32], warmup_gen=2)
    # warm-up: prefill 8, 2 steps; then per repeat: prefill 32, prefill 8, 5 steps
    assert [c for c in s.calls if c[0] == "prefill"] == [("prefill", 8)] + [("prefill", 32), ("prefill", 8)] * 2
    assert sum(c[0] == "step" for c in s.calls) == 2 + 2 * 5
    assert res["n_prompt"] == 8 and res["decode_ms"]["n"] == 10
    assert set(res["prefill"]) == {8, 32} and res["prefill_tok_s"] == res["prefill"][8]["tok_s"]
    assert res["generated"] == [109, 110, 111, 112, 113]  # decode follows the 8-token prefill
    with pytest.raises(ConfigError, match="prefill lengths .* must lie in 1..32"):
        time_session(Recording(), list(range(32)), n_gen=1, prefill_lengths=[64])


TINY = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 512,
        "max_position_embeddings": 256, "tie_word_embeddings": True}


def test_edge_end_to_end_on_a_tiny_shape(tmp_path, tiny_llama):
    """Build (exact exports), time and report a tiny 256-wide shape: GGUF F16 / Q4_0 / Q2_K / TQ1_0."""
    pytest.importorskip("llama_cpp", reason="the llamacpp extra (pip install 'winq[llamacpp]') is not installed")
    shape = tmp_path / "tiny-edge.json"
    shape.write_text(json.dumps({"name": "tiny-edge", "source": "test", "changes": "none", "config": TINY}))
    out = tmp_path / "edge.json"
    rep = edge.run_edge(str(shape), "q4_0,q2_k,tq1_0", threads=[1], prefill=[8, 16], gen_tokens=3, repeats=1,
                        warmup_gen=1, out=out, say=lambda m: None, tokenizer=str(tiny_llama))
    s = rep["shapes"]["tiny-edge"]
    assert json.loads(out.read_text())["shapes"]["tiny-edge"]["weights"] == edge.WEIGHTS_NOTE
    assert out.with_suffix(".png").stat().st_size > 1000
    built = {n: e for b in s["build"].values() for n, e in b["exports"].items()}
    assert set(built) == {"f16", "q4_0", "q2_k", "tq1_0"}
    for name in ("q4_0", "q2_k", "tq1_0"):
        assert built[name]["max_abs_err"] == 0.0  # read back exactly by the exporter's check
        assert built[name]["containers"] == [name.upper()]  # the asked type, not a fallback container
    assert set(s["results"]) == {"f16@t1", "q4_0@t1", "q2_k@t1", "tq1_0@t1"}
    f16 = s["results"]["f16@t1"]
    assert "speedup" not in f16
    for key in ("q4_0@t1", "q2_k@t1", "tq1_0@t1"):
        r = s["results"][key]
        assert r["bits_per_weight"] == pytest.approx(8 * r["size_bytes"] / s["params"])
        assert r["speedup"]["size_ratio"] == pytest.approx(f16["size_bytes"] / r["size_bytes"])
        assert r["speedup"]["decode"] == pytest.approx(r["decode_tok_s"] / f16["decode_tok_s"])
        lat = r["decode_ms"]
        assert lat["n"] == 3 and 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
        assert set(r["prefill"]) == {"8", "16"} and r["threads"] == 1
    sizes = {k.split("@")[0]: r["bits_per_weight"] for k, r in s["results"].items()}
    assert sizes["tq1_0"] < sizes["q2_k"] < sizes["q4_0"] < sizes["f16"]
    assert "| q2_k |" in edge.table(s, 1)
    # the bench session (last logits only, F16 KV cache) returns the real logits, as the eval session computes them
    import numpy as np

    from winq.runtime.backends import LoadOptions
    from winq.runtime.llamacpp import LlamaCppSession

    q4 = Path(s["results"]["q4_0@t1"]["artifact"])
    ids = [5, 17, 42, 8, 99, 100, 3, 64]
    fast = LlamaCppSession(q4, LoadOptions(threads=1, context=16, purpose="bench"))
    full = LlamaCppSession(q4, LoadOptions(threads=1, context=16))
    a, b = np.asarray(fast.prefill(ids)), np.asarray(full.prefill(ids))
    assert np.abs(a).max() > 0 and np.allclose(a, b, atol=1e-2)
    a, b = np.asarray(fast.step(int(a.argmax()))), np.asarray(full.step(int(b.argmax())))
    assert np.abs(a).max() > 0 and np.allclose(a, b, atol=1e-2)
    # a second shape merges into the same JSON, the first kept; its artifacts are reused (no rebuild)
    shape2 = tmp_path / "tiny-edge-2.json"
    shape2.write_text(json.dumps({"name": "tiny-edge-2", "source": "test", "changes": "none", "config": TINY}))
    rep2 = edge.run_edge(str(shape2), "q4_0", threads=[1], prefill=[8], gen_tokens=2, repeats=1, warmup_gen=1,
                         out=out, say=lambda m: None, tokenizer=str(tiny_llama))
    assert set(rep2["shapes"]) == {"tiny-edge", "tiny-edge-2"}
    again = edge.build(edge.load_shape(str(shape)), str(shape), ["q4_0"], 0, lambda m: None, tokenizer=str(tiny_llama))
    assert again == {}


def test_cli_shape_errors(tmp_path):
    from typer.testing import CliRunner

    from winq.cli.main import app

    r = CliRunner().invoke(app, ["bench", "--shape", "nope", "--out", str(tmp_path / "e.json")])
    assert r.exit_code == 1 and "unknown shape 'nope'" in r.output
    r = CliRunner().invoke(app, ["bench", "--shape", "llama-100m", "--types", "q9", "--out", str(tmp_path / "e.json")])
    assert r.exit_code == 1 and "unknown edge type q9" in r.output
    assert not (tmp_path / "e.json").exists()


def test_profiles_of_a_tiny_shape(tmp_path, tiny_llama, monkeypatch):
    """--profile: llama.cpp's decode under Linux perf (its libraries' symbols), onnxruntime's by its own profiler.
    A tiny model's 32 decode steps take about a millisecond of a worker that spends seconds importing torch: at
    499 Hz and a 0.02% report limit they go unseen, so perf samples at 20 kHz and reports every row here."""
    import shutil

    monkeypatch.setattr(edge, "PERF_FREQ", 20000)
    monkeypatch.setattr(edge, "PERF_PERCENT_LIMIT", 0)
    pytest.importorskip("llama_cpp", reason="the llamacpp extra (pip install 'winq[llamacpp]') is not installed")
    pytest.importorskip("onnxruntime", reason="the onnx extra (pip install 'winq[onnx]') is not installed")
    shape = tmp_path / "tiny-prof.json"
    shape.write_text(json.dumps({"name": "tiny-prof", "source": "test", "changes": "none", "config": TINY}))
    s = edge.load_shape(str(shape))
    edge.build(s, str(shape), ["q4_0", "ort-4bit"], 0, lambda m: None, tokenizer=str(tiny_llama))
    with pytest.raises(ConfigError, match="--profile q9: choose rows from"):
        edge.profiles(s, ["q4_0"], [1], 0, 4, ["q9"], lambda m: None, tokenizer=str(tiny_llama))
    prof = edge.profiles(s, ["q4_0", "ort-4bit"], [1], 0, 32, ["q4_0", "ort-4bit-acc4"], lambda m: None,
                         tokenizer=str(tiny_llama))
    ort = prof["ort-4bit-acc4"]
    assert ort["run"] and ort["steps"] == 32 and ort["ms_per_step"] > 0
    assert "MatMulNBits" in [o["op"] for o in ort["ops"]]
    assert all(0 <= o["pct_of_step"] <= 100 for o in ort["ops"])
    llama = prof["q4_0"]
    if shutil.which("perf") is None:
        assert not llama["run"] and "perf" in llama["reason"]
    elif llama["run"]:  # perf may be refused by the kernel (perf_event_paranoid): then the reason is recorded
        assert llama["runtime_share_pct"] > 0 and all("ggml" in x["dso"] or "llama" in x["dso"] for x in llama["top"])
    else:
        assert "perf record failed" in llama["reason"]
