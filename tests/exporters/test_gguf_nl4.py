"""The nl4 grid in the formats: IQ4_NL blocks against gguf-py's dequantizer (read-back error 0), the type
choice, the whole GGUF export of a tiny Llama and llama.cpp running it, and the refusals of the formats that
store only uniform levels (GPTQ, ONNX MatMulNBits) naming the one that holds nl4 (GGUF).

The llama.cpp test needs `pip install "winq[llamacpp]"` and skips with that reason otherwise.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from winq.errors import ConfigError, FormatError
from winq.exporters import export
from winq.formats import gguf as G
from winq.formats import gptq, onnx
from winq.formats.containers import remap

from test_gguf import check_llamacpp_matches_fake_quant, need_llamacpp
from test_gptq import make_checkpoint, random_qweight

KV = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)


def test_iq4_nl_blocks_match_gguf_dequantizer():
    rng = np.random.default_rng(0)
    rows, cols = 5, 32 * 7
    q = rng.integers(0, 16, size=(rows, cols)).astype(np.uint8)
    d = (rng.uniform(1e-4, 0.3, size=(rows, cols // 32)) * rng.choice([-1, 1], size=(rows, cols // 32))
         ).astype(np.float16)
    d[0, 0] = np.float16(2.0**-24 * 3)  # a subnormal
    blocks = G.IQ4_NL.pack(q, d)
    assert blocks.shape == (rows, cols // 32 * 18) and blocks.dtype == np.uint8
    want = np.repeat(d.astype(np.float32), 32, axis=1) * KV[q]
    np.testing.assert_array_equal(G.IQ4_NL.decode(blocks, (rows, cols)), want)
    # the layout by hand: fp16 d little-endian, then byte i = q[i] | q[i + 16] << 4
    b = blocks[0, :18]
    assert b[:2].tobytes() == d[0, :1].tobytes()
    assert all(int(b[2 + i]) == int(q[0, i]) | int(q[0, i + 16]) << 4 for i in range(16))
    assert G.IQ4_NL.bits_per_weight() == 4.5 and G.IQ4_NL.block() == 32


def test_nl4_goes_to_iq4_nl_exactly_and_nowhere_it_would_not_be():
    qw = random_qweight("nl4", 4, 8, 96, 32, seed=1)
    ref = qw.dequantize().numpy()
    enc, note = G.choose(qw, "auto", "layer")
    assert (enc.type, enc.container, note) == ("iq4_nl", "native", None)
    assert np.abs(G.TYPES["iq4_nl"].decode(enc.blocks, qw.shape) - ref).max() == 0.0
    enc, note = G.choose(qw, "q8_0", "layer")  # the wider exact container: the int8 levels, d = s
    assert enc.type == "q8_0" and "kvalues" in enc.container and note is None
    assert np.abs(G.TYPES["q8_0"].decode(enc.blocks, qw.shape) - ref).max() == 0.0
    for t in ("q4_0", "q4_1", "q2_k", "q3_k", "tq1_0", "tq2_0"):
        assert not G.TYPES[t].can_hold("nl4", 4)
        with pytest.raises(ConfigError, match=rf"--type {t} cannot hold nl4 4-bit weights exactly.*iq4_nl, q8_0"):
            G.choose(qw, t, "layer")
    # IQ4_NL holds nothing but nl4 (its levels are not evenly spaced)
    assert [t for t in G.ORDER if G.TYPES[t].can_hold("nl4", 4)] == ["iq4_nl", "q8_0"]
    assert not any(G.TYPES["iq4_nl"].can_hold(g, b) for g, b in (("lsq", 4), ("affine", 4), ("seq", 2)))
    # permuting q/k rows keeps it exact
    p = G.permute_qw(qw, 2)
    assert np.abs(G.TYPES["iq4_nl"].decode(G.choose(p, "auto", "l")[0].blocks, p.shape)
                  - p.dequantize().numpy()).max() == 0.0


def test_uniform_containers_refuse_nl4():
    qw = random_qweight("nl4", 4, 4, 64, 32, seed=2)
    with pytest.raises(FormatError, match=r"l: .*cannot hold grid 'nl4'.*--format gguf"):
        remap(qw, 1, 0, "l", 0, 15)
    with pytest.raises(ConfigError, match=r"GPTQ cannot hold grid 'nl4'.*IQ4_NL.*--format gguf"):
        gptq.container_for("nl4", 4)
    with pytest.raises(ConfigError, match=r"MatMulNBits cannot hold grid 'nl4'.*IQ4_NL.*--format gguf"):
        onnx.container_for("nl4", 4)
    with pytest.raises(ConfigError, match=r"MatMulNBits cannot hold grid 'nl4'"):
        onnx.map_weight("l", qw, 32)


# ---------------------------------------------------------------------------------------------
# a whole checkpoint


@pytest.fixture(scope="module")
def nl4_export(tmp_path_factory):
    from tinymodels import make_model_dir

    root = tmp_path_factory.mktemp("nl4")
    base = make_model_dir(root / "llama256", "llama", seed=0, hidden=256, inter=512)
    ck = make_checkpoint(base, root / "ck", "nl4", 4, 32)
    res = export("gguf", ck, root / "gguf" / "model.gguf")
    return ck, res


def test_export_writes_iq4_nl_and_reads_back_exactly(nl4_export):
    from gguf import GGUFReader, LlamaFileType

    ck, res = nl4_export
    m = json.loads((res.out.parent / "winq-export.json").read_text())
    assert m["summary"]["max_abs_err"] == 0.0 and all(t["max_abs_err"] == 0.0 for t in m["tensors"])
    assert {t["container"] for t in m["tensors"]} == {"IQ4_NL: native"}
    assert {(t["grid"], t["bits"], t["group_size"], t["container_bits"]) for t in m["tensors"]} == {("nl4", 4, 32, 4)}
    assert {t["bits_per_weight"] for t in m["tensors"]} == {4.5}
    r = GGUFReader(str(res.out))
    quant = {t.name: t.tensor_type.name for t in r.tensors if t.name.startswith("blk.") and "norm" not in t.name}
    assert set(quant.values()) == {"IQ4_NL"} and len(quant) == 2 * 7
    fields = {f.name: f for f in r.fields.values()}
    assert int(fields["general.file_type"].parts[-1][0]) == LlamaFileType.MOSTLY_IQ4_NL
    meta = json.loads(bytes(fields["winq.export"].parts[-1]).decode())
    assert meta["winq"]["quant"]["grid"] == "nl4"


def test_inspect_shows_iq4_nl(nl4_export):
    from winq.runtime.inspection import inspect_gguf

    _, res = nl4_export
    info = inspect_gguf(res.out)
    assert info["totals"]["types"]["IQ4_NL"] == 14
    assert {row["bits"] for row in info["tensors"] if row["type"] == "IQ4_NL"} == {4}


@pytest.mark.parametrize("fmt,needle", [("onnx", "MatMulNBits cannot hold grid 'nl4'"),
                                        ("gptq", "GPTQ cannot hold grid 'nl4'")])
def test_gptq_and_onnx_refuse_nl4_naming_gguf(nl4_export, tmp_path, fmt, needle):
    ck, _ = nl4_export
    out = tmp_path / fmt
    with pytest.raises(ConfigError, match=needle + r".*--format gguf \(IQ4_NL, exact"):
        export(fmt, ck, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_llamacpp_runs_the_nl4_export_like_the_fake_quant_model(nl4_export):
    """IQ4_NL weights are bit-exact; llama.cpp rounds the activations to Q8_0 in front of them (as for Q4_0), so
    the logits are held to the thresholds of the Q4_0 exports (tests/exporters/test_gguf.py)."""
    need_llamacpp()
    ck, res = nl4_export
    check_llamacpp_matches_fake_quant(ck, res.out)
