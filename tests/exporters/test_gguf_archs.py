"""GGUF export of the architectures beyond llama/qwen2: Qwen3, Gemma 3 (text), Phi-3 and
SmolLM3 on tiny seeded models, each run by llama.cpp (llama-cpp-python 0.3.36) against the fake-quant
model with the thresholds of tests/exporters/test_gguf.py, tokenization against transformers, and the
refusals for what llama.cpp fixes in code.

The consumer tests need `pip install "winq[llamacpp]"` and skip with that reason otherwise.
"""

from __future__ import annotations

import json

import pytest
import torch

from winq.errors import ConfigError
from winq.exporters import ExportWarning, export

from test_gguf import check_llamacpp_matches_fake_quant, need_llamacpp
from test_gptq import make_checkpoint

PRE = {"qwen3": "qwen2", "gemma3": "gpt-2", "phi3": "gpt-2", "smollm3": "llama-bpe"}  # the family's pre-tokenizer
CASES = [(arch, grid, bits) for arch in PRE for grid, bits in (("lsq", 4), ("seq", 2))] + [("gemma3", "ternary", 2)]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    from tinymodels import make_arch_dir

    root = tmp_path_factory.mktemp("gguf-archs")
    return {arch: make_arch_dir(root / f"tiny-{arch}", arch, seed=i + 1, pre=pre) for i, (arch, pre) in
            enumerate(PRE.items())}


@pytest.fixture(scope="module")
def exports(bases, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-arch-exports")
    out = {}
    for arch, grid, bits in CASES:
        tag = f"{arch}-{grid}{bits}"
        ck = make_checkpoint(bases[arch], root / f"ck-{tag}", grid, bits, -1)
        out[(arch, grid, bits)] = (ck, export("gguf", ck, root / tag / "model.gguf"))
    return out


def _fields(path):
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    return r, {f.name: f for f in r.fields.values()}


def _value(f):
    from gguf import GGUFValueType

    if f.types[0] == GGUFValueType.ARRAY:
        return [f.parts[i].tolist()[0] for i in f.data]
    if f.types[0] == GGUFValueType.STRING:
        return bytes(f.parts[-1]).decode()
    return f.parts[-1].tolist()[0]


TENSORS = {  # names llama.cpp's loader requires (src/models/<arch>.cpp), beyond the llama set
    "qwen3": {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight", "blk.0.attn_q.weight", "blk.1.ffn_gate.weight"},
    "gemma3": {"blk.0.attn_q_norm.weight", "blk.0.post_attention_norm.weight", "blk.0.ffn_norm.weight",
               "blk.0.post_ffw_norm.weight", "blk.5.ffn_gate.weight"},
    "phi3": {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight", "blk.1.ffn_down.weight"},
    "smollm3": {"blk.0.attn_q.weight", "blk.3.attn_k.weight", "blk.3.ffn_gate.weight"},
}


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_export_reads_back_exactly(exports, case):
    ck, res = exports[case]
    arch = case[0]
    m = json.loads((res.out.parent / "winq-export.json").read_text())
    assert m["summary"]["max_abs_err"] == 0.0 and all(t["max_abs_err"] == 0.0 for t in m["tensors"])
    r, f = _fields(res.out)
    assert _value(f["general.architecture"]) == arch
    names = {t.name for t in r.tensors}
    assert TENSORS[arch] <= names and "output.weight" not in names  # tied: llama.cpp reuses token_embd
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
    if arch == "phi3":  # fused layers stay one quantized tensor each: q+k+v rows, gate+up rows
        assert "blk.0.attn_q.weight" not in names and "blk.0.ffn_gate.weight" not in names
        assert shapes["blk.0.attn_qkv.weight"] == (256, 256 + 2 * 128) and shapes["blk.0.ffn_up.weight"] == (256, 1024)
        assert {t["name"].split(".")[-1] for t in m["tensors"]} >= {"qkv_proj", "gate_up_proj"}
        assert _value(f["phi3.rope.dimension_count"]) == 64 and _value(f["phi3.attention.sliding_window"]) == 0
    if arch == "qwen3":
        assert _value(f["qwen3.attention.key_length"]) == 128 and shapes["blk.0.attn_q.weight"] == (256, 512)
    if arch == "gemma3":
        assert _value(f["gemma3.attention.sliding_window"]) == 16
        assert _value(f["gemma3.attention.sliding_window_pattern"]) == [True, True, False] * 2
        assert _value(f["gemma3.rope.freq_base_swa"]) == 10000.0 and _value(f["gemma3.rope.freq_base"]) == 1e6
        assert _value(f["gemma3.final_logit_softcapping"]) == 30.0
        assert m["info"]["norm_shift"] == 1.0
    if arch == "smollm3":
        assert m["info"]["nope_layers"] == [3]
    assert m["info"]["pre_tokenizer"] == PRE[arch]


def test_gemma3_norms_are_stored_as_one_plus_w(exports):
    from safetensors.torch import load_file

    ck, res = exports[("gemma3", "lsq", 4)]
    r, _ = _fields(res.out)
    t = {x.name: x for x in r.tensors}
    sd = load_file(str(ck / "model.safetensors"))
    for hf, g in (("model.norm.weight", "output_norm.weight"),
                  ("model.layers.1.self_attn.q_norm.weight", "blk.1.attn_q_norm.weight"),
                  ("model.layers.2.post_feedforward_layernorm.weight", "blk.2.post_ffw_norm.weight")):
        assert t[g].tensor_type.name == "F32"
        assert torch.equal(torch.from_numpy(t[g].data.copy()), sd[hf].float() + 1.0), g


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_llamacpp_runs_the_export_like_the_fake_quant_model(exports, case):
    """Same thresholds as test_gguf.py's llama/qwen2 cases. Measured here (200 tokens, 1 thread), lsq4 / seq2:
    max |dlogit| qwen3 0.016 / 0.023, gemma3 0.028 / 0.047 (ternary 0.050), phi3 0.014 / 0.020, smollm3
    0.018 / 0.018; relative ppl difference at most 1.3e-3 in magnitude (gemma3 lsq4); top-1 agreement over all
    positions 0.935 (gemma3 seq2) to 1.0, and 1.0 wherever the fake-quant lead exceeds 0.1."""
    need_llamacpp()
    ck, res = exports[case]
    check_llamacpp_matches_fake_quant(ck, res.out, threads=1)


SENTENCES = [
    "the market rose sharply today",
    "In 2024, 1,234 investors paid $56.78 (about 9%) -- don't they? 1234567",
    "  leading spaces,\ttabs\tand\nnew lines\n\n",
    "naïve café — “quotes” 日本語 😀 123456789",
    "it's we'll they've I'm x<|endoftext|>y",
]


@pytest.mark.parametrize("arch", sorted(PRE))
def test_llamacpp_tokenizes_like_transformers(exports, arch):
    need_llamacpp()
    from transformers import AutoTokenizer

    from winq.runtime.llamacpp import tokenize

    ck, res = exports[(arch, "lsq", 4)]
    tok = AutoTokenizer.from_pretrained(str(ck))
    for s in SENTENCES:
        assert tokenize(res.out, s) == tok(s, add_special_tokens=False)["input_ids"], s


def test_digit_runs_tell_llama3_from_qwen2():
    from tinymodels import LLAMA3_REGEX, QWEN2_REGEX

    from winq.exporters.gguf_meta import _pre_tokenizer

    def tj(pat):
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pat}}, {"type": "ByteLevel", "use_regex": False}]}}

    assert _pre_tokenizer(tj(QWEN2_REGEX), "qwen3") == "qwen2"
    assert _pre_tokenizer(tj(LLAMA3_REGEX), "smollm3") == "llama-bpe"


# ---------------------------------------------------------------------------------------------
# what llama.cpp fixes in code: refused (or noted) when the checkpoint differs


def _refused(tmp_path, arch, match, **cfg):
    from tinymodels import make_arch_dir

    base = make_arch_dir(tmp_path / "base", arch, **cfg)
    ck = make_checkpoint(base, tmp_path / "ck", "lsq", 4, -1)
    out = tmp_path / "e" / "model.gguf"
    with pytest.raises(ConfigError, match=match):
        export("gguf", ck, out)
    assert not out.exists()


def test_gemma3_settings_llamacpp_cannot_run_are_refused(tmp_path):
    _refused(tmp_path / "a", "gemma3", r"scales queries by 1/sqrt\(64\).*query_pre_attn_scalar is 256.*--format gptq",
             query_pre_attn_scalar=256)
    _refused(tmp_path / "b", "gemma3", "no attention soft-capping", attn_logit_softcapping=50.0)


def test_smollm3_nope_layers_must_follow_llamacpp(tmp_path):
    _refused(tmp_path, "smollm3", r"every 4th layer.*\[1, 0, 1, 1\].*--format onnx", no_rope_layers=[1, 0, 1, 1])


def test_phi3_sliding_window_is_a_note(tmp_path):
    from tinymodels import make_arch_dir

    base = make_arch_dir(tmp_path / "phi3-sw", "phi3", sliding_window=64)
    ck = make_checkpoint(base, tmp_path / "ck", "lsq", 4, -1)
    with pytest.warns(ExportWarning, match="without its sliding window"):
        res = export("gguf", ck, tmp_path / "e" / "model.gguf")
    assert any("without its sliding window (64 tokens)" in n for n in res.manifest["notes"])
    _, f = _fields(res.out)
    assert _value(f["phi3.attention.sliding_window"]) == 64  # as llama.cpp's converter writes it (then ignores it)


def test_unsupported_architecture_names_the_formats_that_take_it():
    from winq.exporters.gguf_meta import arch_of

    class Cfg:
        architectures = ["Gemma3ForConditionalGeneration"]
        model_type = "gemma3"

    with pytest.raises(ConfigError, match=r"Qwen3, Gemma 3 \(text\), Phi-3 and SmolLM3.*"
                                          r"Gemma3ForConditionalGeneration: export it with --format gptq or "
                                          r"--format onnx"):
        arch_of(Cfg())
