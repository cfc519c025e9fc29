"""The output head and embeddings: a head trained quantized (`--quantize-lm-head`) is exported
exactly (GGUF `output` in its grid's type, ONNX MatMulNBits) while the embedding it was initialised from stays a
separate float table; a float head / embedding quantized after training (GGUF `--keep q8_0|q6_k`, ONNX
`--keep-head int8|int4`) is never called exact and records its measured perplexity cost.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import winq
from winq.errors import ConfigError
from winq.exporters import ExportWarning, export
from winq.formats import gguf as G

from test_gptq import make_checkpoint

EVAL = 256  # tokens of the perplexity-cost measurement in these tests (PTB test, the default data)


def need(mod: str):
    pytest.importorskip(mod, reason=f'needs {mod}: pip install "winq[llamacpp]" / "winq[onnx]"')


def quiet_export(*a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExportWarning)
        return export(*a, **kw)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    from tinymodels import make_model_dir

    root = tmp_path_factory.mktemp("head-bases")
    return {
        256: make_model_dir(root / "h256", "llama", seed=0, hidden=256, inter=512),
        96: make_model_dir(root / "h96", "llama", seed=2, hidden=96, inter=256),
        "untied": make_model_dir(root / "untied", "llama", seed=4, hidden=256, inter=512, tie=False),
        48: make_model_dir(root / "h48", "llama", seed=0, hidden=48, inter=80),
        "untied48": make_model_dir(root / "u48", "llama", seed=1, hidden=48, inter=80, tie=False),
    }


# ---------------------------------------------------------------------------------------------
# Q6_K: winq's encoder against gguf-py's dequantizer


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 4), nb=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_q6_k_layout_round_trips_on_grid_values(rows, nb, seed):
    """Values that lie on a Q6_K grid (each 16-block holding its -32 code, one sub-scale at +-127) come back
    bit for bit through gguf-py's dequantizer: every field sits where ggml reads it."""
    rng = np.random.default_rng(seed)
    n = rows * nb
    d = rng.uniform(1e-4, 1e-2, size=n).astype(np.float16)
    sc = rng.integers(-127, 128, size=(n, 16))
    sc[sc == 0] = 1
    sc[np.arange(n), rng.integers(0, 16, size=n)] = 127 * rng.choice([-1, 1], size=n)
    q = rng.integers(-32, 32, size=(n, 16, 16))
    q[:, :, 0] = -32
    x = (d.astype(np.float32)[:, None, None] * sc[..., None].astype(np.float32)) * q.astype(np.float32)
    x = x.reshape(rows, nb * 256).astype(np.float32)
    blocks = G.encode_q6_k(x)
    assert blocks.shape == (rows, nb * 210) and blocks.dtype == np.uint8
    assert np.array_equal(G.decode_float(blocks, "q6_k", x.shape), x)


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 6), nb=st.integers(1, 3), seed=st.integers(0, 2**31 - 1), spread=st.floats(-2, 2))
def test_q6_k_rounds_to_nearest_within_a_step(rows, nb, seed, spread):
    """Embedding-like magnitudes (std 0.01..100; below that the float16 super-block scale d goes subnormal, as in
    ggml): every value within a step of its 16-block's scale max|x| / 31."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, nb * 256)) * 10.0**spread).astype(np.float32)
    x[0, :16] = 0  # an all-zero sub-block
    y = G.decode_float(G.encode_q6_k(x), "q6_k", x.shape)
    sub = np.abs(x).reshape(rows, nb * 16, 16).max(axis=2)
    err = np.abs(y - x).reshape(rows, nb * 16, 16).max(axis=2)
    # half a step, or one where the sub-block's extreme took the -32 code and a value of the other sign clips at +31
    assert (err <= 1.05 * sub / 31 + 1e-30).all()
    assert (y.reshape(rows, -1, 16)[0, 0] == 0).all()
    q8 = G.decode_float(__import__("gguf").quants.quantize(x, G.GGMLQuantizationType.Q8_0), "q8_0", x.shape)
    assert np.abs(y - x).mean() < 8 * np.abs(q8 - x).mean() + 1e-30  # 6 bits: about 4x Q8_0's error


# ---------------------------------------------------------------------------------------------
# GGUF


@pytest.mark.parametrize("grid,bits,want", [("lsq", 4, "Q4_0"), ("lsq", 8, "Q8_0"), ("ternary", 2, "TQ1_0")])
def test_gguf_quantized_head_is_exact(bases, tmp_path, grid, bits, want):
    from gguf import GGUFReader

    ck = make_checkpoint(bases[256], tmp_path / "ck", grid, bits, -1, quantize_lm_head=True)
    res = quiet_export("gguf", ck, tmp_path / "g" / "model.gguf")
    m = res.manifest
    head = next(t for t in m["tensors"] if t["name"] == "lm_head")
    assert head["container"].split(":")[0] == want and head["max_abs_err"] == 0.0
    assert m["summary"]["max_abs_err"] == 0.0 and "post_training" not in m["info"]
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(res.out)).tensors}
    assert types["output.weight"] == want and types["token_embd.weight"] == "F16"  # both stored: different values
    assert any("token_embd stays float" in n for n in res.notes)
    # training unties them: the float embedding and the quantized head are separate tensors
    net, _, _ = __import__("winq.checkpoint", fromlist=["x"]).load_checkpoint(ck)
    assert net.lm_head.weight is not net.model.embed_tokens.weight


def test_llamacpp_runs_a_quantized_head(bases, tmp_path):
    need("llama_cpp")
    from test_gguf import check_llamacpp_matches_fake_quant

    ck = make_checkpoint(bases[256], tmp_path / "ck", "lsq", 4, -1, quantize_lm_head=True)
    res = quiet_export("gguf", ck, tmp_path / "g" / "model.gguf")
    check_llamacpp_matches_fake_quant(ck, res.out)


@pytest.fixture(scope="module")
def keep_exports(bases, tmp_path_factory):
    root = tmp_path_factory.mktemp("keep")
    out = {}
    for tag, base in (("tied", bases[256]), ("untied", bases["untied"])):
        ck = make_checkpoint(base, root / f"ck-{tag}", "lsq", 4, -1)
        for keep in ("q8_0", "q6_k"):
            out[(tag, keep)] = (ck, quiet_export("gguf", ck, root / f"{tag}-{keep}" / "model.gguf", keep=keep,
                                                 keep_eval_tokens=EVAL))
    return out


@pytest.mark.parametrize("tag", ["tied", "untied"])
@pytest.mark.parametrize("keep", ["q8_0", "q6_k"])
def test_gguf_keep_records_its_ppl_cost_never_exact(keep_exports, tag, keep):
    from gguf import GGUFReader

    ck, res = keep_exports[(tag, keep)]
    m = json.loads((res.out.parent / "winq-export.json").read_text())
    assert m["summary"]["max_abs_err"] == 0.0  # the trained layers are still exact
    pt = m["info"]["post_training"]
    assert pt["exact"] is False
    names = {t["name"] for t in pt["tensors"]}
    assert names == ({"token_embd.weight"} if tag == "tied" else {"token_embd.weight", "output.weight"})
    assert all(t["stored_as"] == keep.upper() and 0 < t["max_abs_err"] < 0.05 for t in pt["tensors"])
    c = pt["ppl_cost"]
    assert c["data"] == "ptb" and c["split"] == "test" and c["tokens"] == EVAL - 1
    assert c["delta_ppl"] == pytest.approx(c["ppl_post_training"] - c["ppl_reference"])
    assert c["relative"] == pytest.approx(c["delta_ppl"] / c["ppl_reference"])
    assert math.exp(c["delta_nll"]) == pytest.approx(c["ppl_post_training"] / c["ppl_reference"])
    assert 0 < abs(c["relative"]) < 0.02
    assert any("NOT exact" in n and "perplexity cost" in n for n in m["notes"])
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(res.out)).tensors}
    assert types["token_embd.weight"] == keep.upper()
    # the reference perplexity is the fake-quant model's, float head as trained
    from winq.checkpoint import load_checkpoint
    from winq.evaluate import eval_ids, perplexity

    net, tok, _ = load_checkpoint(ck)
    ref = perplexity(net, eval_ids(tok, "ptb", "test", EVAL), seq_len=c["seq_len"])
    assert ref.ppl == pytest.approx(c["ppl_reference"], rel=1e-9)


def test_llamacpp_reads_q6_k_embeddings(keep_exports):
    """llama.cpp's own Q6_K reader on winq's bytes: the logits of the model whose embedding is the dequantized
    Q6_K table (what verify measured) within llama.cpp's usual activation-rounding tolerance."""
    need("llama_cpp")
    from gguf import GGUFReader

    from test_gguf import _ppl
    from tinymodels import synthetic_text
    from transformers import AutoTokenizer

    from winq.checkpoint import load_checkpoint
    from winq.runtime.llamacpp import load_llamacpp

    ck, res = keep_exports[("tied", "q6_k")]
    net, _, _ = load_checkpoint(ck)
    t = {x.name: x for x in GGUFReader(str(res.out)).tensors}["token_embd.weight"]
    emb = G.decode_float(np.asarray(t.data), "q6_k", tuple(net.model.embed_tokens.weight.shape))
    with torch.no_grad():  # tied: the head reads the same Q6_K table; norms are F32, the rest exact
        net.model.embed_tokens.weight.copy_(torch.from_numpy(emb))
    tok = AutoTokenizer.from_pretrained(str(ck))
    ids = torch.tensor(tok(synthetic_text(60, seed=5))["input_ids"][:200])
    with torch.no_grad():
        ref = net(input_ids=ids[None]).logits[0]
    got = load_llamacpp(res.out, threads=2, n_ctx=256)(ids)
    assert float((got - ref).abs().max()) < 0.1
    assert abs(_ppl(got, ids) / _ppl(ref, ids) - 1) < 5e-3


def test_gguf_keep_refusals_name_the_valid_choices(bases, tmp_path):
    ck = make_checkpoint(bases[96], tmp_path / "ck", "lsq", 4, -1)
    out = tmp_path / "e" / "model.gguf"
    with pytest.raises(ConfigError, match=r"--keep q6_k stores rows in blocks of 256, but model.embed_tokens.weight "
                                          r"has rows of 96: choose one of f16, f32, q8_0$"):
        export("gguf", ck, out, keep="q6_k")
    with pytest.raises(ConfigError, match="choose one of auto, f16, f32, q8_0, q6_k"):
        export("gguf", ck, out, keep="q4_0")
    with pytest.raises(ConfigError, match="keep_eval_tokens=-2"):
        export("gguf", ck, out, keep_eval_tokens=-2)
    assert not out.exists() and not (tmp_path / "e" / "winq-export.json").exists()
    assert not (tmp_path / "e").exists()  # refused before anything is made, even the folder
    assert G.keeps_for(48) == ("f16", "f32")
    ck48 = make_checkpoint(bases[48], tmp_path / "ck48", "lsq", 4, 16)
    with pytest.raises(ConfigError, match="rows of 48: choose one of f16, f32$"):
        export("gguf", ck48, tmp_path / "e48" / "model.gguf", keep="q8_0")
    assert not (tmp_path / "e48").exists()


def test_gguf_keep_eval_off_and_f16_on_request(bases, tmp_path):
    ck = make_checkpoint(bases[256], tmp_path / "ck", "lsq", 4, -1)
    res = quiet_export("gguf", ck, tmp_path / "a" / "model.gguf", keep="q8_0", keep_eval_tokens=0)
    pt = res.manifest["info"]["post_training"]
    assert pt["exact"] is False and pt["ppl_cost"] is None and pt["ppl_cost_skipped"] == "keep_eval_tokens 0"
    assert any("not measured" in n for n in res.notes)
    res = quiet_export("gguf", ck, tmp_path / "b" / "model.gguf")  # default f16: nothing measured, nothing claimed
    assert "post_training" not in res.manifest["info"]
    res = quiet_export("gguf", ck, tmp_path / "c" / "model.gguf", keep_eval_tokens=EVAL)  # f16, measured on request
    pt = res.manifest["info"]["post_training"]
    assert pt["exact"] is False and pt["method"] == "float16 rounding" and pt["ppl_cost"]["tokens"] == EVAL - 1
    assert abs(pt["ppl_cost"]["relative"]) < 1e-3


# ---------------------------------------------------------------------------------------------
# ONNX


def _session_logits(folder, ids):
    from winq.formats.onnx import OrtDecoder

    return torch.from_numpy(OrtDecoder(folder, accuracy_level=0).decode(ids, n_prefill=len(ids) - 4))


@pytest.mark.parametrize("keep_head", ["int8", "int4"])
@pytest.mark.parametrize("tag", [48, "untied48"])
def test_onnx_keep_head(bases, tmp_path, keep_head, tag):
    need("onnxruntime")
    import onnx

    from winq.checkpoint import load_checkpoint
    from winq.formats.onnx import read_nbits

    ck = make_checkpoint(bases[tag], tmp_path / "ck", "lsq", 4, 16)
    res = quiet_export("onnx", ck, tmp_path / "o", block_size=16, keep_head=keep_head, keep_eval_tokens=EVAL)
    m = res.manifest
    assert m["summary"]["max_abs_err"] == 0.0 and m["summary"]["tensors"] == 14  # the head is not a trained layer
    pt = m["info"]["post_training"]
    assert pt["exact"] is False and pt["tensors"][0]["readback_max_abs_err"] == 0.0
    assert 0 < pt["tensors"][0]["max_abs_err"] < 0.05 and pt["ppl_cost"]["tokens"] == EVAL - 1
    assert any("NOT exact" in n for n in res.notes)
    g = onnx.load(str(res.out / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in g.node]
    shapes = [tuple(t.dims) for t in g.initializer]
    V, H = 320, 48
    tied = tag == 48
    assert ops.count("MatMulNBits") == 15
    assert ("GatherBlockQuantized" in ops) == tied
    assert ((V, H) in shapes) == (not tied) and (H, V) not in shapes  # a tied table is stored once, quantized
    layers, attrs = read_nbits(res.out)
    assert attrs["lm_head"]["bits"] == (8 if keep_head == "int8" else 4)
    # onnxruntime computes the fake-quant model with the rounded head (and, tied, the rounded embedding)
    net, _, _ = load_checkpoint(ck)
    with torch.no_grad():
        net.lm_head.weight.data = layers["lm_head"].dequantize()  # tied: the embedding is this parameter too
        ids = torch.randint(0, V, (20,), generator=torch.Generator().manual_seed(3))
        ref = net(input_ids=ids[None]).logits[0]
    assert float((_session_logits(res.out, ids) - ref).abs().max()) <= 1e-5


def test_onnx_quantized_head_exact_and_embedding_stays_float(bases, tmp_path):
    need("onnxruntime")
    import onnx

    from winq.checkpoint import load_checkpoint

    ck = make_checkpoint(bases[48], tmp_path / "ck", "lsq", 4, 16, quantize_lm_head=True)
    res = quiet_export("onnx", ck, tmp_path / "o", block_size=16)
    assert res.manifest["summary"]["max_abs_err"] == 0.0 and "post_training" not in res.manifest["info"]
    assert any(t["name"] == "lm_head" and t["max_abs_err"] == 0.0 for t in res.manifest["tensors"])
    g = onnx.load(str(res.out / "model.onnx"), load_external_data=False).graph
    assert (320, 48) in [tuple(t.dims) for t in g.initializer]  # the float embedding: its own table
    net, _, _ = load_checkpoint(ck)
    ids = torch.arange(3, 23)
    with torch.no_grad():
        ref = net(input_ids=ids[None]).logits[0]
    assert float((_session_logits(res.out, ids) - ref).abs().max()) <= 1e-5


def test_onnx_keep_head_refusals(bases, tmp_path):
    need("onnxruntime")
    ck = make_checkpoint(bases[48], tmp_path / "ck", "lsq", 4, 16, quantize_lm_head=True)
    with pytest.raises(ConfigError, match="trained quantized .* leave --keep-head float"):
        export("onnx", ck, tmp_path / "o1", block_size=16, keep_head="int8")
    ck2 = make_checkpoint(bases[48], tmp_path / "ck2", "lsq", 4, -1)
    with pytest.raises(ConfigError, match="hidden size 48 to be a multiple of block_size=32: choose block_size one "
                                          "of 16$"):
        export("onnx", ck2, tmp_path / "o2", keep_head="int4")
    with pytest.raises(ConfigError, match="choose one of float, int8, int4"):
        export("onnx", ck2, tmp_path / "o3", keep_head="int2")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("o")]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_onnx_keep_head_without_measurement(bases, tmp_path):
    need("onnxruntime")
    ck = make_checkpoint(bases[48], tmp_path / "ck", "lsq", 4, 16)
    res = quiet_export("onnx", ck, tmp_path / "o", block_size=16, keep_head="int8", keep_eval_tokens=0)
    pt = res.manifest["info"]["post_training"]
    assert pt["exact"] is False and pt["ppl_cost"] is None and res.manifest["info"]["ort_check"]


def test_rtn_head_is_symmetric_round_to_nearest():
    from winq.exporters.onnx import rtn_head

    w = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    w[1] = 0
    for bits in (4, 8):
        qw = rtn_head(w, bits, 32)
        assert qw.grid == "lsq" and qw.bits == bits and qw.group_size == 32
        deq = qw.dequantize()
        s = qw.scale.float().repeat_interleave(32, dim=1)
        assert (deq - w).abs().le(s / 2 + 1e-7).all()
        assert torch.equal(deq[1], torch.zeros(64))
        assert int(qw.codes.max()) <= 2**bits - 1
    assert winq.QuantizedWeight is type(qw)
