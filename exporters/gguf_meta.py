"""llama.cpp metadata of a GGUF export: architecture, hyperparameters and the tokenizer.

    spec = arch_spec(config)                      # the llama.cpp architecture and how its tensors are stored
    add_hparams(writer, config, spec.name)        # {arch}.{context_length, embedding_length, ...}
    add_tokenizer(writer, folder, tok, config, spec.name)

The architectures (`ARCHS`, checked against the llama.cpp that llama-cpp-python 0.3.36 vendors:
its convert_hf_to_gguf conversion/ modules and src/models/*.cpp):

| HF class                              | llama.cpp | tensors as stored                                           |
|---------------------------------------|-----------|-------------------------------------------------------------|
| LlamaForCausalLM, MistralForCausalLM  | llama     | q/k rows permuted for the NORM rope                         |
| Qwen2ForCausalLM                      | qwen2     | as in HF (NEOX rope), q/k/v biases                          |
| Qwen3ForCausalLM                      | qwen3     | as in HF (NEOX rope); q_norm/k_norm -> attn_q_norm/k_norm   |
| Gemma3ForCausalLM (text)              | gemma3    | every *norm.weight stored as 1 + w (Gemma's RMSNorm)        |
| Phi3ForCausalLM                       | phi3      | fused qkv_proj -> attn_qkv, gate_up_proj -> ffn_up (NEOX)   |
| SmolLM3ForCausalLM                    | smollm3   | q/k rows permuted (NORM rope); NoPE every 4th layer         |

What llama.cpp fixes in code instead of reading from the file is checked and refused when the
checkpoint differs (Gemma 3's attention scale, SmolLM3's NoPE period, Phi-3's disabled sliding window is
a note, sliding layers on architectures without them).

Byte-level BPE tokenizers become llama.cpp's `gpt2` model with its pre-tokenizer name (gpt-2,
smollm, qwen2, llama-bpe); SentencePiece-style BPE with byte fallback becomes `llama` with scores from the
merge ranks (gguf-py has no such conversion: it is ours, and tested to tokenize as transformers does).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from winq.errors import ConfigError

OTHER_FORMATS = "export it with --format gptq or --format onnx, which take any Hugging Face causal LM"


@dataclass(frozen=True)
class ArchSpec:
    """How one llama.cpp architecture stores a Hugging Face model."""

    name: str  # llama.cpp's architecture (general.architecture)
    label: str  # for messages
    permute_qk: bool = False  # NORM rope: q/k rows interleaved per head (convert_hf_to_gguf's permute)
    norm_shift: float = 0.0  # added to every *norm.weight (Gemma's RMSNorm multiplies by 1 + w)
    sliding: bool = False  # llama.cpp reads a per-layer sliding-window pattern for this architecture


ARCHS = {  # HF class -> spec
    "LlamaForCausalLM": ArchSpec("llama", "Llama", permute_qk=True),
    "MistralForCausalLM": ArchSpec("llama", "Mistral", permute_qk=True),
    "Qwen2ForCausalLM": ArchSpec("qwen2", "Qwen2"),
    "Qwen3ForCausalLM": ArchSpec("qwen3", "Qwen3"),
    "Gemma3ForCausalLM": ArchSpec("gemma3", "Gemma 3 (text)", norm_shift=1.0, sliding=True),
    "Phi3ForCausalLM": ArchSpec("phi3", "Phi-3"),
    "SmolLM3ForCausalLM": ArchSpec("smollm3", "SmolLM3", permute_qk=True),
}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
               "smollm3": "SmolLM3ForCausalLM"}
SUPPORTED = "Llama, Mistral, Qwen2, Qwen3, Gemma 3 (text), Phi-3 and SmolLM3"


def config_value(config, name, default=None):
    v = getattr(config, name, None)
    return default if v is None else v


def arch_spec(config) -> ArchSpec:
    """The llama.cpp architecture of a checkpoint's config, or a ConfigError naming the formats that take it."""
    archs = list(getattr(config, "architectures", None) or [])
    for a in archs:
        if a in ARCHS:
            return ARCHS[a]
    mt = getattr(config, "model_type", "")
    if mt in MODEL_TYPES:
        return ARCHS[MODEL_TYPES[mt]]
    raise ConfigError(
        f"GGUF export supports {SUPPORTED} models (llama.cpp architectures "
        f"{', '.join(sorted({s.name for s in ARCHS.values()}))}); this checkpoint is "
        f"{', '.join(archs) or mt or 'unknown'}: {OTHER_FORMATS}"
    )


def arch_of(config) -> str:
    return arch_spec(config).name


def _rope(config, layer_type: str = "full_attention") -> tuple[float, dict | None]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    if isinstance(params.get(layer_type), dict):  # Gemma 3: one rope per layer type
        params = dict(params[layer_type])
    legacy = getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    kind = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    if kind == "default":
        return float(theta), None
    if kind in ("linear", "yarn"):
        src = {**legacy, **params}
        return float(theta), {"type": kind, "factor": float(src["factor"]),
                              "original_max_position_embeddings": src.get("original_max_position_embeddings")}
    raise ConfigError(f"rope scaling {kind!r} is not supported by the GGUF exporter: supported are default, linear, "
                      f"yarn; {OTHER_FORMATS}")


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
        if "\\p{N}{1,3}" in pat and "?[^\\s\\p{L}\\p{N}]+" in pat:
            return "llama-bpe"  # Llama 3's regex (SmolLM3): numbers in runs of up to three digits
        if "\\p{N}|" in pat and "?[^\\s\\p{L}\\p{N}]+" in pat:
            return "qwen2"  # single digits
    raise ConfigError(
        f"the tokenizer's pre-tokenizer ({' + '.join(map(str, types)) or 'none'}) has no known llama.cpp name; "
        f"supported: GPT-2 byte-level (gpt-2), digits + byte-level (smollm), Qwen2's split + byte-level (qwen2), "
        f"Llama 3's split + byte-level (llama-bpe)"
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
    for kind, setter in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                         ("pad", w.add_pad_token_id)):
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


def _layer_types(config) -> list[str]:
    n = int(config.num_hidden_layers)
    types = list(getattr(config, "layer_types", None) or [])
    return types if len(types) == n else ["full_attention"] * n


def _gemma3(w, config, facts: dict, notes: list) -> None:
    """Gemma 3 (text): sliding layers (pattern and their own rope base), soft-capping, fixed attention scale."""
    n_layer, head_dim = int(config.num_hidden_layers), facts["head_dim"]
    if config_value(config, "attn_logit_softcapping") is not None:
        raise ConfigError("llama.cpp's gemma3 has no attention soft-capping; this Gemma 3 config sets "
                          f"attn_logit_softcapping: {OTHER_FORMATS}")
    # llama.cpp scales queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for its 62-layer 27B), not by the config
    fixed = int(config.hidden_size) // facts["heads"] if n_layer == 62 else head_dim
    qpas = float(config_value(config, "query_pre_attn_scalar", fixed))
    if qpas != fixed:
        raise ConfigError(f"llama.cpp's gemma3 scales queries by 1/sqrt({fixed}); this config's query_pre_attn_scalar "
                          f"is {qpas:g}: {OTHER_FORMATS}")
    act = config_value(config, "hidden_activation", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ConfigError(f"llama.cpp's gemma3 uses the tanh GELU; this config's hidden_activation is {act}")
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    types = _layer_types(config)
    sliding = [t == "sliding_attention" for t in types]
    window = config_value(config, "sliding_window")
    if any(sliding) and window:
        local_theta, local_scaling = _rope(config, "sliding_attention")
        if local_scaling:
            raise ConfigError("llama.cpp's gemma3 applies no rope scaling on sliding layers; this config scales them")
        w.add_sliding_window(int(window))
        w.add_sliding_window_pattern(sliding)
        w.add_rope_freq_base_swa(local_theta)
        facts.update(sliding_window=int(window), sliding_layers=[i for i, x in enumerate(sliding) if x],
                     rope_theta_swa=local_theta)
    cap = config_value(config, "final_logit_softcapping")
    if cap:
        w.add_final_logit_softcapping(float(cap))
        facts["final_logit_softcapping"] = float(cap)
    facts["norm_shift"] = 1.0


def _phi3(w, config, facts: dict, notes: list) -> None:
    """Phi-3: partial rotary dimension, the original context length, llama.cpp's disabled sliding window."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    pct = float(params.get("partial_rotary_factor", config_value(config, "partial_rotary_factor", 1.0)))
    hidden, heads = int(config.hidden_size), facts["heads"]
    w.add_rope_dimension_count(int(pct * hidden) // heads)  # replaces the head_dim written before
    facts["rope_dims"] = int(pct * hidden) // heads
    orig = params.get("original_max_position_embeddings", config_value(config, "original_max_position_embeddings"))
    if orig:
        w.add_rope_scaling_orig_ctx_len(int(orig))
    window = config_value(config, "sliding_window")
    w.add_sliding_window(int(window or 0))
    if window and int(window) < facts["context_length"]:
        notes.append(f"llama.cpp runs Phi-3 without its sliding window ({window} tokens): its logits follow the "
                     f"checkpoint only for contexts of at most {window} tokens")


def _smollm3(w, config, facts: dict, notes: list) -> None:
    """SmolLM3: llama.cpp skips rope on every 4th layer (fixed in its code); the config must agree."""
    n = int(config.num_hidden_layers)
    want = [int((i + 1) % 4 != 0) for i in range(n)]
    got = [int(x) for x in (getattr(config, "no_rope_layers", None) or want)]
    if got != want:
        raise ConfigError(f"llama.cpp's smollm3 leaves out rope on every 4th layer; this config's no_rope_layers is "
                          f"{got}: {OTHER_FORMATS}")
    facts["nope_layers"] = [i for i, x in enumerate(got) if not x]


ARCH_HPARAMS = {"gemma3": _gemma3, "phi3": _phi3, "smollm3": _smollm3}


def add_hparams(w, config, arch: str) -> dict:
    hidden = int(config.hidden_size)
    n_head = int(config.num_attention_heads)
    n_kv = int(config_value(config, "num_key_value_heads", n_head))
    head_dim = int(config_value(config, "head_dim", hidden // n_head))
    ctx = int(config_value(config, "max_position_embeddings", 2048))
    theta, scaling = _rope(config)
    eps = float(config_value(config, "rms_norm_eps", 1e-6))
    spec = next(s for s in ARCHS.values() if s.name == arch)
    notes: list[str] = []
    window = config_value(config, "sliding_window")
    if not spec.sliding and "sliding_attention" in _layer_types(config) and window and int(window) < ctx:
        notes.append(f"llama.cpp's {arch} has no sliding-window layers: its logits follow the {spec.label} checkpoint "
                     f"only for contexts of at most {window} tokens")
    w.add_context_length(ctx)
    w.add_embedding_length(hidden)
    w.add_block_count(int(config.num_hidden_layers))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    if arch != "phi3":
        w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(eps)
    w.add_vocab_size(int(config.vocab_size))
    if head_dim != hidden // n_head and arch != "gemma3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if scaling:
        from gguf import RopeScalingType

        w.add_rope_scaling_type(RopeScalingType.LINEAR if scaling["type"] == "linear" else RopeScalingType.YARN)
        w.add_rope_scaling_factor(scaling["factor"])
        if scaling.get("original_max_position_embeddings"):
            w.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    facts = {"arch": arch, "context_length": ctx, "heads": n_head, "kv_heads": n_kv, "head_dim": head_dim,
             "rope_theta": theta, "rope_scaling": scaling, "rms_eps": eps,
             "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False))}
    if arch in ARCH_HPARAMS:
        ARCH_HPARAMS[arch](w, config, facts, notes)
    if notes:
        facts["notes"] = notes
    return facts
