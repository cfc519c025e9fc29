"""GPTQ export: exact mapping of every grid, refusals, atomic writes, and the real consumer
(transformers + optimum + gptqmodel) loading tiny seeded Llama models bit for bit.

The consumer tests need `pip install "winq[gptq]"` and skip with that reason otherwise.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import winq
from winq.errors import ConfigError, FormatError, MissingDependencyError
from winq.exporters import ExportError, ExportWarning, export, formats, get_exporter
from winq.formats.gptq import CONTAINERS, container_for, map_weight, pack_layer, unpack_layer
from winq.qweight import QuantizedWeight

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # gptqmodel's torch.compile would take 5-55 s per first forward

GPTQ_REASON = 'the GPTQ consumer tests need optimum + gptqmodel: pip install "winq[gptq]"'


def need_gptqmodel():
    pytest.importorskip("optimum", reason=GPTQ_REASON)
    pytest.importorskip("gptqmodel", reason=GPTQ_REASON)


# ---------------------------------------------------------------------------------------------
# fixtures: a tiny seeded Llama whose layer sizes suit every GPTQ bit width and group size
# (hidden 128, 4 heads of 32, 2 kv heads -> k/v out 64, mlp 256)


@pytest.fixture(scope="module")
def base128(tmp_path_factory) -> Path:
    from tinymodels import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("tiny128") / "llama", "llama", seed=0, hidden=128, inter=256)


def make_checkpoint(base: Path, out: Path, grid: str, bits: int, group: int, zero_to_zero: bool = False, **qkw) -> Path:
    """prepare() the base model, jitter its scales (arbitrary float16 values, as training leaves them), save."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from winq.checkpoint import save_checkpoint

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(base))
    cfg = winq.QuantConfig(bits=bits, grid=grid, group_size=group, **{"embed": "float", **qkw})
    winq.prepare(model, cfg)
    g = torch.Generator().manual_seed(bits * 1000 + group)
    with torch.no_grad():
        for m in winq.quant_layers(model).values():
            m.alpha.mul_(1 + 0.2 * torch.rand(m.alpha.shape, generator=g))
            if zero_to_zero and m.zero_point is not None:
                m.zero_point[0, 0] = 0.0  # an affine group whose learned zero is 0: not storable in v1
    return save_checkpoint(out, model, tok, cfg, None)


def fake_quant_reference(ck: Path, float_dtype: torch.dtype = torch.float16):
    """The fake-quant model with its float tensors rounded as the export stores them (the artifact's model)."""
    from winq.checkpoint import load_checkpoint

    net, _, _ = load_checkpoint(ck)
    qws = winq.quantized_weights(net)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if not any(n.startswith(q + ".") for q in qws):
                p.copy_(p.to(float_dtype).to(torch.float32))
    return net, qws


def random_qweight(grid: str, bits: int, out: int, inf: int, group: int, seed: int) -> QuantizedWeight:
    from winq.qlinear import QuantLinear

    torch.manual_seed(seed)
    lin = QuantLinear(inf, out, bias=False, grid=grid, bits=bits, group_size=group)
    with torch.no_grad():
        lin.weight.normal_()
        lin.init_scales()
        lin.alpha.mul_(torch.exp(torch.randn(lin.alpha.shape)))  # scales across many binades
        if lin.zero_point is not None:
            lin.zero_point.copy_(torch.randint(0, 2**bits, lin.zero_point.shape))
    return lin.quantized_weight()


# ---------------------------------------------------------------------------------------------
# the mapping itself: exact for every grid, independent of any consumer


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(sorted(CONTAINERS)),
    out_periods=st.integers(1, 3),
    in_periods=st.integers(1, 4),
    per_row=st.booleans(),
    fmt=st.sampled_from(["gptq", "gptq_v2"]),
    seed=st.integers(0, 2**16),
)
def test_pack_unpack_dequantize_exact_for_every_grid(kind, out_periods, in_periods, per_row, fmt, seed):
    grid, bits = kind
    out, inf = 32 * out_periods, 32 * in_periods
    qw = random_qweight(grid, bits, out, inf, -1 if per_row else 32, seed)
    layer = map_weight("l", qw)
    assert layer.bits == container_for(grid, bits).bits
    assert torch.equal(layer.dequantize(), qw.dequantize())
    if fmt == "gptq" and int(layer.zero.min()) < 1:
        with pytest.raises(ConfigError, match="gptq_v2"):
            pack_layer(layer, fmt)
        return
    t = pack_layer(layer, fmt)
    b = layer.bits
    assert t["qweight"].dtype == torch.int32 and tuple(t["qweight"].shape) == (inf * b // 32, out)
    assert t["qzeros"].dtype == torch.int32 and tuple(t["qzeros"].shape) == (qw.n_groups, out * b // 32)
    assert t["scales"].dtype == torch.float16 and tuple(t["scales"].shape) == (qw.n_groups, out)
    assert t["g_idx"].dtype == torch.int32 and torch.equal(t["g_idx"].long(), torch.arange(inf) // qw.group_size)
    back = unpack_layer(t, b, fmt)
    assert torch.equal(back.codes, layer.codes) and torch.equal(back.zero,
                                                                layer.zero) and torch.equal(back.scale, layer.scale)
    assert torch.equal(back.dequantize(), qw.dequantize())  # atol 0


def test_container_mapping_by_hand():
    # seq: levels -1.5..1.5 (q 0..3, z 1.5) -> q' = 2q + 1 in {1,3,5,7}, z' = 4, s' = s/2
    codes = torch.tensor([[0, 1, 2, 3] * 8], dtype=torch.uint8).repeat(32, 1)
    qw = QuantizedWeight(codes, torch.full((32, 1), 0.375, dtype=torch.float16), torch.full((32, 1), 1.5), "seq", 2, 32)
    layer = map_weight("seq", qw)
    assert layer.codes[0, :4].tolist() == [1, 3, 5, 7] and layer.zero.unique().tolist() == [4] and layer.bits == 3
    assert layer.scale.unique().tolist() == [0.1875]
    assert torch.equal(layer.dequantize(), qw.dequantize())
    # binary: q in {0,1}, z 0.5 -> q' in {0,2}, z' = 1, s' = s/2 (2-bit codes)
    qw = QuantizedWeight(codes % 2, torch.full((32, 1), 0.5, dtype=torch.float16), torch.full((32, 1), 0.5), "binary",
                         1, 32)
    layer = map_weight("bin", qw)
    assert set(layer.codes.unique().tolist()) == {0, 2} and layer.zero.unique().tolist() == [1] and layer.bits == 2
    assert torch.equal(layer.dequantize(), qw.dequantize())
    # lsq4 and ternary are native: z = 8 and z = 1
    assert container_for("lsq", 4).native and container_for("ternary", 2).native and not container_for("seq", 2).native


def test_halved_scale_must_be_exact_in_float16():
    codes = torch.zeros(32, 32, dtype=torch.uint8)
    zero = torch.full((32, 1), 1.5)
    even = torch.full((32, 1), 2.0**-24 * 6, dtype=torch.float16)  # subnormal with an even last bit: s/2 exact
    assert torch.equal(map_weight("ok", QuantizedWeight(codes, even, zero, "seq", 2, 32)).dequantize(),
                       QuantizedWeight(codes, even, zero, "seq", 2, 32).dequantize())
    odd = even.clone()
    odd[3, 0] = 2.0**-24 * 5  # s/2 = 2.5 * 2^-24 is not a float16
    with pytest.raises(FormatError, match=r"layers\.7\.q: 1 scales are float16 subnormals"):
        map_weight("layers.7.q", QuantizedWeight(codes, odd, zero, "seq", 2, 32))


# ---------------------------------------------------------------------------------------------
# export(): refusals, atomic writes, manifest


def test_registry():
    assert "gptq" in formats()
    assert get_exporter("gptq").name == "gptq"
    with pytest.raises(ConfigError, match=r"unknown export format 'gguff': choose one of .*gptq"):
        get_exporter("gguff")
    with pytest.raises(ConfigError, match="checkpoint_format='gptq_v3'"):
        get_exporter("gptq").options(checkpoint_format="gptq_v3")
    with pytest.raises(ConfigError, match="options are checkpoint_format, strict, float_dtype"):
        get_exporter("gptq").options(bits=3)


def test_manifest_and_files(base128, tmp_path):
    ck = make_checkpoint(base128, tmp_path / "ck", "lsq", 4, 32)
    res = export("gptq", ck, tmp_path / "out")
    out = res.out
    assert {p.name for p in out.iterdir()} >= {"config.json", "quantize_config.json", "model.safetensors",
                                               "winq-export.json",
                                                "tokenizer.json", "tokenizer_config.json"}
    m = json.loads((out / "winq-export.json").read_text())
    assert m["format"] == "gptq" and m["source"]["checkpoint"] == str(ck) and m["source"]["winq"]["quant"]["bits"] == 4
    assert m["summary"]["tensors"] == 14 and m["summary"]["max_abs_err"] == 0.0
    r = m["tensors"][0]
    assert r["name"] == "model.layers.0.self_attn.q_proj" and r["grid"] == "lsq"
    assert r["bits"] == r["container_bits"] == 4
    assert r["group_size"] == 32 and r["shape"] == [128, 128] and r["max_abs_err"] == 0.0
    # 4 bits + (16-bit scale + 4-bit zero) / 32 + a 32-bit g_idx entry per input shared by 128 rows
    assert r["bits_per_weight"] == pytest.approx(4 + 20 / 32 + 32 / 128)
    assert all(f["dtype"] == "float16" for f in m["float_tensors"])
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"],
            qc["checkpoint_format"]) == ("gptq", 4, 32, False, True, "gptq")
    assert cfg["dtype"] == "float16"
    assert json.loads((out / "quantize_config.json").read_text()) == qc
    from safetensors.torch import load_file

    sd = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in sd  # tied to the embeddings, stored once
    assert sd["model.embed_tokens.weight"].dtype == torch.float16
    assert "model.layers.0.self_attn.q_proj.weight" not in sd and "model.layers.0.self_attn.q_proj.alpha" not in sd


def test_refusals_leave_nothing(base128, tmp_path, tiny_llama):
    # seq2 is exact only in a 3-bit container: warned, or refused with strict
    ck = make_checkpoint(base128, tmp_path / "seq", "seq", 2, -1)
    with pytest.raises(ConfigError, match=r"seq 2-bit .* 3-bit container .* --strict refuses"):
        export("gptq", ck, tmp_path / "o1", strict=True)
    with pytest.warns(ExportWarning, match="3-bit container"):
        res = export("gptq", ck, tmp_path / "o1")
    assert res.manifest["info"]["bits"] == 3 and res.manifest["tensors"][0]["container_bits"] == 3
    # an affine zero of 0: v1 refuses when asked for, the default switches to v2 and says so
    ck = make_checkpoint(base128, tmp_path / "aff", "affine", 4, 32, zero_to_zero=True)
    with pytest.raises(ConfigError, match="cannot hold the zero point 0 .* --checkpoint-format gptq_v2"):
        export("gptq", ck, tmp_path / "o2", checkpoint_format="gptq")
    with pytest.warns(ExportWarning, match="writing checkpoint_format gptq_v2"):
        res = export("gptq", ck, tmp_path / "o2")
    assert json.loads((res.out / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq_v2"
    # 3-bit codes pack 32 at a time: the tiny 32-wide model's k_proj (out 16) goes into the 4-bit container
    # (test_wide_layers_*), which --strict refuses by name
    from winq.checkpoint import save_checkpoint
    from winq.models import load_base_model

    net, tok, _ = load_base_model(str(tiny_llama))
    cfg = winq.QuantConfig(bits=3, group_size=-1, embed="float")
    ck3 = save_checkpoint(tmp_path / "ck3", winq.prepare(net, cfg), tok, cfg, None)
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.self_attn\.k_proj: out_features=16 is not a multiple of "
                                          r"32"):
        export("gptq", ck3, tmp_path / "o3", strict=True)
    # a quantized lm_head is outside the decoder blocks GPTQ loaders quantize
    ck = make_checkpoint(base128, tmp_path / "lmh", "lsq", 4, -1, quantize_lm_head=True)
    with pytest.raises(ConfigError, match="outside .*lm_head"):
        export("gptq", ck, tmp_path / "o4")
    # a folder that is not an export is never replaced
    (tmp_path / "o5").mkdir()
    (tmp_path / "o5" / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="not a winq export"):
        export("gptq", ck3, tmp_path / "o5")
    assert not (tmp_path / "o3").exists() and not (tmp_path / "o4").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_failed_verification_leaves_nothing(base128, tmp_path, monkeypatch):
    from winq.exporters import Verified
    from winq.exporters.gptq import GPTQExporter

    ck = make_checkpoint(base128, tmp_path / "ck", "lsq", 8, 128)
    export("gptq", ck, tmp_path / "out")
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    monkeypatch.setattr(GPTQExporter, "verify", lambda self, folder, written, ref: Verified(
        {n: (0.5 if i == 3 else 0.0) for i, n in enumerate(ref.qweights)}))
    with pytest.raises(ExportError, match=r"1 tensors differ .*model\.layers\.0\.self_attn\.o_proj, max abs error 0.5"):
        export("gptq", ck, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before  # the previous export is untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(ExportError, match="already holds an export: pass --overwrite"):
        export("gptq", ck, tmp_path / "out")


def test_imports_stay_light():
    import subprocess

    code = (
        "import sys, winq, winq.exporters, winq.runtime, winq.runtime.gptq, winq.exporters.gptq\n"
        "heavy = [m for m in ('gptqmodel', 'optimum', 'triton', 'onnxruntime', 'llama_cpp') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_missing_consumer_names_the_pip_command(monkeypatch):
    """Whether the extra is installed or not: both of its modules are named, with the pip command."""
    from winq.runtime.gptq import load_gptq

    for m in ("optimum", "gptqmodel"):
        monkeypatch.setitem(sys.modules, m, None)  # `import m` now raises ImportError
    with pytest.raises(MissingDependencyError, match=r'needs optimum and gptqmodel: run `pip install "winq\[gptq\]"'):
        load_gptq("anything")


# ---------------------------------------------------------------------------------------------
# the real consumer: transformers + optimum + gptqmodel load the folder; weights and logits match

# (grid, bits, group, requested checkpoint format): GPTQ bits 2, 3, 4, 8 x groups -1, 32, 128 x v1, v2
CASES = [
    ("ternary", 2, -1, "gptq"),
    ("affine", 2, 32, "gptq_v2"),
    ("binary", 1, 128, "gptq"),  # 2-bit container
    ("lsq", 3, -1, "gptq_v2"),
    ("lsq", 3, 32, "gptq"),
    ("seq", 2, 128, "gptq"),  # 3-bit container
    ("affine", 3, 128, "gptq"),  # learned zeros 1..7 in v1's straddling 3-bit fields
    ("lsq", 4, -1, "gptq"),
    ("lsq", 4, 128, "gptq_v2"),
    ("affine", 4, 32, None),  # a zero of 0: the default switches to v2
    ("lsq", 8, 32, "gptq_v2"),
    ("lsq", 8, 128, "gptq"),
    ("affine", 8, -1, "gptq"),
]


@pytest.mark.parametrize("grid,bits,group,fmt", CASES, ids=[f"{g}{b}-g{gs}-{f or 'auto'}" for g, b, gs, f in CASES])
def test_consumer_loads_exactly(base128, tmp_path, grid, bits, group, fmt):
    need_gptqmodel()
    import warnings

    from winq.runtime.gptq import gptq_layers, load_gptq

    ck = make_checkpoint(base128, tmp_path / "ck", grid, bits, group, zero_to_zero=fmt is None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExportWarning)
        res = export("gptq", ck, tmp_path / "gptq", checkpoint_format=fmt)
    assert res.manifest["info"]["checkpoint_format"] == (fmt or "gptq_v2")
    model = load_gptq(res.out)
    layers = gptq_layers(model)
    ref, qws = fake_quant_reference(ck)
    assert set(layers) == set(qws)
    for n, qw in qws.items():
        w = layers[n].dequantize_weight().T  # gptqmodel's own unpacking, (in, out) -> (out, in)
        assert w.dtype == torch.float32
        assert torch.equal(w, qw.dequantize()), n  # atol 0
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits, model(input_ids=ids).logits
    assert b.dtype == torch.float32
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_consumer_raw_state_and_float32_floats(base128, tmp_path):
    """Without winq's upcast, gptqmodel holds our exact codes and float16 scales and rounds its product to
    float16; with float_dtype float32 the whole model equals the unrounded fake-quant model."""
    need_gptqmodel()
    from winq.runtime.gptq import gptq_layers, load_gptq

    ck = make_checkpoint(base128, tmp_path / "ck", "lsq", 4, 32)
    res = export("gptq", ck, tmp_path / "gptq", float_dtype="float32")
    assert all(f["max_abs_err"] == 0.0 for f in res.manifest["float_tensors"])
    raw = gptq_layers(load_gptq(res.out, exact=False))
    ref, qws = fake_quant_reference(ck, torch.float32)
    for n, qw in qws.items():
        assert raw[n].scales.dtype == torch.float16 and torch.equal(raw[n].scales, qw.scale.T)
        assert torch.equal(raw[n].dequantize_weight().T, qw.dequantize().to(torch.float16))  # its float16 arithmetic
    model = load_gptq(res.out)
    ids = torch.randint(0, 300, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_consumer_with_skipped_modules(base128, tmp_path):
    need_gptqmodel()
    from winq.runtime.gptq import gptq_layers, load_gptq

    ck = make_checkpoint(base128, tmp_path / "ck", "lsq", 4, -1, skip=("mlp.down_proj",))
    res = export("gptq", ck, tmp_path / "gptq")
    qc = json.loads((res.out / "config.json").read_text())["quantization_config"]
    assert qc["modules_in_block_to_quantize"] == [["mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj",
                                                   "self_attn.o_proj",
                                                   "self_attn.q_proj", "self_attn.v_proj"]]
    model = load_gptq(res.out)
    ref, qws = fake_quant_reference(ck)
    assert set(gptq_layers(model)) == set(qws) and len(qws) == 12
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("float_dtype", ["float16", "float32"])
def test_consumer_qwen2_with_biases(tmp_path, float_dtype):
    """Qwen2's q/k/v biases stay on the GPTQ layers (gptqmodel's float16 bias buffer is upcast losslessly)."""
    need_gptqmodel()
    from tinymodels import make_model_dir

    from winq.runtime.gptq import load_gptq

    base = make_model_dir(tmp_path / "qwen2", "qwen2", seed=3, hidden=128, inter=256)
    ck = make_checkpoint(base, tmp_path / "ck", "lsq", 4, 32)
    res = export("gptq", ck, tmp_path / "gptq", float_dtype=float_dtype)
    model = load_gptq(res.out)
    ref, _ = fake_quant_reference(ck, getattr(torch, float_dtype))
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def cli_export(base128, tmp_path_factory):
    """(checkpoint, export folder, CliRunner, env) after `winq export` of a seq2 group-32 checkpoint."""
    from typer.testing import CliRunner

    from winq.cli.main import app

    tmp_path = tmp_path_factory.mktemp("cli")
    ck = make_checkpoint(base128, tmp_path / "ck", "seq", 2, 32)
    runner = CliRunner()
    env = {"COLUMNS": "200", "NO_COLOR": "1"}
    r = runner.invoke(app, ["export", "--format", "gptq", "--checkpoint", str(ck), "--out", str(tmp_path / "g"),
                            "--strict"], env=env)
    assert r.exit_code == 1 and "--strict refuses" in " ".join(r.stderr.split()) and "Traceback" not in r.output
    r = runner.invoke(app, ["export", "--format", "gptq", "--checkpoint", str(ck), "--out", str(tmp_path / "g")],
                      env=env)
    assert r.exit_code == 0, r.output
    assert "note: seq 2-bit weights" in r.stderr
    assert "model.layers.1.mlp.down_proj" in r.stdout and "2 in 3" in r.stdout
    assert "14 quantized tensors, max error 0" in " ".join(r.stdout.split())
    r = runner.invoke(app, ["export", "--format", "onnxx", "--checkpoint", str(ck), "--out", str(tmp_path / "x")],
                      env=env)
    assert r.exit_code == 1 and "unknown export format 'onnxx'" in r.stderr
    r = runner.invoke(app, ["eval", "--backend", "fakequant,gptq", "--checkpoint", str(ck)], env=env)
    assert r.exit_code == 1 and "--gptq FOLDER" in r.stderr
    return ck, tmp_path / "g", runner, env


def test_cli_export(cli_export):
    ck, folder, _, _ = cli_export
    m = json.loads((folder / "winq-export.json").read_text())
    assert m["summary"]["max_abs_err"] == 0.0 and m["info"]["bits"] == 3


def test_cli_eval_fakequant_vs_gptq(cli_export, text_file):
    need_gptqmodel()
    from winq.cli.main import app

    ck, folder, runner, env = cli_export
    args = ["eval", "--backend", "fakequant,gptq", "--checkpoint", str(ck), "--gptq", str(folder),
            "--data", str(text_file), "--split", "test", "--seq-len", "64", "--json"]
    r = runner.invoke(app, args, env=env)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)  # stdout stays JSON: gptqmodel's banner goes to stderr
    fq, gq = res["results"]["fakequant"], res["results"]["gptq"]
    assert fq["tokens"] == gq["tokens"] > 100
    assert res["reference"] == "fakequant" and abs(res["ppl_relative_diff"]["gptq"]) < 1e-4  # float16 embeddings/norms
    assert res["ppl_relative_diff"]["gptq"] == pytest.approx(gq["ppl"] / fq["ppl"] - 1)


# ---------------------------------------------------------------------------------------------
# the default model (slow): 210 layers, 576-wide rows


@pytest.mark.slow
def test_default_model_exports_and_loads_exactly(tmp_path, user_cache):
    need_gptqmodel()
    from tinymodels import default_checkpoint
    from winq.runtime.gptq import gptq_layers, load_gptq

    torch.set_num_threads(2)
    ck, net, tok = default_checkpoint(tmp_path / "ck", bits=4, group_size=64)
    del net
    res = export("gptq", ck, tmp_path / "gptq", float_dtype="float32")
    assert res.manifest["summary"]["tensors"] == 210 and res.manifest["summary"]["max_abs_err"] == 0.0
    model = load_gptq(res.out)
    ref, qws = fake_quant_reference(ck, torch.float32)
    layers = gptq_layers(model)
    for n, qw in qws.items():
        assert torch.equal(layers[n].dequantize_weight().T, qw.dequantize()), n
    ids = tok("The quick brown fox jumps over the lazy dog. " * 6, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# layers whose sizes miss the 2/3-bit packing period: the exact 4-bit container, per module


@pytest.mark.parametrize("kind", sorted(k for k in CONTAINERS if container_for(*k).bits < 4))
def test_wider_container_is_exact(kind):
    from winq.formats.gptq import fits_shape, wider_container

    grid, bits = kind
    qw = random_qweight(grid, bits, 40, 96, -1, seed=bits)  # out 40: not a multiple of 32 (3-bit) or 16 (2-bit)
    assert not fits_shape(40, 96, container_for(grid, bits).bits) and fits_shape(40, 96, 4)
    wc = wider_container(grid, bits)
    layer = map_weight("k_proj", qw, wc)
    assert layer.bits == 4 and torch.equal(layer.dequantize(), qw.dequantize())
    if grid != "affine":
        assert int(layer.zero.min()) == int(layer.zero.max()) == 8  # GPTQ's symmetric 4-bit zero
    t = pack_layer(layer, "gptq_v2")
    assert torch.equal(unpack_layer(t, 4, "gptq_v2").dequantize(), qw.dequantize())


@pytest.fixture(scope="module")
def qwen2_96(tmp_path_factory) -> Path:
    """Hidden 96, 4 heads of 24, 2 kv heads: k_proj / v_proj have 48 rows (not a multiple of 32)."""
    from tinymodels import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("qwen96") / "qwen2", "qwen2", seed=0, hidden=96, inter=256)


@pytest.mark.parametrize("grid,bits,fmt", [("lsq", 3, "gptq"), ("seq", 2, "gptq_v2")])
def test_wide_layers_load_exactly_in_gptqmodel(qwen2_96, tmp_path, grid, bits, fmt):
    """lsq3 (3-bit) and seq2 (3-bit container): k/v_proj go into the exact 4-bit container, named in
    quantization_config.dynamic; gptqmodel's own loader builds them as 4-bit layers and dequantizes them
    to QuantizedWeight.dequantize() exactly (float32 scales, as winq's gptq backend does)."""
    ck = make_checkpoint(qwen2_96, tmp_path / "ck", grid, bits, -1)
    with pytest.warns(ExportWarning, match=r"miss the 3-bit packing period 32 .* exact 4-bit container"):
        res = export("gptq", ck, tmp_path / "out")
    m = res.manifest
    assert m["summary"]["max_abs_err"] == 0.0
    wide = {n for n in m["info"]["wide_layers"]}
    assert wide == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("k_proj", "v_proj")}
    assert {t["name"] for t in m["tensors"] if t["container_bits"] == 4} == wide
    qc = json.loads((res.out / "config.json").read_text())["quantization_config"]
    assert qc["bits"] == 3 and qc["checkpoint_format"] == fmt
    assert qc["dynamic"] == {"+:^" + n.replace(".", "\\.") + "$": {"bits": 4} for n in wide}
    assert json.loads((res.out / "quantize_config.json").read_text())["dynamic"] == qc["dynamic"]
    if grid == "seq":  # gptqmodel's loader takes asymmetric GPTQ only as v2; v1 asked for is refused
        with pytest.raises(ConfigError, match="only as gptq_v2"):
            export("gptq", ck, tmp_path / "v1", checkpoint_format="gptq")
    else:  # --strict takes no wider containers
        with pytest.raises(ConfigError, match="out_features=48 is not a multiple of 32"):
            export("gptq", ck, tmp_path / "strict", strict=True)

    need_gptqmodel()
    from gptqmodel import BACKEND, GPTQModel

    from winq.checkpoint import load_checkpoint
    from winq.runtime.gptq import make_exact

    model = GPTQModel.load(str(res.out), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)  # torch: f16/bf16
    assert make_exact(model.model) == 14
    mods = dict(model.model.named_modules())
    qws = winq.quantized_weights(load_checkpoint(ck)[0])
    for n, qw in qws.items():
        assert mods[n].bits == (4 if n in wide else 3), n
        assert torch.equal(mods[n].dequantize_weight().T.float(), qw.dequantize()), n


@pytest.mark.parametrize("arch", ["qwen3", "gemma3", "phi3", "smollm3"])
def test_consumer_loads_the_newer_architectures(tmp_path, arch):
    """Qwen3 (q/k norms), Gemma 3 text, Phi-3 (fused qkv_proj / gate_up_proj, one GPTQ layer each) and SmolLM3
    load in transformers + gptqmodel and match the fake-quant model (GGUF coverage: test_gguf_archs.py)."""
    need_gptqmodel()
    from tinymodels import make_arch_dir

    from winq.runtime.gptq import gptq_layers, load_gptq

    base = make_arch_dir(tmp_path / arch, arch, seed=1)
    ck = make_checkpoint(base, tmp_path / "ck", "lsq", 4, -1)
    res = export("gptq", ck, tmp_path / "gptq")
    assert res.manifest["summary"]["max_abs_err"] == 0.0
    model = load_gptq(res.out)
    ref, qws = fake_quant_reference(ck)
    layers = gptq_layers(model)
    assert set(layers) == set(qws)
    for n, qw in qws.items():
        assert torch.equal(layers[n].dequantize_weight().T, qw.dequantize()), n
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=0)
