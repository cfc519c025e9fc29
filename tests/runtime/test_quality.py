"""benchmarks/quality.py: parsing llama-perplexity's output (real captured runs), bits-per-weight accounting on a
tiny GGUF, the text builders' determinism, the Python scorer, and merging points into the results file. None of
these needs llama.cpp's tools or an extra."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from winq.benchmarks import quality as Q
from winq.errors import ConfigError, DataError

DATA = Path(__file__).parent / "data"


def test_parse_kl_divergence_run():
    """A captured `llama-perplexity --kl-divergence` run here (a 4-bit GGUF of the default model against its F16, on
    stdlib-docs): the final statistics and the running per-chunk table."""
    out = (DATA / "llama_perplexity_kld.log").read_text(encoding="utf-8")
    r = Q.parse_perplexity(out)
    assert (r["n_chunks"], r["n_ctx"], r["n_scored"]) == (16, 512, 16 * 255)
    assert r["ppl"] == pytest.approx(10.633814) and r["ppl_err"] == pytest.approx(0.442680)
    assert r["ppl_base"] == pytest.approx(9.012892) and r["ln_ppl_ratio"] == pytest.approx(0.165383)
    assert r["kld"] == pytest.approx(0.181196) and r["kld_err"] == pytest.approx(0.003497)
    assert r["kld_median"] == pytest.approx(0.129763) and r["kld_max"] == pytest.approx(5.358251)
    assert r["top1"] == pytest.approx(0.79657) and r["top1_err"] == pytest.approx(0.0063)
    assert r["rms_dp"] == pytest.approx(0.12159)
    rows = Q.parse_chunk_table(out)
    assert [x["chunk"] for x in rows] == list(range(1, 17))
    assert rows[0] == {"chunk": 1, "ppl": 14.9002, "kld": 0.15906, "top1": pytest.approx(0.8)}
    assert rows[-1]["kld"] == pytest.approx(r["kld"], abs=1e-5) and rows[-1]["top1"] == pytest.approx(r["top1"])


def test_parse_perplexity_run():
    """A captured base run (the default model's F16 on stdlib-docs, `--kl-divergence-base`): the final estimate."""
    r = Q.parse_perplexity((DATA / "llama_perplexity_base.log").read_text(encoding="utf-8"))
    assert r["ppl"] == pytest.approx(9.0142) and r["ppl_err"] == pytest.approx(0.36498)
    assert (r["n_chunks"], r["n_ctx"]) == (16, 512)
    assert "kld" not in r and "top1" not in r


def test_parse_garbage_and_mis_decoded_sign():
    with pytest.raises(ConfigError, match="could not parse llama-perplexity"):
        Q.parse_perplexity("main: build = 1\nerror: failed to load model\n")
    text = ("Mean PPL(Q)                   :  10.500000 \ufffd\ufffd   0.100000\n"
            "Mean    KLD:   0.010000 +/-   0.001000\n")
    r = Q.parse_perplexity(text)
    assert r["ppl"] == 10.5 and r["kld"] == 0.01 and r["kld_err"] == 0.001


def test_gguf_size_counts_every_tensor(tmp_path):
    """bits/weight = 8 * tensor bytes / tensor elements over every tensor (an F32 norm, an F16 table, a Q8_0 one)."""
    import gguf

    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("norm.weight", np.ones(64, dtype=np.float32))
    w.add_tensor("token_embd.weight", np.zeros((8, 64), dtype=np.float16))
    q8 = gguf.quants.quantize(np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32),
                              gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.ffn_up.weight", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    s = Q.gguf_size(path)
    nbytes = 64 * 4 + 8 * 64 * 2 + 4 * 2 * 34  # F32, F16, Q8_0 (34 bytes per 32 weights)
    assert s["tensor_bytes"] == nbytes and s["n_weights"] == 64 + 512 + 256
    assert s["bits_per_weight"] == pytest.approx(8 * nbytes / 832, abs=1e-4)
    assert s["weights_by_type"] == {"F16": 512, "F32": 64, "Q8_0": 256}
    assert s["size_bytes"] == path.stat().st_size > nbytes


def test_text_builders_are_deterministic(tmp_path):
    a, b = Q.stdlib_docs_text(), Q.stdlib_docs_text()
    assert a == b and a.startswith("Module argparse\n\n") and "json.dumps\n\n" in a
    assert Q.stdlib_docs_text(("json",)) == Q.stdlib_docs_text(("json",))
    for name in Q.LICENSES:
        (tmp_path / name).write_text(f"\n{name} text\n")
    assert Q.licenses_text(tmp_path) == "Apache-2.0 text\n\nMPL-2.0 text\n\nGPL-3 text"
    (tmp_path / "GPL-3").unlink()
    with pytest.raises(DataError, match="GPL-3 not found"):
        Q.licenses_text(tmp_path)
    with pytest.raises(DataError, match="unknown text 'ptb'"):
        Q.raw_text("ptb")


class _CharTok:
    """A tokenizer with one id per character (enough for cut_text)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_cut_text():
    text, n = Q.cut_text("abcdefghij" * 10, _CharTok(), 20, margin=5)
    assert (text, n) == ("abcdefghij" * 2 + "abcde", 25)
    with pytest.raises(DataError, match="notes: 10 tokens, fewer than the 25 needed"):
        Q.cut_text("abcdefghij", _CharTok(), 20, margin=5, what="notes")


def test_load_texts_missing(tmp_path):
    with pytest.raises(DataError, match="no texts in .*quality.py texts"):
        Q.load_texts(tmp_path)


def test_find_tool_missing(tmp_path, monkeypatch):
    monkeypatch.setenv(Q.TOOLS_ENV, str(tmp_path))
    with pytest.raises(ConfigError, match="llama-perplexity not found .*build-tools"):
        Q.find_tool("llama-perplexity")
    with pytest.raises(ConfigError, match="unknown llama.cpp tool"):
        Q.find_tool("llama-server")


def test_read_kld_base_header(tmp_path):
    p = tmp_path / "x.kld"
    toks = np.arange(2 * 8, dtype="<i4")
    p.write_bytes(b"_logits_" + np.array([8, 100, 2], dtype="<i4").tobytes() + toks.tobytes() + b"\0" * 64)
    h = Q.read_kld_base(p)
    assert (h["n_ctx"], h["n_vocab"], h["n_chunk"]) == (8, 100, 2) and h["tokens"].tolist() == list(range(16))
    p.write_bytes(b"garbage!" + b"\0" * 20)
    with pytest.raises(ConfigError, match="not a llama-perplexity logits file"):
        Q.read_kld_base(p)


def test_windows_and_score():
    ids = np.arange(40) % 7
    ws = Q.windows(ids, n_ctx=8, n_chunks=4, bos=99)
    assert len(ws) == 4 and all(w[0] == 99 for w in ws) and ws[1][1:].tolist() == ids[9:16].tolist()
    with pytest.raises(DataError, match="need 48"):
        Q.windows(ids, n_ctx=8, n_chunks=6)
    V = 10
    uniform = lambda x: torch.zeros(len(x), V)  # noqa: E731
    r = Q.score(uniform, ws)
    assert r["ppl"] == pytest.approx(V) and r["n_scored"] == 4 * 3  # positions 4..6 of each window of 8
    g = torch.Generator().manual_seed(0)
    table = torch.randn(100, V, generator=g)
    model = lambda x: table[x]  # noqa: E731
    same = Q.score(model, ws, ref=model)
    assert same["kld"] == pytest.approx(0, abs=1e-12) and same["top1"] == 1.0
    noisy = lambda x: table[x] + 0.5 * torch.randn(len(x), V, generator=g)  # noqa: E731
    other = Q.score(noisy, ws, ref=model)
    assert other["kld"] > 0 and 0 <= other["top1"] <= 1
    # a stored reference gives the same figures as the callable one
    store = np.zeros((4, 3, V), dtype=np.float32)
    Q.score(model, ws, store_into=store)
    assert Q.score(model, ws, ref=store)["kld"] == pytest.approx(0, abs=1e-6)


def test_add_point_merges_by_name(tmp_path):
    out = tmp_path / "quality.json"
    m = {"size_mb": 91.7, "bits_per_weight": 5.45, "texts": {"licenses": {"ppl": 20.0, "kld": 0.2, "top1": 0.8}}}
    Q.add_point("a", m, {"family": "llama.cpp", "command": "llama-quantize ..."}, out, work=tmp_path)
    Q.add_point("b", {**m, "size_mb": 60.0}, {"seed": 0}, out, work=tmp_path)
    Q.add_point("a", {**m, "size_mb": 92.0}, {"family": "llama.cpp"}, out, work=tmp_path)
    Q.add_point("c", {"status": "failed", "error": "no CUDA"}, {"family": "gptqmodel"}, out, work=tmp_path)
    rep = json.loads(out.read_text())
    assert list(rep["points"]) == ["a", "b", "c"]
    assert rep["points"]["a"]["size_mb"] == 92.0 and rep["points"]["b"]["family"] == "winq"
    assert rep["points"]["b"]["meta"] == {"seed": 0} and rep["points"]["c"]["status"] == "failed"
    assert rep["settings"]["n_ctx"] == 512 and rep["machine"]["cpu_count"] and "versions" in rep
    assert out.with_suffix(".png").stat().st_size > 1000
    assert not Q.done("a", out)  # measured on one text of three: measured again
    full = {**m, "texts": {t: m["texts"]["licenses"] for t in Q.TEXTS}}
    Q.add_point("e", full, {"family": "llama.cpp"}, out, plot_png=False, work=tmp_path)
    assert Q.done("e", out) and not Q.done("c", out) and not Q.done("zzz", out)
    assert "| a | llama.cpp | 92.0 | 5.45 | - | 20.000 / 0.2000 / 80.0% | - |" in Q.table(rep)
    with pytest.raises(ConfigError, match="family 'mine'"):
        Q.add_point("d", m, {"family": "mine"}, out, work=tmp_path)
    with pytest.raises(ConfigError, match="no per-text measurements"):
        Q.add_point("d", {"size_mb": 1.0}, None, out, work=tmp_path)
