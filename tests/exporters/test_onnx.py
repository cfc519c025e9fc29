"""ONNX export: the MatMulNBits mapping of every grid (bit for bit), onnxruntime running the
written graphs against the fake-quant model (prefill and KV-cache decode), refusals and
atomic writes. Needs `pip install "winq[onnx]"` (onnx + onnxruntime).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("onnx", reason='the ONNX export tests need onnx: pip install "winq[onnx]"')
pytest.importorskip("onnxruntime", reason='the ONNX export tests need onnxruntime: pip install "winq[onnx]"')

import winq  # noqa: E402
from winq.errors import CheckpointError, ConfigError  # noqa: E402
from winq.exporters import ExportError, ExportWarning, export, formats, get_exporter  # noqa: E402
from winq.formats.onnx import (  # noqa: E402
    BLOCK_SIZES, CONTAINERS, DATA_FILE, METADATA_KEY, MODEL_FILE, NBitsWeight, OrtDecoder, container_for, default_zero,
    map_weight, pack_codes, read_nbits, save_model,
)
from winq.qweight import QuantizedWeight  # noqa: E402
from test_gptq import random_qweight  # noqa: E402  (the same random QuantizedWeight for every format test)

KINDS = sorted(CONTAINERS)  # every (grid, bits) winq trains


def session_logits(folder, ids: torch.Tensor, n_prefill: int | None = None, accuracy_level: int | None = None):
    """onnxruntime's logits of ids: a prefill of n_prefill tokens (all by default), then one token at a time."""
    return torch.from_numpy(OrtDecoder(folder, accuracy_level=accuracy_level).decode(ids, n_prefill))


# ---------------------------------------------------------------------------------------------
# helpers: tiny seeded checkpoints with jittered scales (arbitrary float16 values, as training leaves them)


def make_base(path: Path, arch: str, seed: int = 0) -> Path:
    from tinymodels import make_model_dir

    # hidden 48 (4 heads of 12, 2 kv heads -> k/v out 24), mlp 80: in_features 48 and 80 are not multiples of 32
    return make_model_dir(path, arch, seed=seed, hidden=48, inter=80)


def make_checkpoint(base: Path, out: Path, grid: str, bits: int, group: int, **qkw) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from winq.checkpoint import save_checkpoint

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(base))
    cfg = winq.QuantConfig(bits=bits, grid=grid, group_size=group, **{"embed": "float", **qkw})
    winq.prepare(model, cfg)
    g = torch.Generator().manual_seed(bits * 100 + max(group, 0))
    with torch.no_grad():
        for m in winq.quant_layers(model).values():
            m.alpha.mul_(1 + 0.2 * torch.rand(m.alpha.shape, generator=g))
            if m.zero_point is not None:
                m.zero_point.copy_(torch.randint(0, 2**bits, m.zero_point.shape, generator=g))
    return save_checkpoint(out, model, tok, cfg, None)


def fake_quant(ck: Path):
    from winq.checkpoint import load_checkpoint

    net, _, _ = load_checkpoint(ck)
    return net


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx-bases")
    return {"llama": make_base(root / "llama", "llama", 0), "qwen2": make_base(root / "qwen2", "qwen2", 3)}


# ---------------------------------------------------------------------------------------------
# the mapping: exact for every grid, independent of onnxruntime


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    two_bit=st.sampled_from(["container", "float-zp"]),
    out=st.integers(1, 9),
    k_blocks=st.integers(1, 5),
    k_tail=st.integers(0, 15),
    per_row=st.booleans(),
    bs=st.sampled_from(BLOCK_SIZES[:3]),
    seed=st.integers(0, 2**16),
)
def test_map_dequantize_exact_for_every_grid(kind, two_bit, out, k_blocks, k_tail, per_row, bs, seed):
    grid, bits = kind
    if per_row:
        inf, group = 16 * k_blocks + k_tail, -1  # any K: the last block is padded
    else:
        inf, group = bs * k_blocks, bs * (2 if k_blocks % 2 == 0 else 1)
    qw = random_qweight(grid, bits, out, inf, group, seed)
    L = map_weight("l", qw, bs, two_bit)
    c = container_for(grid, bits, two_bit)
    kb = -(-inf // bs)
    assert L.bits == c.bits in (2, 4, 8) and (L.N, L.K, L.block_size) == (out, inf, bs)
    assert L.B.dtype == torch.uint8 and tuple(L.B.shape) == (out, kb, bs * c.bits // 8)
    assert L.scales.dtype == torch.float32 and tuple(L.scales.shape) == (out, kb)
    if c.float_zero:
        assert L.zero_points.dtype == torch.float32 and tuple(L.zero_points.shape) == (out, kb)
    elif L.zero_points is not None:
        assert grid == "affine" and L.zero_points.dtype == torch.uint8
        assert tuple(L.zero_points.shape) == (out, -(-kb * c.bits // 8))
    else:
        assert grid != "affine" or bool((qw.zero * c.mul + c.add == default_zero(c.bits)).all())
    assert torch.equal(L.dequantize(), qw.dequantize())  # atol 0
    # padded inputs hold the zero code: they dequantize to 0 (float zero points excepted)
    if not c.float_zero and inf % bs:
        full = (L.B.to(torch.int32)[..., None] >> (torch.arange(8 // c.bits) * c.bits)) & (2**c.bits - 1)
        pad = full.reshape(out, -1)[:, inf:].float()
        assert torch.equal(pad, L.zeros()[:, -1:].expand_as(pad))


def test_mapping_by_hand():
    codes = torch.tensor([[0, 1, 2, 3] * 8], dtype=torch.uint8).repeat(2, 1)  # (2, 32)
    s = torch.full((2, 1), 0.375, dtype=torch.float16)
    # seq: levels -1.5..1.5 (z 1.5) -> q' = 2q + 5 in {5, 7, 9, 11} around the default zp 8, s' = s/2
    L = map_weight("seq", QuantizedWeight(codes, s, torch.full((2, 1), 1.5), "seq", 2, 32), 32)
    assert L.bits == 4 and L.zero_points is None and L.codes()[0, :4].tolist() == [5, 7, 9, 11]
    assert L.scales.unique().tolist() == [0.1875]
    # byte j holds inputs 2j (low nibble) and 2j+1 (high nibble): 5 | 7 << 4, 9 | 11 << 4
    assert L.B[0, 0, :2].tolist() == [0x75, 0xB9]
    # seq with a float zero point: 2-bit codes as they are, four to a byte, lowest bits first
    L = map_weight("seq", QuantizedWeight(codes, s, torch.full((2, 1), 1.5), "seq", 2, 32), 32, "float-zp")
    assert L.bits == 2 and L.zero_points.unique().tolist() == [1.5] and L.B[0, 0,
                                                                            0].item() == 0 | 1 << 2 | 2 << 4 | 3 << 6
    # ternary q in {0, 1, 2}, z 1 -> q' = q + 1 around the default zp 2
    L = map_weight("t", QuantizedWeight(codes % 3, s, torch.ones(2, 1), "ternary", 2, 32), 16)
    assert L.bits == 2 and L.zero_points is None and L.codes()[0, :3].tolist() == [1, 2, 3]
    # binary q in {0, 1}, z 0.5 -> q' = 2q + 1 in {1, 3} around 2, s' = s/2
    L = map_weight("b", QuantizedWeight(codes % 2, s, torch.full((2, 1), 0.5), "binary", 1, 32), 16)
    assert L.bits == 2 and L.zero_points is None and set(L.codes().unique().tolist()) == {1, 3}
    # lsq3 q in 0..7, z 4 -> q' = q + 4 around 8 (MatMulNBits has no 3 bits)
    c7 = torch.arange(32, dtype=torch.uint8).remainder(8)[None].repeat(2, 1)
    L = map_weight("l3", QuantizedWeight(c7, s, torch.full((2, 1), 4.0), "lsq", 3, 32), 32)
    assert L.bits == 4 and L.zero_points is None and L.codes()[0, :8].tolist() == list(range(4, 12))
    # affine 4-bit with learned zeros 3 and 12 per row: uint8 zero points packed two per byte
    z = torch.tensor([[3.0, 12.0], [5.0, 0.0]])
    L = map_weight("a", QuantizedWeight(codes, torch.ones(2, 2, dtype=torch.float16), z, "affine", 4, 16), 16)
    assert L.zero_points.tolist() == [[3 | 12 << 4], [5]]
    for w in (codes, c7):
        assert pack_codes(w[:, :8], 4)[0].tolist() == [int(w[0, 2 * j]) | int(w[0, 2 * j + 1]) << 4 for j in range(4)]


def test_block_must_lie_inside_a_group():
    qw = random_qweight("lsq", 4, 4, 96, 48, 0)  # groups of 48: only block size 16 keeps blocks inside groups
    assert torch.equal(map_weight("x", qw, 16).dequantize(), qw.dequantize())
    with pytest.raises(ConfigError, match=r"layers\.3\.q: group_size=48 is not a multiple of "
                                          r"block_size=32.*block_size one of 16$"):
        map_weight("layers.3.q", qw, 32)
    qw = random_qweight("lsq", 4, 4, 24, 8, 0)
    with pytest.raises(ConfigError, match="no MatMulNBits block size .* divides it"):
        map_weight("y", qw, 16)


def test_options_and_registry():
    assert "onnx" in formats()
    ex = get_exporter("onnx")
    assert ex.options() == ex.options(block_size=32, accuracy_level=0, two_bit="container")
    for bad, match in [
        (dict(block_size=24), r"block_size=24: .*16, 32, 64, 128, 256"),
        (dict(block_size=512), r"block_size=512"),
        (dict(block_size="32"), r"block_size='32'"),
        (dict(accuracy_level=2), r"accuracy_level=2: choose 0 .* or 4"),
        (dict(accuracy_level=True), r"accuracy_level=True"),
        (dict(two_bit="fp"), r"two_bit='fp': choose container .* or float-zp"),
        (dict(bits=4), r"unknown option bits; options are block_size, accuracy_level, two_bit"),
    ]:
        with pytest.raises(ConfigError, match=match):
            ex.options(**bad)


# ---------------------------------------------------------------------------------------------
# MatMulNBits alone in onnxruntime: our bytes mean what we think (odd K, every mapping, level 0)


def _single_op_model(L: NBitsWeight, accuracy_level: int = 0):
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(L.B.numpy(), "B"), numpy_helper.from_array(L.scales.numpy(), "s")]
    inputs = ["A", "B", "s"]
    if L.zero_points is not None:
        inits.append(numpy_helper.from_array(L.zero_points.numpy(), "zp"))
        inputs.append("zp")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=L.K, N=L.N, bits=L.bits,
                            block_size=L.block_size, accuracy_level=accuracy_level)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", L.K])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", L.N])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("kind", KINDS + [("seq", 2, "float-zp")], ids=lambda k: "".join(map(str, k)))
@pytest.mark.parametrize("inf,group,bs", [(100, -1, 32), (40, -1, 64), (96, 32, 16), (256, 128, 128)])
def test_onnxruntime_runs_our_bytes(kind, inf, group, bs):
    import onnxruntime as ort

    grid, bits, *two = kind
    qw = random_qweight(grid, bits, 24, inf, group, inf + bs)
    L = map_weight("w", qw, bs, two[0] if two else "container")
    sess = ort.InferenceSession(_single_op_model(L).SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(5, inf, generator=torch.Generator().manual_seed(1))  # odd M
    y = torch.from_numpy(sess.run(None, {"A": x.numpy()})[0])
    ref = x.double() @ qw.dequantize().double().T
    assert float((y.double() - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))


# ---------------------------------------------------------------------------------------------
# whole exports: manifest, files, onnxruntime against fake-quant (prefill + KV-cache decode)

# (arch, grid, bits, group, options)
CASES = [
    ("llama", "lsq", 4, -1, {}),  # per row, K 48 / 80 padded to whole 32-blocks
    ("llama", "lsq", 4, 16, {"block_size": 16}),
    ("qwen2", "lsq", 4, 16, {"block_size": 16, "accuracy_level": 4}),  # q/k/v biases; level 4 written
    ("llama", "lsq", 3, -1, {"block_size": 64}),  # 4-bit container
    ("qwen2", "seq", 2, 16, {"block_size": 16}),  # 4-bit container
    ("llama", "seq", 2, -1, {"two_bit": "float-zp", "block_size": 128}),  # 2-bit, float zp
    ("llama", "ternary", 2, -1, {}),
    ("qwen2", "binary", 1, -1, {"block_size": 16}),
    ("llama", "lsq", 8, 16, {"block_size": 16}),
    ("qwen2", "affine", 4, -1, {}),  # uint8 zero points
    ("llama", "affine", 2, 16, {"block_size": 16}),
    ("llama", "affine", 3, -1, {"block_size": 256}),  # 4-bit container, one padded block per row
]


@pytest.fixture(scope="module")
def exports(bases, tmp_path_factory):
    """{case id: (checkpoint, export result)} for CASES (exported once, checked by several tests)."""
    import warnings

    root = tmp_path_factory.mktemp("onnx-exports")
    out = {}
    for i, (arch, grid, bits, group, opts) in enumerate(CASES):
        ck = make_checkpoint(bases[arch], root / f"ck{i}", grid, bits, group)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExportWarning)
            out[i] = (ck, export("onnx", ck, root / f"onnx{i}", **opts))
    return out


def case_id(c):
    arch, grid, bits, group, opts = c
    return f"{arch}-{grid}{bits}-g{group}-" + "-".join(f"{k}={v}" for k, v in opts.items())


@pytest.mark.parametrize("i", range(len(CASES)), ids=[case_id(c) for c in CASES])
def test_export_exact_and_runs(exports, i):
    arch, grid, bits, group, opts = CASES[i]
    ck, res = exports[i]
    m = res.manifest
    assert m["format"] == "onnx" and m["summary"]["tensors"] == 14 and m["summary"]["max_abs_err"] == 0.0
    assert all(r["max_abs_err"] == 0.0 for r in m["tensors"])
    c = container_for(grid, bits, opts.get("two_bit", "container"))
    r = m["tensors"][0]
    assert r["container_bits"] == c.bits and r["grid"] == grid and r["bits"] == bits
    assert m["info"]["ort_check"]["max_abs_logit_diff"] <= 1e-5
    # onnxruntime at accuracy level 0 against the fake-quant model: a prefill, then 6 decode steps
    net = fake_quant(ck)
    ids = torch.randint(0, net.config.vocab_size, (24,), generator=torch.Generator().manual_seed(i))
    with torch.no_grad():
        ref = net(input_ids=ids[None]).logits[0]
    got = session_logits(res.out, ids, n_prefill=18, accuracy_level=0)
    assert float((got - ref).abs().max()) <= 1e-5
    # every layer's bytes read back from the file equal the trained quantizer bit for bit
    layers, attrs = read_nbits(res.out)
    for n, qw in winq.quantized_weights(net).items():
        assert torch.equal(layers[n].dequantize(), qw.dequantize()), n
        assert attrs[n]["accuracy_level"] == opts.get("accuracy_level", 0)
        assert attrs[n]["block_size"] == opts.get("block_size", 32)


def test_accuracy_level_4_is_close_not_exact(exports):
    """Level 4 quantizes activations to int8: reported separately, never mistaken for level 0."""
    i = 2  # written with accuracy_level=4
    ck, res = exports[i]
    net = fake_quant(ck)
    ids = torch.randint(0, net.config.vocab_size, (24,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = net(input_ids=ids[None]).logits[0]
    as_written = session_logits(res.out, ids)
    exact = session_logits(res.out, ids, accuracy_level=0)
    d4 = float((as_written - ref).abs().max())
    assert float((exact - ref).abs().max()) <= 1e-5
    assert 1e-6 < d4 < 0.05 * float(ref.abs().max()), d4
    assert res.manifest["info"]["ort_check"]["accuracy_level"] == 0  # verify always runs the exact level


def test_files_metadata_and_tied_embedding(exports):
    import onnx

    ck, res = exports[0]
    out = res.out
    names = {p.name for p in out.iterdir()}
    assert names == {MODEL_FILE, DATA_FILE, "winq-export.json", "winq.json", "config.json", "genai_config.json",
                     "tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    assert (out / "winq.json").read_text() == (ck / "winq.json").read_text()
    assert (out / DATA_FILE).stat().st_mode & 0o044  # readable like the other files
    m = onnx.load(str(out / MODEL_FILE), load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}
    settings_ = json.loads(meta[METADATA_KEY])
    assert settings_["options"] == {"block_size": 32, "accuracy_level": 0, "two_bit": "container", "keep_head": "float",
                                    "keep_eval_tokens": -1, "keep_eval_data": "ptb"}
    assert settings_["quant"] == json.loads((ck / "winq.json").read_text())["quant"]
    assert [i.name for i in m.graph.input][:4] == ["input_ids", "attention_mask", "position_ids",
                                                   "past_key_values.0.key"]
    assert [o.name for o in m.graph.output][:2] == ["logits", "present.0.key"]
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("MatMulNBits") == 14
    # the tied lm_head reads the embedding through a Transpose: one (vocab, hidden) tensor, no (hidden, vocab) copy
    shapes = [tuple(t.dims) for t in m.graph.initializer]
    V, H = 320, 48
    assert (V, H) in shapes and (H, V) not in shapes
    # no quantized layer's float weight is left in the file
    assert not [t.name for t in m.graph.initializer if t.name.endswith(".weight_t")]
    # records: bytes = codes + scales (+ zero points); per-row K=48 in 32-blocks pads to 64 codes per row
    r = next(r for r in res.manifest["tensors"] if r["name"] == "model.layers.0.self_attn.q_proj")
    assert r["shape"] == [48, 48] and r["bytes"] == 48 * (64 // 2 + 2 * 4)
    assert r["bits_per_weight"] == pytest.approx(8 * r["bytes"] / (48 * 48), abs=1e-4)
    gc = json.loads((out / "genai_config.json").read_text())["model"]
    assert gc["type"] == "llama" and gc["decoder"]["num_key_value_heads"] == 2 and gc["decoder"]["head_size"] == 12


def test_quantized_lm_head(bases, tmp_path):
    ck = make_checkpoint(bases["llama"], tmp_path / "ck", "lsq", 4, 16, quantize_lm_head=True)
    res = export("onnx", ck, tmp_path / "o", block_size=16)
    assert res.manifest["summary"]["tensors"] == 15 and res.manifest["summary"]["max_abs_err"] == 0.0
    layers, _ = read_nbits(res.out)
    assert "lm_head" in layers
    net = fake_quant(ck)
    ids = torch.arange(3, 19)
    with torch.no_grad():
        ref = net(input_ids=ids[None]).logits[0]
    assert float((session_logits(res.out, ids) - ref).abs().max()) <= 1e-5


# ---------------------------------------------------------------------------------------------
# refusals and interruptions leave nothing


def _debris(path: Path) -> list[str]:
    return [p.name for p in path.iterdir() if p.name.startswith(".")]


def test_refusals_leave_nothing(bases, tmp_path):
    ck = make_checkpoint(bases["llama"], tmp_path / "ck", "lsq", 4, 16)
    with pytest.raises(ConfigError, match="group_size=16 is not a multiple of block_size=32.*block_size one of 16"):
        export("onnx", ck, tmp_path / "o1")  # the default block size 32 straddles groups of 16
    with pytest.raises(ConfigError, match="block_size=48"):
        export("onnx", ck, tmp_path / "o1", block_size=48)
    with pytest.raises(ConfigError, match="unknown option strict"):
        export("onnx", ck, tmp_path / "o1", strict=True)
    with pytest.raises(CheckpointError, match="not found"):
        export("onnx", tmp_path / "nope", tmp_path / "o1", block_size=16)
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="not a winq export"):
        export("onnx", ck, tmp_path / "o2", block_size=16)
    assert not (tmp_path / "o1").exists() and (tmp_path / "o2" / "keep.txt").read_text() == "x"
    assert not _debris(tmp_path)


def test_interrupted_or_unverified_export_leaves_nothing(bases, tmp_path, monkeypatch):
    import onnx

    import winq.exporters.onnx as mod

    ck = make_checkpoint(bases["llama"], tmp_path / "ck", "lsq", 4, -1)
    # an interruption in the middle of the graph surgery (after the trace)
    real = mod.replace_matmuls

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, "replace_matmuls", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export("onnx", ck, tmp_path / "o")
    assert not (tmp_path / "o").exists() and not _debris(tmp_path)
    monkeypatch.setattr(mod, "replace_matmuls", real)

    # weights that do not read back: one code flipped in the written file
    real_write = mod.ONNXExporter.write

    def corrupt_codes(self, folder, *a):
        w = real_write(self, folder, *a)
        m = onnx.load(str(folder / MODEL_FILE))
        t = next(t for t in m.graph.initializer if t.name == "model.layers.1.mlp.up_proj.qweight")
        arr = onnx.numpy_helper.to_array(t).copy()
        arr[0, 0, 0] ^= 0x01
        t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
        save_model(m, folder)
        return w

    monkeypatch.setattr(mod.ONNXExporter, "write", corrupt_codes)
    with pytest.raises(ExportError, match=r"1 tensors differ .*model\.layers\.1\.mlp\.up_proj"):
        export("onnx", ck, tmp_path / "o")
    assert not (tmp_path / "o").exists() and not _debris(tmp_path)

    # exact weights but a graph that computes something else (a norm weight changed): onnxruntime's check refuses
    def corrupt_graph(self, folder, *a):
        w = real_write(self, folder, *a)
        m = onnx.load(str(folder / MODEL_FILE))
        t = next(t for t in m.graph.initializer if t.name.endswith("layers.0.input_layernorm.weight"))
        arr = onnx.numpy_helper.to_array(t).copy() * 1.01
        t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
        save_model(m, folder)
        return w

    monkeypatch.setattr(mod.ONNXExporter, "write", corrupt_graph)
    with pytest.raises(ExportError, match="onnxruntime's logits differ from the fake-quant model's"):
        export("onnx", ck, tmp_path / "o")
    assert not (tmp_path / "o").exists() and not _debris(tmp_path)

    monkeypatch.setattr(mod.ONNXExporter, "write", real_write)
    res = export("onnx", ck, tmp_path / "o")
    before = (res.out / DATA_FILE).read_bytes()
    with pytest.raises(ExportError, match="already holds an export: pass --overwrite"):
        export("onnx", ck, tmp_path / "o")
    monkeypatch.setattr(mod.ONNXExporter, "write", corrupt_graph)
    with pytest.raises(ExportError):
        export("onnx", ck, tmp_path / "o", overwrite=True)
    assert (res.out / DATA_FILE).read_bytes() == before  # the previous export is untouched
    assert not _debris(tmp_path)


def test_notes_name_the_containers(bases, tmp_path):
    ck = make_checkpoint(bases["llama"], tmp_path / "ck", "seq", 2, -1)
    with pytest.warns(ExportWarning, match=r"seq 2-bit weights are stored in the exact 4-bit container .* q' = 2q \+ "
                                           r"5"):
        export("onnx", ck, tmp_path / "a")
    with pytest.warns(ExportWarning, match="float32 zero point 1.5: exact, but onnxruntime runs float zero points on "
                                           "its slow path"):
        res = export("onnx", ck, tmp_path / "b", two_bit="float-zp")
    assert res.manifest["tensors"][0]["container"] == "2-bit codes, float32 zero point 1.5 (onnxruntime's slow path)"


def test_imports_stay_light():
    import subprocess

    code = (
        "import sys, winq, winq.exporters, winq.exporters.onnx, winq.runtime, winq.runtime.ort\n"
        "winq.exporters.get_exporter('onnx').options(block_size=64)\n"
        "heavy = [m for m in ('onnx', 'onnxruntime', 'onnxscript', 'onnxruntime_genai') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# the default model (slow): 210 layers, 576-wide rows


@pytest.mark.slow
def test_default_model_exports_exactly(tmp_path, user_cache):
    from tinymodels import default_checkpoint
    from winq.evaluate import eval_ids
    from winq.runtime.compare import compare, model_logits_fn
    from winq.runtime.ort import load_ort

    torch.set_num_threads(2)
    ck, net, tok = default_checkpoint(tmp_path / "ck", bits=4, group_size=64)
    res = export("onnx", ck, tmp_path / "onnx", model=(net, tok, json.loads((ck / "winq.json").read_text())))
    assert res.manifest["summary"]["tensors"] == 210 and res.manifest["summary"]["max_abs_err"] == 0.0
    ids = eval_ids(tok, "ptb", "test", 384)
    r = compare({"fakequant": model_logits_fn(net), "ort": load_ort(res.out, threads=2, accuracy_level=0)}, ids,
                seq_len=128)
    fq, ort = r["results"]["fakequant"], r["results"]["ort"]
    assert fq["tokens"] == ort["tokens"] > 300
    assert abs(ort["ppl_rel_diff"]) < 1e-5 and ort["kl"] < 1e-8 and ort["top1_agreement"] >= 0.995, r
