"""Backend `ort`: onnxruntime runs winq's ONNX exports like the fake-quant model (prefill, KV-cache
decode, greedy generation), accuracy_level overrides, the fp32 baseline, bench, and errors.
Needs `pip install "winq[onnx]"`.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx", reason='the ort backend tests need onnx: pip install "winq[onnx]"')
pytest.importorskip("onnxruntime", reason='the ort backend tests need onnxruntime: pip install "winq[onnx]"')

import winq  # noqa: E402
from winq.errors import ConfigError, MissingDependencyError, ModelError  # noqa: E402
from winq.exporters import ExportWarning, export  # noqa: E402
from winq.exporters.onnx import export_fp32  # noqa: E402
from winq.formats.onnx import open_session  # noqa: E402
from winq.runtime.backends import LoadOptions, time_session  # noqa: E402
from winq.runtime.ort import OrtDecoder, OrtSession, generate_ids, load_ort  # noqa: E402


def make_checkpoint(base: Path, out: Path, grid: str, bits: int, group: int) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from winq.checkpoint import save_checkpoint

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(base))
    cfg = winq.QuantConfig(bits=bits, grid=grid, group_size=group, embed="float")
    winq.prepare(model, cfg)
    g = torch.Generator().manual_seed(7 * bits)
    with torch.no_grad():
        for m in winq.quant_layers(model).values():
            m.alpha.mul_(1 + 0.2 * torch.rand(m.alpha.shape, generator=g))
    return save_checkpoint(out, model, tok, cfg, None)


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    """{name: (checkpoint, onnx folder, fake-quant model)}: a 4-bit grouped Llama and a seq2 per-row Qwen2 (biases)."""
    from tinymodels import make_model_dir

    from winq.checkpoint import load_checkpoint

    root = tmp_path_factory.mktemp("ort")
    out = {}
    for name, arch, grid, bits, group, opts in [
        ("llama-lsq4", "llama", "lsq", 4, 32, {"block_size": 32}),
        ("qwen2-seq2", "qwen2", "seq", 2, -1, {"block_size": 16}),
    ]:
        base = make_model_dir(root / f"base-{name}", arch, seed=11, hidden=64, inter=128)
        ck = make_checkpoint(base, root / f"ck-{name}", grid, bits, group)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExportWarning)
            res = export("onnx", ck, root / f"onnx-{name}", **opts)
        net, tok, _ = load_checkpoint(ck)
        out[name] = (ck, res.out, net)
    return out


NAMES = ["llama-lsq4", "qwen2-seq2"]
IDS = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(3))


def ref_logits(net, ids=IDS):
    with torch.no_grad():
        return net(input_ids=ids[None]).logits[0]


@pytest.mark.parametrize("name", NAMES)
def test_prefill_matches_fake_quant(setups, name):
    _, folder, net = setups[name]
    fn = load_ort(folder, threads=2)
    got = fn(IDS)
    assert got.dtype == torch.float32 and got.shape == (40, net.config.vocab_size)
    assert float((got - ref_logits(net)).abs().max()) <= 1e-5
    # one prefill per call with an empty past: a second window is not affected by the first
    assert torch.equal(fn(IDS[:17]), fn(IDS[:17]))
    assert float((fn(IDS[:17]) - ref_logits(net, IDS[:17])).abs().max()) <= 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_decode_with_kv_cache_matches_fake_quant(setups, name):
    _, folder, net = setups[name]
    ref = ref_logits(net)
    dec = OrtDecoder(folder, threads=2)
    first = torch.from_numpy(dec.prefill(IDS[:30].numpy()))
    assert float((first - ref[:30]).abs().max()) <= 1e-5
    for t in range(30, 40):  # ten steps, one token each, the presents fed back as the past
        step = torch.from_numpy(dec.step(int(IDS[t])))
        assert float((step - ref[t]).abs().max()) <= 1e-5, t
    assert dec.length == 40


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_matches_transformers(setups, name):
    _, folder, net = setups[name]
    prompt = IDS[:8]
    with torch.no_grad():
        hf = net.generate(prompt[None], attention_mask=torch.ones(1, 8, dtype=torch.long), max_new_tokens=12,
                          do_sample=False, eos_token_id=None, pad_token_id=0)[0, 8:].tolist()
    assert generate_ids(folder, prompt, n_new=12) == hf
    eos = hf[-1]
    # stops after eos
    assert generate_ids(folder, prompt.tolist(), n_new=12, eos_token_id=eos) == hf[: hf.index(eos) + 1]


def test_accuracy_level_override(setups):
    _, folder, net = setups["llama-lsq4"]
    ref = ref_logits(net)
    d = {lvl: float((load_ort(folder, accuracy_level=lvl)(IDS) - ref).abs().max()) for lvl in (0, 4)}
    assert d[0] <= 1e-5
    assert 1e-6 < d[4] < 0.05 * float(ref.abs().max()), d  # int8 activations: close, reported separately
    m = open_session(folder, accuracy_level=4)
    assert m is not None
    with pytest.raises(ConfigError, match=r"accuracy_level=7: choose 0 .* or 4"):
        load_ort(folder, accuracy_level=7)
    # the override rewrites the graph in memory only
    import onnx

    g = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    levels = {a.i for n in g.graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {0}


def test_fp32_baseline(setups, tmp_path):
    import onnx

    ck, _, net = setups["llama-lsq4"]
    out = export_fp32(ck, tmp_path / "fp32")
    g = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ops = {n.op_type for n in g.graph.node}
    assert "MatMulNBits" not in ops and "MatMul" in ops
    assert float((load_ort(out)(IDS) - ref_logits(net)).abs().max()) <= 1e-5  # the fake-quant weights in float32
    assert (out / "tokenizer.json").is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # a plain Hugging Face folder: the float model itself
    from tinymodels import make_model_dir
    from transformers import AutoModelForCausalLM

    base = make_model_dir(tmp_path / "hf", "qwen2", seed=5)
    out2 = export_fp32(base, tmp_path / "fp32-hf")
    hf = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    with torch.no_grad():
        ref = hf(input_ids=IDS[None]).logits[0]
    assert float((load_ort(out2)(IDS) - ref).abs().max()) <= 1e-5
    with pytest.raises(ConfigError, match="no MatMulNBits"):
        load_ort(out2, accuracy_level=4)
    export_fp32(base, tmp_path / "fp32-hf")  # replaces its own earlier output
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(ModelError, match="not an ONNX export; refusing"):
        export_fp32(base, tmp_path / "other")


def test_bench(setups):
    _, folder, _ = setups["llama-lsq4"]
    session = OrtSession(folder, LoadOptions(threads=2, purpose="bench"))
    r = time_session(session, IDS[:16], n_gen=4, repeats=1)
    assert set(r) >= {"prefill_tok_s", "decode_tok_s", "prefill_s", "decode_s"}
    assert r["n_prompt"] == 16 and r["n_gen"] == 4
    assert r["prefill_s"] > 0 and r["decode_s"] > 0
    assert r["prefill_tok_s"] == pytest.approx(16 / r["prefill_s"])
    assert r["decode_tok_s"] == pytest.approx(4 / r["decode_s"])
    with pytest.raises(ConfigError, match="at least one prompt token"):
        time_session(session, [], n_gen=1)


def test_errors(tmp_path, monkeypatch, setups):
    with pytest.raises(ModelError, match=r"ONNX export .*nope not found; make one with `winq export --format onnx"):
        load_ort(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not an ONNX export .no model.onnx inside"):
        load_ort(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(ModelError, match="onnxruntime cannot load"):
        load_ort(tmp_path / "bad")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    _, folder, _ = setups["llama-lsq4"]
    with pytest.raises(MissingDependencyError, match=r'needs onnxruntime: run `pip install "winq\[onnx\]"`'):
        load_ort(folder)


def test_onnxruntime_genai_generates_like_us(setups):
    """onnxruntime-genai (optional) loads the folder through genai_config.json and decodes greedily as we do."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (optional: pip install "
                                                         "onnxruntime-genai)")
    _, folder, _ = setups["qwen2-seq2"]
    model = og.Model(str(folder))
    prompt = IDS[:8].tolist()
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 10, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    got = []
    while not gen.is_done():
        gen.generate_next_token()
        got.append(int(gen.get_next_tokens()[0]))
    assert got == generate_ids(folder, prompt, n_new=10)
    cfg = json.loads((folder / "genai_config.json").read_text())
    assert cfg["model"]["type"] == "qwen2" and cfg["model"]["decoder"]["filename"] == "model.onnx"
