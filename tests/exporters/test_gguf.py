"""GGUF export: block layouts against gguf-py's dequantizer, the type choice of every grid,
refusals, atomic writes, tokenizers, and the real consumer (llama.cpp through llama-cpp-python)
running tiny seeded Llama and Qwen2 models.

The consumer tests need `pip install "winq[llamacpp]"` and skip with that reason otherwise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from winq.errors import ConfigError, FormatError
from winq.exporters import ExportError, export
from winq.formats.gguf import TYPES, choose, permute_qw, permute_rows

from test_gptq import fake_quant_reference, make_checkpoint, random_qweight

LLAMACPP_REASON = 'the llama.cpp consumer tests need llama-cpp-python: pip install "winq[llamacpp]"'


def need_llamacpp():
    pytest.importorskip("llama_cpp", reason=LLAMACPP_REASON)


def dequantize_mapped(blocks, t, shape):
    return TYPES[t].decode(blocks, shape)


def map_weight(t, qw):
    try:
        return TYPES[t].encode(qw, "x")
    except FormatError:
        return None


def f16_scales(rng, rows, nb):
    return (rng.uniform(0.001, 0.2, size=(rows, nb)) * rng.choice([-1, 1], size=(rows, nb))).astype(np.float16)


# ---------------------------------------------------------------------------------------------
# block layouts: our bytes, gguf-py's dequantizer


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 5), nb=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_block_encoders_match_gguf_dequantizer(rows, nb, seed):
    rng = np.random.default_rng(seed)
    # 32-element types
    cols = 32 * nb * 8
    d = f16_scales(rng, rows, cols // 32)
    dx = np.repeat(d.astype(np.float32), 32, axis=1)
    q = rng.integers(0, 16, size=(rows, cols)).astype(np.uint8)
    np.testing.assert_array_equal(dequantize_mapped(TYPES["q4_0"].pack(q, d), "q4_0", (rows, cols)),
                                  dx * (q.astype(np.float32) - 8))
    m = f16_scales(rng, rows, cols // 32)
    mx = np.repeat(m.astype(np.float32), 32, axis=1)
    np.testing.assert_array_equal(dequantize_mapped(TYPES["q4_1"].pack(q, d, m), "q4_1", (rows, cols)),
                                  dx * q.astype(np.float32) + mx)
    q8 = rng.integers(-128, 128, size=(rows, cols)).astype(np.int8)
    np.testing.assert_array_equal(dequantize_mapped(TYPES["q8_0"].pack(q8, d), "q8_0", (rows, cols)),
                                  dx * q8.astype(np.float32))
    # 256-element types
    cols = 256 * nb
    d = f16_scales(rng, rows, nb)
    dx = np.repeat(d.astype(np.float32), 256, axis=1)
    q3 = rng.integers(0, 8, size=(rows, cols)).astype(np.uint8)
    np.testing.assert_array_equal(dequantize_mapped(TYPES["q3_k"].pack(q3, d), "q3_k", (rows, cols)),
                                  dx * (q3.astype(np.float32) - 4))
    q2 = rng.integers(0, 4, size=(rows, cols)).astype(np.uint8)
    dmin = f16_scales(rng, rows, nb)
    sc = rng.integers(0, 16, size=(rows, cols // 16)).astype(np.uint8)
    mm = rng.integers(0, 16, size=(rows, cols // 16)).astype(np.uint8)
    want = dx * np.repeat(sc, 16, axis=1) * q2 - np.repeat(dmin.astype(np.float32), 256,
                                                           axis=1) * np.repeat(mm, 16, axis=1)
    np.testing.assert_allclose(dequantize_mapped(TYPES["q2_k"].pack(q2, d, dmin, sc, mm), "q2_k", (rows, cols)), want,
                               rtol=1e-6, atol=0)
    t = rng.integers(0, 3, size=(rows, cols)).astype(np.uint8)
    for typ in ("tq2_0", "tq1_0"):
        got = dequantize_mapped(TYPES[typ].pack(t, d), typ, (rows, cols))
        np.testing.assert_array_equal(got, dx * (t.astype(np.float32) - 1), err_msg=typ)
    for typ, cls in TYPES.items():  # sizes from gguf-py's GGML_QUANT_SIZES
        assert cls.bits_per_weight() == {"q4_0": 4.5, "q4_1": 5.0, "q8_0": 8.5, "q2_k": 2.625, "q3_k": 3.4375,
                                    "tq2_0": 2.0625, "tq1_0": 1.6875, "iq4_nl": 4.5, "q4_k": 4.5, "q5_k": 5.5,
                                        "q6_k": 6.5625, "q5_0": 5.5}[typ]


# ---------------------------------------------------------------------------------------------
# type choice per grid: exact, tightest, containers where rows do not fit


AUTO = {  # (grid, bits) -> (type with 256-multiple rows, type with 96-wide rows)
    ("lsq", 4): ("q4_0", "q4_0"),
    ("lsq", 3): ("q3_k", "q4_0"),
    ("lsq", 8): ("q8_0", "q8_0"),
    ("seq", 2): ("q2_k", "q4_0"),
    ("ternary", 2): ("tq1_0", "q4_0"),
    ("binary", 1): ("tq1_0", "q4_0"),
    ("affine", 2): ("q2_k", "q4_0"),
}


@pytest.mark.parametrize("grid,bits", sorted(AUTO))
@pytest.mark.parametrize("inf", [512, 96])
def test_auto_type_is_exact_and_tightest(grid, bits, inf):
    qw = random_qweight(grid, bits, 8, inf, -1, seed=bits + inf)
    m, note = choose(qw, "auto", "layer")
    assert m.type == AUTO[(grid, bits)][0 if inf % 256 == 0 else 1]
    assert note is None
    got = dequantize_mapped(m.blocks, m.type, qw.shape)
    assert np.abs(got - qw.dequantize().numpy()).max() == 0.0


@pytest.mark.parametrize("grid,bits,group", [("lsq", 4, 32), ("lsq", 4, 64), ("lsq", 3, 256), ("seq", 2, 256),
                                             ("ternary", 2, 64), ("affine", 4, 32), ("affine", 3, 64)])
def test_grouped_weights_are_exact(grid, bits, group):
    qw = random_qweight(grid, bits, 6, 512, group, seed=group)
    m, _ = choose(qw, "auto", "layer")
    assert np.abs(dequantize_mapped(m.blocks, m.type, qw.shape) - qw.dequantize().numpy()).max() == 0.0
    if group < 256 and grid in ("lsq", "seq", "ternary") and bits < 4:
        assert m.type in ("q4_0", "q8_0")  # one scale per 256 block cannot hold smaller groups


def test_every_type_that_can_hold_a_grid_is_exact():
    for (grid, bits) in AUTO:
        qw = random_qweight(grid, bits, 4, 256, -1, seed=7)
        for t in TYPES:
            m = map_weight(t, qw)
            if m is not None:
                got = dequantize_mapped(m.blocks, t, qw.shape)
                assert np.abs(got - qw.dequantize().numpy()).max() == 0.0, (grid, bits, t)
    # tq2_0 asked for explicitly holds ternary natively
    m, note = choose(random_qweight("ternary", 2, 4, 256, -1, seed=1), "tq2_0", "x")
    assert (m.type, m.container, note) == ("tq2_0", "native", None)


def test_requested_type_falls_back_with_a_note_or_is_refused():
    qw = random_qweight("lsq", 3, 4, 96, -1, seed=3)  # 96 is not a multiple of 256
    m, note = choose(qw, "q3_k", "model.layers.0.mlp.up_proj")
    assert m.type == "q4_0" and "q3_k does not fit" in note and "up_proj" in note
    with pytest.raises(ConfigError, match=r"--type q2_k cannot hold lsq 4-bit.*q4_0"):
        choose(random_qweight("lsq", 4, 4, 256, -1, seed=3), "q2_k", "x")
    with pytest.raises(ConfigError, match="no GGUF type holds"):
        choose(random_qweight("lsq", 4, 4, 48, -1, seed=3), "auto", "x")  # 48 % 32 != 0


def test_qk_row_permutation_matches_llamacpp_convention():
    # per head, rows (0..h/2-1 | h/2..h-1) are interleaved: 0, h/2, 1, h/2+1, ...
    x = torch.arange(16).reshape(16, 1)
    p = permute_rows(x, 2).flatten().tolist()
    assert p == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    qw = random_qweight("lsq", 4, 16, 64, 32, seed=0)
    assert torch.equal(permute_qw(qw, 2).dequantize(), permute_rows(qw.dequantize(), 2))


# ---------------------------------------------------------------------------------------------
# whole exports of tiny checkpoints


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    from tinymodels import make_model_dir

    root = tmp_path_factory.mktemp("gguf-bases")
    return {
        ("llama", 256): make_model_dir(root / "llama256", "llama", seed=0, hidden=256, inter=512),
        ("qwen2", 256): make_model_dir(root / "qwen256", "qwen2", seed=1, hidden=256, inter=512),
        # rows of 96: containers
        ("llama", 96): make_model_dir(root / "llama96", "llama", seed=2, hidden=96, inter=256),
    }


CASES = [
    ("llama", 256, "lsq", 4, -1), ("llama", 256, "lsq", 3, -1), ("llama", 256, "seq", 2, -1),
    ("llama", 256, "ternary", 2, -1), ("llama", 256, "binary", 1, -1), ("llama", 256, "lsq", 8, -1),
    ("llama", 256, "affine", 2, -1), ("llama", 256, "lsq", 4, 64),
    ("qwen2", 256, "lsq", 4, -1), ("qwen2", 256, "seq", 2, -1), ("qwen2", 256, "ternary", 2, -1),
    ("llama", 96, "lsq", 3, -1), ("llama", 96, "seq", 2, -1), ("llama", 96, "ternary", 2, -1),
]


@pytest.fixture(scope="module")
def exports(bases, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-exports")
    out = {}
    for arch, hidden, grid, bits, group in CASES:
        tag = f"{arch}{hidden}-{grid}{bits}-g{group}"
        ck = make_checkpoint(bases[(arch, hidden)], root / f"ck-{tag}", grid, bits, group)
        res = export("gguf", ck, root / tag / "model.gguf")
        out[(arch, hidden, grid, bits, group)] = (ck, res)
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_export_reads_back_exactly(exports, case):
    from gguf import GGUFReader

    ck, res = exports[case]
    arch, hidden, grid, bits, group = case
    m = json.loads((res.out.parent / "winq-export.json").read_text())
    assert m["format"] == "gguf" and m["artifact"] == "model.gguf"
    assert m["summary"]["max_abs_err"] == 0.0 and m["summary"]["tensors"] == len(m["tensors"]) > 0
    assert all(t["max_abs_err"] == 0.0 for t in m["tensors"])
    r = GGUFReader(str(res.out))
    fields = {f.name: f for f in r.fields.values()}
    assert bytes(fields["general.architecture"].parts[-1]).decode() == arch
    meta = json.loads(bytes(fields["winq.export"].parts[-1]).decode())
    assert meta["winq"]["quant"]["grid"] == grid and meta["winq"]["quant"]["bits"] == bits
    names = {t.name for t in r.tensors}
    assert "output.weight" not in names  # tied embeddings: llama.cpp reuses token_embd
    assert {"token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight"} <= names
    if arch == "qwen2":
        assert "blk.0.attn_q.bias" in names
    if hidden == 96:  # rows of 96 cannot use 256-blocks; down_proj (in 256) still can
        types = {t["name"].split(".")[-1]: t["container"].split(":")[0]
                 for t in m["tensors"] if ".layers.0." in t["name"]}
        assert types["q_proj"] == "Q4_0"
        assert types["down_proj"] == AUTO[(grid, bits)][0].upper()


def test_export_refuses_unknown_options_and_leaves_nothing(bases, tmp_path):
    ck = make_checkpoint(bases[("llama", 256)], tmp_path / "ck", "lsq", 4, -1)
    out = tmp_path / "e" / "model.gguf"
    with pytest.raises(ConfigError, match="unknown GGUF type 'q7_k'"):
        export("gguf", ck, out, type="q7_k")
    with pytest.raises(ConfigError, match="unknown option block_size; options are type, keep"):
        export("gguf", ck, out, block_size=32)
    with pytest.raises(ConfigError, match="choose one of auto, f16, f32, q8_0"):
        export("gguf", ck, out, keep="bf16")
    with pytest.raises(ConfigError, match="cannot hold lsq 4-bit"):
        export("gguf", ck, out, type="tq1_0")
    assert not out.exists() and not (tmp_path / "e" / "winq-export.json").exists()
    assert not [p for p in (tmp_path / "e").glob(".*")]  # no temporary leftovers


def test_export_is_atomic_and_guards_existing_files(bases, tmp_path, monkeypatch):
    from winq.exporters import gguf as G

    ck = make_checkpoint(bases[("llama", 256)], tmp_path / "ck", "lsq", 4, -1)
    folder = tmp_path / "e"
    out = folder / "model.gguf"
    orig = G.GGUFExporter.verify

    def broken(self, f, written, reference):  # a reader that sees one flipped value
        v = orig(self, f, written, reference)
        v.errors[next(iter(v.errors))] = 0.5
        return v

    monkeypatch.setattr(G.GGUFExporter, "verify", broken)
    with pytest.raises(ExportError, match="does not read back exactly"):
        export("gguf", ck, out)
    assert not folder.exists() or not any(folder.iterdir())
    monkeypatch.setattr(G.GGUFExporter, "verify", orig)
    export("gguf", ck, out)
    with pytest.raises(ExportError, match="--overwrite"):
        export("gguf", ck, out)
    export("gguf", ck, out, overwrite=True, keep="f32")
    with pytest.raises(ExportError, match="another export"):
        export("gguf", ck, folder / "other.gguf")
    stranger = tmp_path / "s" / "model.gguf"
    stranger.parent.mkdir()
    stranger.write_bytes(b"GGUF not ours")
    with pytest.raises(ExportError, match="not a winq export"):
        export("gguf", ck, stranger, overwrite=True)
    assert stranger.read_bytes() == b"GGUF not ours"


def test_keep_options_for_float_tensors(bases, tmp_path):
    from gguf import GGUFReader

    ck = make_checkpoint(bases[("llama", 256)], tmp_path / "ck", "lsq", 4, -1)
    for keep, want in (("f32", "F32"), ("q8_0", "Q8_0"), ("f16", "F16")):
        res = export("gguf", ck, tmp_path / keep / "model.gguf", keep=keep)
        t = {x.name: x.tensor_type.name for x in GGUFReader(str(res.out)).tensors}
        assert t["token_embd.weight"] == want and t["output_norm.weight"] == "F32"
        fl = {f["name"]: f for f in res.manifest["float_tensors"]}
        assert (fl["token_embd.weight"]["max_abs_err"] == 0.0) == (keep == "f32")


def test_unsupported_architecture_and_tokenizer_are_refused(tmp_path):
    from winq.exporters.gguf_meta import _pre_tokenizer, arch_of

    class Cfg:
        architectures = ["GPT2LMHeadModel"]
        model_type = "gpt2"

    with pytest.raises(ConfigError, match="supports Llama, Mistral, Qwen2, Qwen3"):
        arch_of(Cfg())
    with pytest.raises(ConfigError, match="no known llama.cpp name"):
        _pre_tokenizer({"pre_tokenizer": {"type": "Whitespace"}}, "llama")
    assert _pre_tokenizer({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}, "llama") == "gpt-2"


# ---------------------------------------------------------------------------------------------
# the real consumer: llama.cpp


def _ppl(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return math.exp(torch.nn.functional.cross_entropy(logits[:-1].double(), ids[1:]).item())


def check_llamacpp_matches_fake_quant(ck, gguf_file, threads: int = 2) -> dict:
    """Run 200 tokens through llama.cpp and the fake-quant model (float tensors as the export stores them)
    and assert the thresholds below; returns the measured figures."""
    from tinymodels import synthetic_text
    from transformers import AutoTokenizer

    from winq.runtime.llamacpp import load_llamacpp

    tok = AutoTokenizer.from_pretrained(str(ck))
    ids = torch.tensor(tok(synthetic_text(60, seed=5))["input_ids"][:200])
    net, _ = fake_quant_reference(ck)
    with torch.no_grad():
        ref = net(input_ids=ids[None]).logits[0]
    got = load_llamacpp(gguf_file, threads=threads, n_ctx=256)(ids)
    assert got.shape == ref.shape
    top2 = ref.topk(2, dim=-1).values
    confident = (top2[:, 0] - top2[:, 1]) > 0.1
    facts = {"max_dlogit": float((got - ref).abs().max()), "ppl_rel": _ppl(got, ids) / _ppl(ref, ids) - 1,
             "top1": float((got.argmax(-1) == ref.argmax(-1)).float().mean()), "confident": int(confident.sum())}
    assert facts["max_dlogit"] < 0.1, facts
    assert abs(facts["ppl_rel"]) < 5e-3, facts
    assert confident.sum() > 20
    assert torch.equal(got.argmax(-1)[confident], ref.argmax(-1)[confident])
    return facts


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_llamacpp_runs_the_export_like_the_fake_quant_model(exports, case):
    """Weights are bit-exact; llama.cpp quantizes activations to 8 bits inside its dot products
    (Q8_0 / Q8_K), so logits differ slightly. Measured on these tiny models: relative ppl
    difference at most 6.3e-4 in magnitude (seq2 on qwen2) and max |dlogit| 0.024 over CASES;
    we allow 5e-3. Wherever the fake-quant model's top-1 leads its runner-up by more than 0.1
    (4x the largest logit error), llama.cpp must pick the same token."""
    need_llamacpp()
    ck, res = exports[case]
    check_llamacpp_matches_fake_quant(ck, res.out)


def _tokenizer_dir(tmp_path: Path, kind: str) -> Path:
    """A tiny model whose tokenizer uses the given pre-tokenizer (gpt-2, smollm or qwen2 style)."""
    from tinymodels import make_config, synthetic_text
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    if kind == "llama-spm":
        return _spm_tokenizer_dir(tmp_path)
    if kind == "smollm":
        pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    elif kind == "qwen2":
        pat = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
        pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pat), behavior="isolated"),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre
    tk.decoder = decoders.ByteLevel()
    text = synthetic_text(300) + "\nIn 2024, 1,234 people paid $56.78 (about 9%) for it's 'x' -- don't!\n"
    tk.train_from_iterator(text.splitlines(), trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                                   initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    arch = "qwen2" if kind == "qwen2" else "llama"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(arch, len(tok), hidden=64, inter=128), dtype=torch.float32)
    d = tmp_path / kind
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


def _spm_tokenizer_dir(tmp_path: Path) -> Path:
    """A Llama-2-style fast tokenizer: BPE with byte fallback, "▁" normalizer, no pre-tokenizer."""
    from tinymodels import make_config, synthetic_text
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    text = synthetic_text(300) + "\nIn 2024, 1,234 people paid $56.78 (about 9%) for it's 'x' -- don't!\n"
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens])
    tk.train_from_iterator(text.splitlines(), trainer)
    from tokenizers.processors import TemplateProcessing

    tk.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config("llama", len(tok), hidden=64, inter=128), dtype=torch.float32)
    d = tmp_path / "llama-spm"
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


@pytest.mark.parametrize("kind", ["gpt-2", "smollm", "qwen2", "llama-spm"])
def test_llamacpp_tokenizes_like_transformers(tmp_path, kind):
    need_llamacpp()
    from transformers import AutoTokenizer

    from winq.runtime.llamacpp import tokenize

    base = _tokenizer_dir(tmp_path, kind)
    ck = make_checkpoint(base, tmp_path / "ck", "lsq", 4, -1)
    res = export("gguf", ck, tmp_path / "e" / "model.gguf")
    info = res.manifest["info"]
    assert (info["tokenizer"], info["pre_tokenizer"]) == (("llama",
                                                           "default") if kind == "llama-spm" else ("gpt2", kind))
    tok = AutoTokenizer.from_pretrained(str(ck))
    if kind == "llama-spm":
        assert info["add_bos"] is True
        s = "the market rose"
        assert tokenize(res.out, s, add_bos=True) == tok(s)["input_ids"]
    sentences = [
        "the market rose sharply today",
        "In 2024, 1,234 investors paid $56.78 (about 9%) -- don't they?",
        "  leading spaces,\ttabs\tand\nnew lines\n\n",
        "naïve café — “quotes” 日本語 😀 123456789",
        "it's we'll they've I'm x<|endoftext|>y",
    ]
    for s in sentences:
        assert tokenize(res.out, s) == tok(s, add_special_tokens=False)["input_ids"], s
