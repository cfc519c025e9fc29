"""GGUF export for llama.cpp, written bit-exactly from `QuantizedWeight` (ARCHITECTURE §5).

    winq export --format gguf --checkpoint runs/winq --out runs/winq.gguf [--type auto] [--keep f16]

Type per quantized tensor: the tightest GGUF type that holds the grid exactly and fits the
row (`--type auto`), or the type asked for where it fits, else the tightest exact container:

| grid     | native type (row % 256 == 0)     | container when the row or group does not fit       |
|----------|----------------------------------|----------------------------------------------------|
| lsq4     | Q4_0 (d = s), row % 32           | Q8_0 (d = s)                                       |
| lsq3     | Q3_K (d = s, sub-scales 1)       | Q4_0: q' = q + 4                                   |
| lsq8     | Q8_0 (d = s)                     | -                                                  |
| seq2     | Q2_K (d = dmin = s/2, sc 2, m 3) | Q4_0: q' = 2q + 5, d = s/2                         |
| ternary  | TQ1_0 (TQ2_0 on request), d = s  | Q4_0: q' = q + 7                                   |
| binary   | TQ1_0 / TQ2_0: t = 2q, d = s/2   | Q4_0: q' = 2q + 7, d = s/2                         |
| affine2  | Q2_K (d = dmin = s, sc 1, m = z) | Q4_0 / Q8_0 where the levels fit                   |
| affine4  | Q4_1 (m = -z s, when exact)      | Q8_0 where the levels q - z fit int8               |

Blocks carry one scale, so a group must cover whole blocks (group_size % 32, or % 256 for the
K and TQ types). Rows of q_proj / k_proj are permuted for llama.cpp's `llama` rope (not for
qwen2, which uses NEOX rope); permuting rows keeps per-row and per-group quantization exact.
Everything is verified by reading the file back with gguf-py's reader and dequantizer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from winq.errors import ConfigError
from winq.qweight import QuantizedWeight

from . import Exporter, ExportError, Written, register
from .gguf_blocks import BLOCKS, encode_q2_k, encode_q3_k, encode_q4_0, encode_q4_1, encode_q8_0, encode_tq1_0, encode_tq2_0
from .manifest import FloatRecord, TensorRecord

FILE = "model.gguf"
TYPES = ("auto", "q4_0", "q3_k", "q2_k", "tq2_0", "tq1_0", "q4_1", "q8_0")
KEEP = ("f16", "f32", "q8_0")
# tightest first (bits per weight)
ORDER = ("tq1_0", "tq2_0", "q2_k", "q3_k", "q4_0", "q4_1", "q8_0")
ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}

HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


@dataclass(frozen=True)
class GGUFOptions:
    type: str = "auto"  # quantized tensors: auto (tightest exact) or a preferred GGUF type
    keep: str = "f16"  # embeddings / lm_head left in float: f16 | f32 | q8_0 (norms and biases are always f32)

    def __post_init__(self):
        if self.type not in TYPES:
            raise ConfigError(f"unknown GGUF type {self.type!r}: choose one of {', '.join(TYPES)}")
        if self.keep not in KEEP:
            raise ConfigError(f"--keep {self.keep!r} is not supported: choose one of {', '.join(KEEP)}")


# ---------------------------------------------------------------------------------------------
# mapping a QuantizedWeight onto a block type


@dataclass
class Mapped:
    type: str
    blocks: np.ndarray  # uint8 (rows, bytes per row)
    container: str  # "native" or the code mapping


def _mul(qw: QuantizedWeight) -> int:
    """1 when the zero point is an integer, 2 when it is a half-integer (seq, binary): levels x mul are integers."""
    z = qw.zero
    return 1 if torch.equal(z, torch.round(z)) else 2


def _block_scale(qw: QuantizedWeight, block: int, div: int) -> np.ndarray | None:
    """float16 (rows, in // block): s / div per block, or None when s / div is not exact in float16."""
    s = qw.scale.to(torch.float32)
    d = (s / div).to(torch.float16)
    if not torch.equal(d.to(torch.float32) * div, s):
        return None
    rep = qw.group_size // block
    return d.repeat_interleave(rep, dim=1).numpy()


def _expand(t: torch.Tensor, qw: QuantizedWeight, per: int) -> np.ndarray:
    """A per-group tensor (rows, G) repeated to (rows, in // per)."""
    return t.repeat_interleave(qw.group_size // per, dim=1).numpy()


def fits(t: str, qw: QuantizedWeight) -> bool:
    """Does block type t hold this layout (row length, group alignment)?"""
    block = BLOCKS[t][0]
    return qw.shape[1] % block == 0 and qw.group_size % block == 0


def can_hold(t: str, grid: str, bits: int) -> bool:
    """Can block type t hold the grid exactly at all (ignoring row length)?"""
    if t == "q8_0":
        return not (grid == "affine" and bits == 8)  # affine 8-bit levels q - z reach +-255: checked on data
    if t == "q4_0":
        return grid in ("lsq", "seq", "ternary", "binary", "affine") and bits <= 4
    if t == "q4_1":
        return grid in ("lsq", "affine") and bits == 4
    if t == "q3_k":
        return grid == "lsq" and bits == 3
    if t == "q2_k":
        return grid in ("seq", "ternary", "binary", "affine") and bits <= 2
    if t in ("tq1_0", "tq2_0"):
        return grid in ("ternary", "binary")
    return False


def map_weight(t: str, qw: QuantizedWeight) -> Mapped | None:
    """The blocks of qw as type t, or None when t cannot hold these values exactly."""
    if not fits(t, qw) or not can_hold(t, qw.grid, qw.bits) and not (t == "q8_0" and qw.grid == "affine"):
        return None
    block = BLOCKS[t][0]
    mul = _mul(qw)
    lev = (qw.levels * mul).round().to(torch.int32)  # integer levels, exact (levels are k/2)
    codes = qw.codes.to(torch.int32)
    lo, hi = int(lev.min()), int(lev.max())
    if t == "q8_0":
        if lo < -128 or hi > 127:
            return None
        d = _block_scale(qw, block, mul)
        if d is None:
            return None
        desc = "native" if qw.grid == "lsq" and qw.bits == 8 else (f"int8 q' = {mul}(q - z), d = s/{mul}" if mul > 1 else "int8 q' = q - z")
        return Mapped(t, encode_q8_0(lev.numpy().astype(np.int8), d), desc)
    if t == "q4_0":
        if lo < -8 or hi > 7:
            return None
        d = _block_scale(qw, block, mul)
        if d is None:
            return None
        native = qw.grid == "lsq" and qw.bits == 4
        return Mapped(t, encode_q4_0((lev + 8).numpy().astype(np.uint8), d),
                      "native" if native else f"q' = {mul}(q - z) + 8" + (f", d = s/{mul}" if mul > 1 else ""))
    if t == "q4_1":
        if mul != 1:
            return None
        s = qw.scale.to(torch.float32)
        m = (-qw.zero * s).to(torch.float16)
        if not torch.equal(m.to(torch.float32), -qw.zero * s):
            return None
        return Mapped(t, encode_q4_1(codes.numpy().astype(np.uint8), _expand(qw.scale, qw, block), _expand(m, qw, block)),
                      "native" if qw.grid == "affine" else "q' = q, m = -z s")
    if t == "q3_k":
        if mul != 1 or lo < -4 or hi > 3:
            return None
        return Mapped(t, encode_q3_k((lev + 4).numpy().astype(np.uint8), _expand(qw.scale, qw, block)), "native")
    if t == "q2_k":
        zm = (qw.zero * mul).round()
        if int(codes.max()) > 3 or float(zm.min()) < 0 or float(zm.max()) > 15:
            return None
        d = _block_scale(qw, block, mul)
        if d is None:
            return None
        sc = np.full((qw.shape[0], qw.shape[1] // 16), mul, dtype=np.uint8)
        m = _expand(zm.to(torch.uint8), qw, 16)
        native = qw.grid in ("seq", "affine")
        desc = "native" if native else f"q' = q, sc = {mul}, m = {mul}z" + (f", d = s/{mul}" if mul > 1 else "")
        return Mapped(t, encode_q2_k(codes.numpy().astype(np.uint8), d, d, sc, m), desc)
    if t in ("tq1_0", "tq2_0"):
        if lo < -1 or hi > 1:
            return None
        d = _block_scale(qw, block, mul)
        if d is None:
            return None
        tr = (lev + 1).numpy().astype(np.uint8)
        enc = encode_tq1_0 if t == "tq1_0" else encode_tq2_0
        return Mapped(t, enc(tr, d), "native" if qw.grid == "ternary" else f"t = {mul}(q - z) + 1, d = s/{mul}")
    return None


def choose(qw: QuantizedWeight, want: str, name: str) -> tuple[Mapped, str | None]:
    """(mapping, note) for one tensor; ConfigError when no GGUF type holds it exactly."""
    holders = [t for t in ORDER if can_hold(t, qw.grid, qw.bits)]
    if want != "auto" and want not in holders:
        raise ConfigError(
            f"--type {want} cannot hold {qw.grid} {qw.bits}-bit weights exactly: "
            f"choose auto or one of {', '.join(holders) or '(none)'}"
        )
    order = ([want] if want != "auto" else []) + [t for t in ORDER if t != want]
    for t in order:
        m = map_weight(t, qw)
        if m is not None:
            note = None
            if want != "auto" and t != want:
                note = (f"{name}: {want} does not fit this {qw.shape[0]}x{qw.shape[1]} layer (row or group {qw.group_size} "
                        f"not a multiple of {BLOCKS[want][0]}, or values outside its range): stored exactly as {t}")
            return m, note
    raise ConfigError(
        f"{name}: no GGUF type holds {qw.grid} {qw.bits}-bit weights of shape {qw.shape[0]}x{qw.shape[1]} "
        f"(group {qw.group_size}) exactly (rows and groups must be multiples of 32, levels must fit int8): "
        f"export with --format gptq or --format onnx instead"
    )


def dequantize_mapped(blocks: np.ndarray, t: str, shape: tuple[int, int]) -> np.ndarray:
    """float32 (rows, cols) from a written tensor, through gguf-py's own dequantizer."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return np.asarray(dequantize(blocks, GGMLQuantizationType[t.upper()]), dtype=np.float32).reshape(shape)


# ---------------------------------------------------------------------------------------------
# model description


def permute_rows(x, n_head: int):
    """llama.cpp's q/k row order for the `llama` (NORM) rope: per head, interleave the two halves."""
    rows = x.shape[0]
    return x.reshape(n_head, 2, rows // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def permute_qw(qw: QuantizedWeight, n_head: int) -> QuantizedWeight:
    return QuantizedWeight(permute_rows(qw.codes, n_head), permute_rows(qw.scale, n_head), permute_rows(qw.zero, n_head),
                           qw.grid, qw.bits, qw.group_size)


def _cfg(config, name, default=None):
    v = getattr(config, name, None)
    return default if v is None else v


def arch_of(config) -> str:
    archs = list(getattr(config, "architectures", None) or [])
    for a in archs:
        if a in ARCHS:
            return ARCHS[a]
    mt = getattr(config, "model_type", "")
    if mt in ("llama", "mistral"):
        return "llama"
    if mt == "qwen2":
        return "qwen2"
    raise ConfigError(
        f"GGUF export supports Llama, Mistral and Qwen2 models (llama.cpp architectures llama, qwen2); "
        f"this checkpoint is {', '.join(archs) or mt or 'unknown'}"
    )


def gguf_name(hf: str, arch: str) -> str | None:
    """GGUF tensor name of a HF state-dict key (None for keys llama.cpp does not take, e.g. rotary buffers)."""
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    m = re.match(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$", hf)
    if m and m.group(2) in HF_TO_GGUF:
        return f"blk.{m.group(1)}.{HF_TO_GGUF[m.group(2)]}.{m.group(3)}"
    return None


def _rope(config) -> tuple[float, dict | None]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    kind = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    if kind == "default":
        return float(theta), None
    if kind in ("linear", "yarn"):
        src = {**legacy, **params}
        return float(theta), {"type": kind, "factor": float(src["factor"]),
                              "original_max_position_embeddings": src.get("original_max_position_embeddings")}
    raise ConfigError(f"rope scaling {kind!r} is not supported by the GGUF exporter: supported are default, linear, yarn")


def _pre_tokenizer(tj: dict, arch: str) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json."""
    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [p.get("type") for p in parts]
    if types == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if types == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        pat = (parts[0].get("pattern") or {}).get("Regex", "")
        if "\\p{N}" in pat and "?[^\\s\\p{L}\\p{N}]+" in pat:
            return "qwen2"
    raise ConfigError(
        f"the tokenizer's pre-tokenizer ({' + '.join(map(str, types)) or 'none'}) has no known llama.cpp name; "
        f"supported: GPT-2 byte-level (gpt-2), digits + byte-level (smollm), Qwen2's split + byte-level (qwen2)"
    )


def add_tokenizer(w, folder: Path, tokenizer, config, arch: str) -> dict:
    """Write the byte-level BPE vocabulary, merges and special tokens; returns facts for the manifest."""
    from gguf import TokenType

    tj_path = Path(folder) / "tokenizer.json"
    if not tj_path.is_file():
        raise ConfigError(f"{folder} has no tokenizer.json: GGUF export needs a fast (tokenizers) BPE tokenizer")
    tj = json.loads(tj_path.read_text())
    model = tj.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback") and _is_spm_normalizer(tj):
        return _add_spm_tokenizer(w, tj, tokenizer, config)
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ConfigError(
            f"GGUF export writes byte-level BPE tokenizers (gpt2 style) and SentencePiece-style BPE with byte "
            f"fallback (llama style); this one is {model.get('type')}"
            f"{' with byte fallback but without the SentencePiece normalizer' if model.get('byte_fallback') else ''}"
        )
    pre = _pre_tokenizer(tj, arch)
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    for a in added.values():
        vocab[a["content"]] = a["id"]
    n_vocab = int(config.vocab_size)
    by_id: dict[int, str] = {i: t for t, i in vocab.items()}
    if max(by_id) >= n_vocab:
        raise ConfigError(f"tokenizer has ids up to {max(by_id)} but the model's vocab_size is {n_vocab}")
    tokens, types = [], []
    for i in range(n_vocab):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif t in added:
            tokens.append(t)
            types.append(TokenType.CONTROL if added[t].get("special") else TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    special = _add_special(w, tokenizer, config)
    return {"tokenizer": "gpt2", "pre_tokenizer": pre, "n_tokens": n_vocab, "merges": len(merges), **special}


def _add_special(w, tokenizer, config) -> dict:
    """Special token ids, add_bos / add_eos as the HF tokenizer does, the chat template."""
    special = {}
    for kind, setter in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id), ("pad", w.add_pad_token_id)):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if tid is None:
            tid = getattr(config, f"{kind}_token_id", None)
        if isinstance(tid, list):
            tid = tid[0] if tid else None
        if tid is not None:
            setter(int(tid))
            special[kind] = int(tid)
    probe = "hello"
    with_sp = tokenizer(probe)["input_ids"]
    without = tokenizer(probe, add_special_tokens=False)["input_ids"]
    add_bos = bool(len(with_sp) > len(without) and with_sp[0] == special.get("bos"))
    add_eos = bool(len(with_sp) > len(without) and with_sp[-1] == special.get("eos"))
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(add_eos)
    tmpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tmpl, str) and tmpl:
        w.add_chat_template(tmpl)
    return {"add_bos": add_bos, "add_eos": add_eos, **{f"{k}_id": v for k, v in special.items()}}


def _is_spm_normalizer(tj: dict) -> bool:
    """Llama-style fast tokenizers: normalizer prepends "▁" and turns spaces into "▁", no pre-tokenizer."""
    norm = tj.get("normalizer") or {}
    parts = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    kinds = {p.get("type") for p in parts}
    return "Prepend" in kinds and "Replace" in kinds and not tj.get("pre_tokenizer")


def _add_spm_tokenizer(w, tj: dict, tokenizer, config) -> dict:
    """SentencePiece-style BPE (byte fallback): llama.cpp's `llama` tokenizer model.

    llama.cpp merges the adjacent pair whose merged token has the highest score; Hugging Face
    applies merges by rank. Scoring every token -(rank of the merge that makes it) (single
    characters and byte tokens below every merge) gives both the same order."""
    from gguf import TokenType

    model = tj["model"]
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    for a in added.values():
        vocab[a["content"]] = a["id"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    rank = {}
    for i, m in enumerate(merges):
        a, b = m.split(" ", 1)
        rank.setdefault(a + b, i)
    n_vocab = int(config.vocab_size)
    by_id = {i: t for t, i in vocab.items()}
    if max(by_id) >= n_vocab:
        raise ConfigError(f"tokenizer has ids up to {max(by_id)} but the model's vocab_size is {n_vocab}")
    unk = model.get("unk_token")
    tokens, scores, types = [], [], []
    floor = -float(len(merges) + 1)
    for i in range(n_vocab):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]"), scores.append(floor - 1), types.append(TokenType.UNUSED)
            continue
        tokens.append(t)
        scores.append(-float(rank[t]) if t in rank else floor)
        if t in added:
            types.append(TokenType.CONTROL if added[t].get("special") else TokenType.USER_DEFINED)
        elif t == unk:
            types.append(TokenType.UNKNOWN)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(True)
    special = _add_special(w, tokenizer, config)
    return {"tokenizer": "llama", "pre_tokenizer": "default", "n_tokens": n_vocab, "merges": len(merges), **special}


def add_hparams(w, config, arch: str) -> dict:
    hidden = int(config.hidden_size)
    n_head = int(config.num_attention_heads)
    n_kv = int(_cfg(config, "num_key_value_heads", n_head))
    head_dim = int(_cfg(config, "head_dim", hidden // n_head))
    ctx = int(_cfg(config, "max_position_embeddings", 2048))
    theta, scaling = _rope(config)
    eps = float(_cfg(config, "rms_norm_eps", 1e-6))
    w.add_context_length(ctx)
    w.add_embedding_length(hidden)
    w.add_block_count(int(config.num_hidden_layers))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(eps)
    w.add_vocab_size(int(config.vocab_size))
    if head_dim != hidden // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if scaling:
        from gguf import RopeScalingType

        w.add_rope_scaling_type(RopeScalingType.LINEAR if scaling["type"] == "linear" else RopeScalingType.YARN)
        w.add_rope_scaling_factor(scaling["factor"])
        if scaling.get("original_max_position_embeddings"):
            w.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    return {"arch": arch, "context_length": ctx, "heads": n_head, "kv_heads": n_kv, "head_dim": head_dim,
            "rope_theta": theta, "rope_scaling": scaling, "rms_eps": eps, "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False))}


# ---------------------------------------------------------------------------------------------
# the exporter


def _float_tensors(model, quant: set[str]) -> dict[str, torch.Tensor]:
    owned = {f"{n}.{k}" for n in quant for k in ("weight", "alpha", "zero_point")}
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in owned}


def _float_array(name: str, t: torch.Tensor, keep: str):
    """(array, raw type or None, dtype name, max abs err) for a float tensor."""
    t32 = t.to(torch.float32)
    if t.dim() == 1 or name.endswith(".bias") or "norm" in name:
        return t32.numpy(), None, "f32", 0.0
    if keep == "f32":
        return t32.numpy(), None, "f32", 0.0
    if keep == "q8_0" and t.shape[-1] % 32 == 0:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize, quantize

        q = quantize(t32.numpy(), GGMLQuantizationType.Q8_0)
        err = float(np.abs(dequantize(q, GGMLQuantizationType.Q8_0) - t32.numpy()).max())
        return q, GGMLQuantizationType.Q8_0, "q8_0", err
    h = t32.to(torch.float16)
    return h.numpy(), None, "f16", float((h.to(torch.float32) - t32).abs().max())


def write_gguf(path: Path, model, qws: dict[str, QuantizedWeight], tokenizer, folder: Path, opt: GGUFOptions,
               meta: dict | None = None, float_weights: bool = False) -> Written:
    """Write a complete llama.cpp model file. float_weights=True stores the quantized layers' dequantized
    weights in `opt.keep` precision instead (the F16 baseline of `winq bench`; not an exact export)."""
    import gguf

    config = model.config
    arch = arch_of(config)
    n_head = int(config.num_attention_heads)
    n_kv = int(_cfg(config, "num_key_value_heads", n_head))
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(str(_cfg(config, "_name_or_path", "") or "winq model").split("/")[-1] or "winq model")
    hp = add_hparams(w, config, arch)
    tk = add_tokenizer(w, folder, tokenizer, config, arch)
    if meta is not None:
        w.add_string("winq.export", json.dumps(meta, sort_keys=True))
    floats = _float_tensors(model, set(qws))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    quant_names = {f"{n}.weight": n for n in qws}
    records, frecs, notes, layout = [], [], [], {}
    keys = list(floats) + [k for k in quant_names if k not in floats]
    if tied and "lm_head.weight" in floats and "lm_head.weight" not in quant_names:
        keys.remove("lm_head.weight")  # llama.cpp reuses token_embd when `output` is absent
    order = sorted(keys, key=lambda k: (0 if "embed" in k else 2 if k.startswith("lm_head") or k == "model.norm.weight" else 1, _layer_key(k)))
    for key in order:
        gname = gguf_name(key, arch)
        if gname is None:
            if "rotary_emb" in key:
                continue
            raise ConfigError(f"tensor {key} has no place in a llama.cpp {arch} model; GGUF export covers Llama/Mistral/Qwen2 layouts")
        heads = n_head if ".q_proj." in key else n_kv if ".k_proj." in key else None
        if key in quant_names:
            mod = quant_names[key]
            qw = qws[mod]
            if heads and arch == "llama":
                qw = permute_qw(qw, heads)
            if float_weights:
                arr, raw, dt, err = _float_array(key, qw.dequantize(), opt.keep)
                w.add_tensor(gname, arr, raw_dtype=raw)
                continue
            m, note = choose(qw, opt.type, mod)
            if note:
                notes.append(note)
            w.add_tensor(gname, m.blocks, raw_dtype=gguf.GGMLQuantizationType[m.type.upper()])
            nbytes = int(m.blocks.nbytes)
            layout[gname] = (mod, m.type, heads if arch == "llama" else None)
            records.append(TensorRecord(
                name=mod, grid=qw.grid, bits=qw.bits, container_bits=_container_bits(m.type), container=f"{m.type.upper()}: {m.container}",
                group_size=qw.group_size, shape=tuple(qw.shape), bytes=nbytes, bits_per_weight=round(8 * nbytes / qw.codes.numel(), 4),
            ))
        else:
            t = floats[key]
            if heads and arch == "llama" and t.dim() >= 1:
                t = permute_rows(t, heads)
            arr, raw, dt, err = _float_array(key, t, opt.keep)
            w.add_tensor(gname, arr, raw_dtype=raw)
            frecs.append(FloatRecord(name=gname, dtype=dt, shape=tuple(t.shape), max_abs_err=err))
    if tied and "lm_head.weight" in quant_names:
        notes.append("the quantized lm_head is written as its own `output` tensor; token_embd stays float")
    w.add_file_type(_file_type(records, opt))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    info = {"file": path.name, "type": opt.type, "keep": opt.keep, **hp, **tk,
            "types": sorted({r.container.split(":")[0] for r in records}), "layout": layout}
    return Written(tensors=records, floats=frecs, notes=notes, info=info)


def _layer_key(k: str):
    m = re.search(r"\.(\d+)\.", k)
    return (int(m.group(1)) if m else -1, k)


def _container_bits(t: str) -> int:
    return {"tq1_0": 2, "tq2_0": 2, "q2_k": 2, "q3_k": 3, "q4_0": 4, "q4_1": 4, "q8_0": 8}[t]


def _file_type(records, opt) -> int:
    from gguf import LlamaFileType

    kinds = [r.container.split(":")[0].lower() for r in records]
    if not kinds:
        return LlamaFileType.MOSTLY_F16 if opt.keep == "f16" else LlamaFileType.ALL_F32
    most = max(set(kinds), key=kinds.count)
    return {"q4_0": LlamaFileType.MOSTLY_Q4_0, "q4_1": LlamaFileType.MOSTLY_Q4_1, "q8_0": LlamaFileType.MOSTLY_Q8_0,
            "q2_k": LlamaFileType.MOSTLY_Q2_K, "q3_k": LlamaFileType.MOSTLY_Q3_K_M, "tq1_0": LlamaFileType.MOSTLY_TQ1_0,
            "tq2_0": LlamaFileType.MOSTLY_TQ2_0}[most]


@register("gguf")
class GGUFExporter(Exporter):
    """`winq export --format gguf`: see the module docstring."""

    name = "gguf"
    Options = GGUFOptions
    single_file = FILE  # export() moves this file to --out and writes winq-export.json beside it

    def write(self, folder: Path, model, qws: dict[str, QuantizedWeight], tokenizer, checkpoint: Path, opt: GGUFOptions) -> Written:
        from winq.checkpoint import read_info

        meta = {"options": {"type": opt.type, "keep": opt.keep}, "checkpoint": str(checkpoint), "winq": read_info(checkpoint)}
        return write_gguf(Path(folder) / FILE, model, qws, tokenizer, Path(checkpoint), opt, meta=meta)

    def verify(self, folder: Path, qws: dict[str, QuantizedWeight], written: Written) -> dict[str, float]:
        """Read the file back with gguf-py and compare every quantized tensor with QuantizedWeight.dequantize()."""
        from gguf import GGUFReader

        reader = GGUFReader(str(Path(folder) / FILE))
        tensors = {t.name: t for t in reader.tensors}
        errors = {}
        for gname, (mod, t, heads) in written.info["layout"].items():
            if gname not in tensors:
                raise ExportError(f"{gname} ({mod}) is missing from the written file")
            rt = tensors[gname]
            if rt.tensor_type.name.lower() != t:
                raise ExportError(f"{gname}: written as {rt.tensor_type.name}, expected {t.upper()}")
            qw = qws[mod]
            ref = (permute_qw(qw, heads) if heads else qw).dequantize().numpy()
            got = dequantize_mapped(np.asarray(rt.data), t, ref.shape)
            errors[mod] = float(np.abs(got - ref).max()) if np.isfinite(got).all() else float("inf")
        return errors


__all__ = ["GGUFExporter", "GGUFOptions", "write_gguf", "write_f16_gguf", "choose", "map_weight", "permute_rows", "TYPES", "KEEP"]


def write_f16_gguf(checkpoint, out_file, keep: str = "f16") -> Path:
    """An F16 GGUF of the same model (every weight, quantized layers dequantized, in `keep` precision):
    the baseline `winq bench --backend llamacpp` compares against. Not an exact export; no record."""
    import os

    from winq.checkpoint import load_checkpoint
    from winq.prepare import quantized_weights

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    net, tok, _ = load_checkpoint(checkpoint)
    tmp = out_file.with_name(f".{out_file.name}.tmp{os.getpid()}")
    try:
        write_gguf(tmp, net, quantized_weights(net), tok, Path(checkpoint), GGUFOptions(keep=keep), float_weights=True)
        os.replace(tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)
    return out_file
