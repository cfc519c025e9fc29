"""Runtime activation emulation: the QuantLinear hook, per-layer plans read from an
export's winq-export.json or decided as the exporter would, fake-quant logits against llama.cpp and onnxruntime
on tiny exports, `winq train --act-quant` and the exporters' check of it.

The logit comparisons measure the residue per position: max over the vocabulary of |fake-quant - runtime|.
With the runtime's activation quantizer emulated, almost every position agrees to float32 summation order
(~1e-7); a few positions differ more where a float sum that lands next to a rounding boundary of an 8-bit
activation code is rounded the other way (one code step, amax / 127, then carried through the later layers).
Without the emulation every position differs by ~1e-4..1e-3.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import winq
from winq.actplan import ActPlan, ActQuant, act_mismatch, apply_plan, emulating, parse_act_quant, set_act_quant
from winq.actquant import q8_0, q8_k
from winq.errors import ConfigError
from winq.qlinear import QuantLinear

sys.path.append(str(Path(__file__).resolve().parents[1] / "exporters"))

LLAMACPP_REASON = 'the llama.cpp consumer tests need llama-cpp-python: pip install "winq[llamacpp]"'


# ---- the hook on QuantLinear ----------------------------------------------------------------------


def _layer(grid="lsq", bits=4, k=64, n=16, seed=0):
    torch.manual_seed(seed)
    lin = QuantLinear(k, n, bias=True, grid=grid, bits=bits)
    with torch.no_grad():
        lin.weight.normal_()
        lin.bias.normal_()
        lin.init_scales()
    return lin


@pytest.mark.parametrize("grid,bits", [("lsq", 4), ("affine", 4)])
def test_hook_quantizes_the_input_in_both_forward_paths(grid, bits):
    lin = _layer(grid, bits)
    x = torch.randn(3, 5, 64)
    lin.act_quant = ActQuant("q8_0")
    want = F.linear(q8_0(x), lin.fake_weight(), lin.bias)
    lin.eval()
    with torch.no_grad():
        assert torch.equal(lin(x), want)  # eval / no_grad path
    lin.train()
    xg = x.clone().requires_grad_(True)
    y = lin(xg)  # training path (the fused autograd Function for lsq, the composite one for affine)
    assert torch.equal(y.detach(), want)
    g = torch.randn_like(y)
    y.backward(g)
    # straight-through: the input gradient is that of the layer at the quantized input
    ref = _layer(grid, bits)
    ref.train()
    xq = q8_0(x).requires_grad_(True)
    ref(xq).backward(g)
    assert torch.equal(xg.grad, xq.grad)
    assert torch.equal(lin.weight.grad, ref.weight.grad)
    assert torch.equal(lin.alpha.grad, ref.alpha.grad)


def test_hook_off_is_the_plain_layer():
    lin = _layer()
    x = torch.randn(4, 64)
    with torch.no_grad():
        plain = lin(x)
        lin.act_quant = ActQuant("q8_k")
        emu = lin(x)
        lin.act_quant = None
        assert torch.equal(lin(x), plain)
    assert torch.equal(emu, F.linear(q8_k(x), lin.fake_weight(), lin.bias))
    assert not torch.equal(emu, plain)


def test_parse_act_quant_and_actquant_validation():
    assert parse_act_quant("none") is None and parse_act_quant(None) is None
    assert parse_act_quant("q8_0") == ActQuant("q8_0")
    assert parse_act_quant("q8_k") == ActQuant("q8_k")
    assert parse_act_quant("ort_int8") == ActQuant("ort_int8", 32)
    assert parse_act_quant("ort_int8:128") == ActQuant("ort_int8", 128)
    for bad in ("q4", "q8_0:32", "ort_int8:48", "ort_int8:x", "f16"):
        with pytest.raises(ConfigError):
            parse_act_quant(bad)
    with pytest.raises(ConfigError):
        ActQuant("ort_int8")
    with pytest.raises(ConfigError):
        ActQuant("q8_0", 32)
    assert ActQuant("q8_1").same_values(ActQuant("q8_0")) and not ActQuant("q8_k").same_values(ActQuant("q8_0"))
    with pytest.raises(ConfigError):
        winq.TrainConfig(act_quant="q4")
    assert winq.TrainConfig.from_dict({"steps": 3}).act_quant == "none"  # checkpoints from before the field


def test_plans_install_and_restore(tiny_ckpt):
    from winq.checkpoint import load_checkpoint

    net = load_checkpoint(tiny_ckpt)[0]
    names = list(winq.quant_layers(net))
    emb = net.get_input_embeddings().weight.detach().clone()
    plan = ActPlan({n: ActQuant("q8_0") for n in names}, floats={"model.embed_tokens": "F16", "lm_head": "F16"})
    ids = torch.arange(20)[None]
    with torch.no_grad():
        before = net(input_ids=ids).logits
        with emulating(net, plan):
            assert all(m.act_quant == ActQuant("q8_0") for m in winq.quant_layers(net).values())
            w = net.get_input_embeddings().weight
            assert torch.equal(w, emb.half().float())
            assert net.lm_head.weight is w  # tied: one tensor, rounded once
            during = net(input_ids=ids).logits
        after = net(input_ids=ids).logits
    assert torch.equal(net.get_input_embeddings().weight, emb)
    assert all(m.act_quant is None for m in winq.quant_layers(net).values())
    assert torch.equal(before, after) and not torch.equal(before, during)
    prev = set_act_quant(net, "q8_k")
    assert all(v is None for v in prev.values())
    set_act_quant(net, prev)
    with pytest.raises(ConfigError, match="does not quantize"):
        set_act_quant(net, {"model.nope": ActQuant("q8_0")})
    with pytest.raises(ConfigError):
        apply_plan(net, ActPlan({}, floats={"model.norm": "F16"}))  # not a Linear / Embedding
    assert all(m.act_quant is None for m in winq.quant_layers(net).values())


# ---- against the runtimes on tiny exports -----------------------------------------------------------


def _residue(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """max over the vocabulary of |a - b| per position."""
    return (a - b).abs().amax(-1)


def _ids(ck, n=200):
    from tinymodels import synthetic_text
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ck))
    return torch.tensor(tok(synthetic_text(60, seed=5))["input_ids"][:n])


def _check_close(emu, plain, got, label, prefix=32):
    """Exact to float32 summation order until the first flipped activation code: at least half of the first
    `prefix` positions agree to 1e-6 with the emulation, none without it; over all positions the emulation is
    closer on average."""
    r_emu, r_plain = _residue(emu, got), _residue(plain, got)
    exact = int((r_emu[:prefix] < 1e-6).sum())
    print(f"{label}: first {prefix} positions within 1e-6: {exact} with act, {int((r_plain[:prefix] < 1e-6).sum())} "
          f"without; all {len(r_emu)} positions: with act median {r_emu.median():.2e} mean {r_emu.mean():.2e} "
          f"max {r_emu.max():.2e}, without median {r_plain.median():.2e} mean {r_plain.mean():.2e} "
          f"max {r_plain.max():.2e}")
    assert exact >= prefix // 2, label
    assert int((r_plain[:prefix] < 1e-6).sum()) == 0, label
    assert r_emu.mean() < r_plain.mean(), label


GGUF_CASES = [  # (hidden, grid, bits, keep): GGUF type, llama.cpp's activation type
    (32, "lsq", 4, "f16"),  # Q4_0 -> q8_0; F16 embeddings and tied output head: fp16 inputs
    (32, "lsq", 4, "f32"),  # the same with F32 float tensors
    (256, "ternary", 2, "f16"),  # TQ1_0 -> q8_k
    (256, "lsq", 8, "q8_0"),  # Q8_0 -> q8_0; Q8_0 embeddings / head (gguf-py's reference quantizer)
]


@pytest.fixture(scope="module")
def gguf_exports(tmp_path_factory):
    from test_gptq import make_checkpoint
    from tinymodels import make_model_dir

    from winq.exporters import export

    root = tmp_path_factory.mktemp("act-gguf")
    out = {}
    for hidden, grid, bits, keep in GGUF_CASES:
        tag = f"{hidden}-{grid}{bits}-{keep}"
        base = make_model_dir(root / f"base{hidden}", "llama", seed=0, hidden=hidden, inter=2 * hidden)
        ck = make_checkpoint(base, root / f"ck-{tag}", grid, bits, -1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = export("gguf", ck, root / tag / "model.gguf", keep=keep)
        out[(hidden, grid, bits, keep)] = (ck, res.out)
    return out


@pytest.mark.parametrize("case", GGUF_CASES, ids=lambda c: "-".join(map(str, c)))
def test_fakequant_with_act_llamacpp_matches_llamacpp(gguf_exports, case):
    pytest.importorskip("llama_cpp", reason=LLAMACPP_REASON)
    from winq.checkpoint import load_checkpoint
    from winq.runtime.act import plan_for
    from winq.runtime.llamacpp import load_llamacpp

    ck, gguf = gguf_exports[case]
    net = load_checkpoint(ck)[0]
    ids = _ids(ck)
    got = load_llamacpp(gguf, threads=1, n_ctx=256)(ids)
    from_record = plan_for(net, "llamacpp", gguf)
    decided = plan_for(net, "llamacpp")
    assert from_record.quant == decided.quant  # the exporter's own choice, read back or recomputed
    want = {"lsq4": "q8_0", "ternary2": "q8_k", "lsq8": "q8_0"}[f"{case[1]}{case[2]}"]
    assert set(map(str, from_record.quant.values())) == {want}
    assert set(from_record.floats.values()) == {case[3].upper()}
    with torch.no_grad():
        plain = net(input_ids=ids[None]).logits[0]
        with emulating(net, from_record):
            emu = net(input_ids=ids[None]).logits[0]
    _check_close(emu, plain, got, f"llama.cpp {case}")


@pytest.fixture(scope="module")
def onnx_exports(tmp_path_factory):
    pytest.importorskip("onnxruntime", reason='pip install "winq[onnx]"')
    from test_gptq import make_checkpoint
    from tinymodels import make_model_dir

    from winq.exporters import export

    root = tmp_path_factory.mktemp("act-onnx")
    base = make_model_dir(root / "base", "llama", seed=0, hidden=64, inter=128)
    out = {}
    for grid, bits, block in (("lsq", 4, 32), ("lsq", 4, 64), ("ternary", 2, 16)):
        ck = make_checkpoint(base, root / f"ck-{grid}{bits}", grid, bits, -1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = export("onnx", ck, root / f"{grid}{bits}-b{block}", block_size=block)
        out[(grid, bits, block)] = (ck, res.out)
    return out


@pytest.mark.parametrize("case", [("lsq", 4, 32), ("lsq", 4, 64)], ids=lambda c: "-".join(map(str, c)))
def test_fakequant_with_act_ort4_matches_onnxruntime_level4(onnx_exports, case):
    from winq.checkpoint import load_checkpoint
    from winq.formats.onnx import OrtDecoder
    from winq.runtime.act import plan_for

    ck, folder = onnx_exports[case]
    net = load_checkpoint(ck)[0]
    ids = _ids(ck, 120)
    got = torch.from_numpy(OrtDecoder(folder, accuracy_level=4).decode(ids, n_prefill=len(ids)))
    plan = plan_for(net, "ort4", folder)
    assert set(plan.quant.values()) == {ActQuant("ort_int8", case[2])}
    if case[2] == 32:
        assert plan_for(net, "ort4").quant == plan.quant  # the exporter's default block size
    with torch.no_grad():
        plain = net(input_ids=ids[None]).logits[0]
        with emulating(net, plan):
            emu = net(input_ids=ids[None]).logits[0]
    _check_close(emu, plain, got, f"onnxruntime level 4 {case}")


def test_ort4_plan_leaves_float_where_ort_does(onnx_exports):
    from winq.checkpoint import load_checkpoint
    from winq.runtime.act import plan_for

    ck, folder = onnx_exports[("ternary", 2, 16)]
    plan = plan_for(load_checkpoint(ck)[0], "ort4", folder)
    assert set(plan.quant.values()) == {None}  # 2-bit MatMulNBits at block 16 keeps float activations


# ---- training with --act-quant and the exporters' check -------------------------------------------


def test_train_with_act_quant_is_recorded_and_applied(tiny_llama, text_file, tmp_path, monkeypatch):
    from winq.checkpoint import read_info
    from winq.train import train

    seen = []
    orig = QuantLinear.forward

    def spy(self, x):
        seen.append((self.act_quant, self.training, torch.is_grad_enabled()))
        return orig(self, x)

    monkeypatch.setattr(QuantLinear, "forward", spy)
    tcfg = winq.TrainConfig(steps=2, seq_len=16, batch_size=1, act_quant="q8_0", diag_every=0, reinit_every=-1,
                           eval_every=0, distill=0.0)
    qc = winq.QuantConfig(bits=4, group_size=-1, embed="float")
    res = train(str(tiny_llama), str(text_file), qc, tcfg, tmp_path / "run", progress=False)
    assert res.final_loss is not None and res.final_loss == res.final_loss
    assert seen and all(a == ActQuant("q8_0") and tr and g for a, tr, g in seen)
    assert read_info(tmp_path / "run")["train"]["act_quant"] == "q8_0"


def _ckpt_trained_with(base, out, act: str, bits=4, grid="lsq"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from winq.checkpoint import save_checkpoint

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    cfg = winq.QuantConfig(bits=bits, grid=grid, group_size=-1, embed="float")
    winq.prepare(model, cfg)
    tok = AutoTokenizer.from_pretrained(str(base))
    return save_checkpoint(out, model, tok, cfg, winq.TrainConfig(act_quant=act))


def test_gguf_export_checks_the_trained_act_quant(tiny_llama, tmp_path):
    from winq.exporters import ExportWarning, export

    ok = export("gguf", _ckpt_trained_with(tiny_llama, tmp_path / "a", "q8_0"), tmp_path / "ga" / "model.gguf")
    rec = ok.manifest["info"]["act_quant"]
    assert rec["match"] and rec["trained"] == "q8_0" and rec["runtime_schemes"] == {"q8_0": 14}
    assert not any("--act-quant" in n for n in ok.notes)
    with pytest.warns(ExportWarning, match="trained with q8_k activations"):
        bad = export("gguf", _ckpt_trained_with(tiny_llama, tmp_path / "b", "q8_k"), tmp_path / "gb" / "model.gguf")
    assert not bad.manifest["info"]["act_quant"]["match"]
    assert any("q8_k" in n for n in bad.manifest["notes"])
    plain = export("gguf", _ckpt_trained_with(tiny_llama, tmp_path / "c", "none"), tmp_path / "gc" / "model.gguf")
    assert plain.manifest["info"]["act_quant"]["trained"] == "none" and not plain.notes


def test_onnx_export_checks_the_trained_act_quant(tiny_llama, tmp_path):
    pytest.importorskip("onnxruntime", reason='pip install "winq[onnx]"')
    from winq.exporters import ExportWarning, export

    ck = _ckpt_trained_with(tiny_llama, tmp_path / "a", "ort_int8")
    ok = export("onnx", ck, tmp_path / "o4", accuracy_level=4)
    assert ok.manifest["info"]["act_quant"]["match"]
    with pytest.warns(ExportWarning, match="accuracy_level 0"):
        bad = export("onnx", ck, tmp_path / "o0")  # accuracy level 0: float activations
    assert bad.manifest["info"]["act_quant"]["runtime_schemes"] == {"none": 14}


def test_act_mismatch_record():
    rt = {"a": ActQuant("q8_1"), "b": None}
    rec, note = act_mismatch("q8_0", rt, "llama.cpp")
    assert rec["layers_differing"] == 1 and not rec["match"] and "1 of 2" in note
    rec, note = act_mismatch("none", rt, "llama.cpp")
    assert note is None and not rec["match"]


# ---- the command line -------------------------------------------------------------------------------


def test_cli_eval_act_llamacpp(gguf_exports, text_file):
    pytest.importorskip("llama_cpp", reason=LLAMACPP_REASON)
    from typer.testing import CliRunner

    from winq.cli.main import app

    ck, gguf = gguf_exports[(32, "lsq", 4, "f16")]
    runner = CliRunner()
    args = ["eval", "--backend", "fakequant,llamacpp", "--checkpoint", str(ck), "--gguf", str(gguf), "--data",
            str(text_file), "--split", "train", "--max-tokens", "400", "--seq-len", "128", "--threads", "1", "--json"]
    res = {}
    for act in ("none", "llamacpp"):
        r = runner.invoke(app, [*args, "--act", act])
        assert r.exit_code == 0, (r.output, r.exception)
        res[act] = json.loads(r.stdout)
    assert "act" not in res["none"] and res["llamacpp"]["act"]["schemes"] == {"q8_0": 14}
    kl = {a: res[a]["results"]["llamacpp"]["kl"] for a in res}
    rel = {a: abs(res[a]["ppl_relative_diff"]["llamacpp"]) for a in res}
    print("cli: kl", kl, "rel ppl", rel)
    assert kl["llamacpp"] < kl["none"] / 10 and rel["llamacpp"] < rel["none"]
    r = runner.invoke(app, [*args, "--backend", "llamacpp", "--act", "llamacpp"])
    assert r.exit_code == 1 and "add fakequant" in r.stderr
    r = runner.invoke(app, [*args, "--act", "gpu"])
    assert r.exit_code == 1 and "--act 'gpu'" in r.stderr


def test_cli_train_act_quant(tiny_llama, text_file, tmp_path):
    from typer.testing import CliRunner

    from winq.checkpoint import read_info
    from winq.cli.main import app

    runner = CliRunner()
    args = ["train", "--model", str(tiny_llama), "--data", str(text_file), "--steps", "1", "--seq-len", "16",
            "--no-progress", "--threads", "1"]
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "k"), "--act-quant", "q8_k"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert read_info(tmp_path / "k")["train"]["act_quant"] == "q8_k"
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "x"), "--act-quant", "q4"])
    assert r.exit_code == 1 and "act_quant='q4'" in r.stderr and not (tmp_path / "x").exists()


# ---- --act-quant llamacpp: a per-layer plan (q8_0 for Q4_0 containers, q8_k for Q2_K) ---------------------------


@pytest.fixture(scope="module")
def tiny_mixed(tmp_path_factory):
    """A tiny llama whose 2-bit seq export mixes GGUF types: 64-wide rows go into Q4_0 containers, the 256-wide
    down_proj rows into Q2_K (as the default model's 576- and 1536-wide rows do)."""
    from tinymodels import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("mixed") / "llama", "llama", seed=0, hidden=64, inter=256)


def test_act_quant_llamacpp_validation_and_records():
    from winq.actplan import check_act_quant, describe_act_quant, plan_record

    check_act_quant("llamacpp")
    assert winq.TrainConfig(act_quant="llamacpp").act_quant == "llamacpp"
    rec = plan_record("llamacpp", {"a": ActQuant("q8_0"), "b": ActQuant("q8_k"), "c": None})
    assert rec == {"plan": "llamacpp", "layers": {"a": "q8_0", "b": "q8_k", "c": "none"}}
    assert winq.TrainConfig.from_dict({"act_quant": rec}).act_quant == rec  # resume reads it back
    assert describe_act_quant(rec) == "llamacpp (none x1, q8_0 x1, q8_k x1)"
    assert plan_record("q8_0", {"a": ActQuant("q8_0")}) == "q8_0"
    for bad in ({"plan": "ort4", "layers": {}}, {"plan": "llamacpp", "layers": {"a": "q4"}}, "llama"):
        with pytest.raises(ConfigError):
            winq.TrainConfig(act_quant=bad)
    rt = {"a": ActQuant("q8_0"), "b": ActQuant("q8_k"), "c": None}
    rec_, note = act_mismatch(rec, rt, "llama.cpp")
    assert rec_["match"] and note is None and rec_["trained"].startswith("llamacpp")
    rec_, note = act_mismatch(rec, {"a": ActQuant("q8_k"), "b": ActQuant("q8_k"), "c": None}, "llama.cpp")
    assert rec_["layers_differing"] == 1 and "first: a, trained q8_0" in note
    with pytest.raises(ConfigError, match="resolved per layer"):
        act_mismatch("llamacpp", rt, "llama.cpp")


def test_act_quant_llamacpp_resolves_after_importing_only_winq(tiny_mixed):
    """`act_quant="llamacpp"` needs nothing imported first: a fresh process that imports only winq (and
    transformers) resolves the per-layer plan, and the plan is the GGUF exporter's type choice, layer by layer."""
    import subprocess

    code = f"""
import json, sys
from transformers import AutoModelForCausalLM
import winq
from winq.actplan import train_act_plan
qcfg = winq.QuantConfig(bits=2, grid="seq", group_size=-1, embed="float")
model = winq.prepare(AutoModelForCausalLM.from_pretrained({str(tiny_mixed)!r}), qcfg)
plan = train_act_plan(model, "llamacpp")
loaded = sorted(m for m in sys.modules if m.startswith("winq.") and m.split(".")[1] in ("runtime", "exporters", "cli"))
print(json.dumps({{"plan": {{n: str(a) for n, a in plan.items()}}, "loaded": loaded}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["loaded"] == []  # nothing above the core (and winq.formats) was imported
    assert {k.rsplit(".", 1)[-1]: v for k, v in got["plan"].items()} == {
        "q_proj": "q8_0", "k_proj": "q8_0", "v_proj": "q8_0", "o_proj": "q8_0", "gate_proj": "q8_0",
        "up_proj": "q8_0", "down_proj": "q8_k"}  # 64-wide rows in Q4_0 containers, 256-wide down_proj in Q2_K
    # the same plan as `winq eval --act llamacpp` decides without an artifact
    from transformers import AutoModelForCausalLM

    from winq.runtime.act import llamacpp_plan

    # per-row scales: 256-wide rows fit Q2_K's blocks
    qcfg = winq.QuantConfig(bits=2, grid="seq", group_size=-1, embed="float")
    model = winq.prepare(AutoModelForCausalLM.from_pretrained(str(tiny_mixed)), qcfg)
    assert {n: str(a) for n, a in llamacpp_plan(model).quant.items()} == got["plan"]


def test_train_act_quant_llamacpp_mixed_plan_matches_the_gguf_export(tiny_mixed, text_file, tmp_path, monkeypatch):
    from winq.checkpoint import read_info
    from winq.exporters import export
    from winq.train import train

    seen = {}
    orig = QuantLinear.forward

    def spy(self, x):
        seen.setdefault(self.spec.bits, set()).add((x.shape[-1], self.act_quant))
        return orig(self, x)

    monkeypatch.setattr(QuantLinear, "forward", spy)
    tcfg = winq.TrainConfig(steps=2, seq_len=16, batch_size=1, act_quant="llamacpp", diag_every=0, reinit_every=-1)
    out = tmp_path / "run"
    qc = winq.QuantConfig(bits=2, group_size=-1, embed="float")
    train(str(tiny_mixed), str(text_file), qc, tcfg, out, progress=False)
    assert seen[2] == {(64, ActQuant("q8_0")), (256, ActQuant("q8_k"))}  # per layer, by row width
    stored = read_info(out)["train"]["act_quant"]
    assert stored["plan"] == "llamacpp"
    assert {k.rsplit(".", 1)[-1]: v for k, v in stored["layers"].items()} == {
        "q_proj": "q8_0", "k_proj": "q8_0", "v_proj": "q8_0", "o_proj": "q8_0", "gate_proj": "q8_0",
        "up_proj": "q8_0", "down_proj": "q8_k"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = export("gguf", out, tmp_path / "g" / "model.gguf")
    rec = res.manifest["info"]["act_quant"]
    assert rec["match"] and rec["runtime_schemes"] == {"q8_0": 12, "q8_k": 2}, rec
    assert rec["trained"] == "llamacpp (q8_0 x12, q8_k x2)"
    assert not any("--act-quant" in n for n in res.manifest["notes"])
    # a single scheme for all layers does not match this export; the check names the first differing layer
    ck = _ckpt_trained_with(tiny_mixed, tmp_path / "b", "q8_0", bits=2, grid="seq")
    from winq.exporters import ExportWarning

    with pytest.warns(ExportWarning, match="down_proj"):
        bad = export("gguf", ck, tmp_path / "gb" / "model.gguf")
    assert bad.manifest["info"]["act_quant"]["layers_differing"] == 2


def test_cli_train_act_quant_llamacpp(tiny_mixed, text_file, tmp_path):
    from typer.testing import CliRunner

    from winq.checkpoint import read_info
    from winq.cli.main import app

    args = ["train", "--model", str(tiny_mixed), "--data", str(text_file), "--steps", "1", "--seq-len", "16",
            "--no-progress", "--threads", "1", "--bits", "2", "--out", str(tmp_path / "l"), "--act-quant", "llamacpp",
            "--group-size", "-1", "--embed", "float"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, (r.output, r.exception)
    stored = read_info(tmp_path / "l")["train"]["act_quant"]
    assert sorted(set(stored["layers"].values())) == ["q8_0", "q8_k"]
