"""llama.cpp metadata of a GGUF export: architecture, hyperparameters and the tokenizer.

    arch = arch_of(config)                        # "llama" (Llama, Mistral) | "qwen2"
    add_hparams(writer, config, arch)             # llama.{context_length, embedding_length, ...}
    add_tokenizer(writer, folder, tok, config, arch)

Byte-level BPE tokenizers become llama.cpp's `gpt2` model with its pre-tokenizer name (gpt-2,
smollm, qwen2); SentencePiece-style BPE with byte fallback becomes `llama` with scores from the
merge ranks (gguf-py has no such conversion: it is ours, and tested to tokenize as transformers does).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from winq.errors import ConfigError

ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


def config_value(config, name, default=None):
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
    raise ConfigError(f"rope scaling {kind!r} is not supported by the GGUF exporter: supported are default, linear, "
                      "yarn")


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


def add_hparams(w, config, arch: str) -> dict:
    hidden = int(config.hidden_size)
    n_head = int(config.num_attention_heads)
    n_kv = int(config_value(config, "num_key_value_heads", n_head))
    head_dim = int(config_value(config, "head_dim", hidden // n_head))
    ctx = int(config_value(config, "max_position_embeddings", 2048))
    theta, scaling = _rope(config)
    eps = float(config_value(config, "rms_norm_eps", 1e-6))
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
            "rope_theta": theta, "rope_scaling": scaling, "rms_eps": eps,
            "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False))}
