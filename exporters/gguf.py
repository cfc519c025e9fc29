"""GGUF export for llama.cpp: a complete model file around the block bytes of winq.formats.gguf.

    winq export --format gguf --checkpoint runs/winq --out runs/winq-gguf/model.gguf [--type auto] [--keep f16]

The file holds the llama.cpp metadata (exporters/gguf_meta.py: architecture, hyperparameters,
tokenizer), the export settings under `winq.export`, float tensors (norms and biases F32, the
embeddings and an untied lm_head in `--keep` precision) and every quantized tensor in the GGUF
type `--type` asks for where it fits, else the tightest exact one (winq.formats.gguf.choose).
Tensor names come from gguf-py's tensor name map of the llama.cpp architecture (gguf_meta.ARCHS:
llama, qwen2, qwen3, gemma3, phi3, smollm3); q_proj / k_proj rows are permuted where llama.cpp
runs the NORM rope (llama, smollm3), Gemma 3's norm weights are stored as 1 + w, Phi-3's fused
qkv_proj / gate_up_proj are each one quantized tensor (attn_qkv, ffn_up). Verification reads the file back with
gguf-py's reader and dequantizer: every quantized tensor must equal QuantizedWeight.dequantize().
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from winq.errors import ConfigError, FormatError
from winq.formats import gguf as G
from winq.formats.manifest import FloatRecord, TensorRecord

from . import Exporter, Source, Verified, Written, float_tensors, keep_cost, option, register
from .gguf_meta import SUPPORTED, add_hparams, add_tokenizer, arch_spec, config_value

FILE = "model.gguf"
TYPES = ("auto", *G.ORDER)  # what --type accepts


@dataclass(frozen=True)
class GGUFOptions:
    type: str = option("auto", "auto (tightest exact type, default) | " + " | ".join(TYPES[1:]))
    keep: str = option("auto", "float embeddings and float lm_head: auto (default: q8_0 when the checkpoint trained "
                               "them on Q8_0's lattice, `winq train --embed q8_0`, stored exactly; else f16) | f16 | "
                               "f32 | q8_0 | q6_k (of float tables: post-training round-to-nearest, not exact: its "
                               "perplexity cost is measured; norms stay f32)")
    keep_eval_tokens: int = option(-1, "tokens of held-out text to measure the perplexity cost of --keep on: -1 auto "
                                       "(4096 for q8_0/q6_k, none for f16/f32), 0 off")
    keep_eval_data: str = option("ptb", "held-out data of that measurement (its test split): ptb | sotu | PATH")

    def __post_init__(self):
        if self.type not in TYPES:
            raise ConfigError(f"unknown GGUF type {self.type!r}: choose one of {', '.join(TYPES)}")
        if self.keep not in ("auto", *G.KEEP):
            raise ConfigError(f"--keep {self.keep!r} is not supported: choose one of auto, {', '.join(G.KEEP)}")
        keep_cost.eval_tokens(self.keep_eval_tokens, True)  # validates


@functools.lru_cache(maxsize=8)
def _name_map(arch: str, n_blocks: int):
    import gguf

    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    return gguf.get_tensor_name_map(by_name[arch], n_blocks)


def gguf_name(hf: str, arch: str, n_blocks: int) -> str | None:
    """GGUF tensor name of a HF state-dict key (None for keys llama.cpp does not take, e.g. rotary buffers)."""
    if "rotary_emb" in hf:
        return None
    return _name_map(arch, n_blocks).get_name(hf, try_suffixes=(".weight", ".bias"))


PHI3_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def _model_name(config, tokenizer) -> str:
    """general.name. llama.cpp sets token attributes by model name: a name with "phi3" / "phi-3" makes it look up
    Phi-3's special tokens and fail to load a vocabulary without them, so such a name is then written without
    the "3" (`phi-model`); the name changes nothing else."""
    name = str(config_value(config, "_name_or_path", "") or "winq model").split("/")[-1] or "winq model"
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    if re.search(r"phi-?3", name.lower()) and not all(t in vocab for t in PHI3_TOKENS):
        name = re.sub(r"(?i)phi-?3", "phi-model", name)
    return name


def _order(k: str):
    """Embeddings first, then the blocks in layer order, the final norm and lm_head last."""
    m = re.search(r"\.(\d+)\.", k)
    group = 0 if "embed" in k else 2 if k.startswith("lm_head") or k == "model.norm.weight" else 1
    return group, int(m.group(1)) if m else -1, k


def _tensor_keys(floats: dict, qws: dict, quant_names: dict, tied: bool, opt: GGUFOptions,
                 float_weights: bool) -> list[str]:
    """The state-dict keys the file holds (float tensors, then quantized layers), after checking that --keep can
    store each of them: a --keep that cannot store some tensor is refused before anything is written."""
    keys = list(floats) + [k for k in quant_names if k not in floats]
    if tied and "lm_head.weight" in floats and "lm_head.weight" not in quant_names:
        keys.remove("lm_head.weight")  # llama.cpp reuses token_embd when `output` is absent
    for key in keys:
        if key not in quant_names and "rotary_emb" not in key:
            G.check_keep(key, floats[key].shape, opt.keep)
        elif float_weights:
            G.check_keep(key, qws[quant_names[key]].shape, opt.keep)
    return keys


def _add_quantized(w, gname: str, mod: str, qw, opt: GGUFOptions) -> tuple[str, str | None, TensorRecord]:
    """Add one quantized layer in the type choose() picks (opt.type where it holds the layer exactly): (that type,
    choose's note or None, the layer's record)."""
    enc, note = G.choose(qw, opt.type, mod)
    w.add_tensor(gname, enc.blocks, raw_dtype=G.TYPES[enc.type].ggml)
    nbytes = int(enc.blocks.nbytes)
    record = TensorRecord(
        name=mod, grid=qw.grid, bits=qw.bits, container_bits=G.TYPES[enc.type].code_bits,
        container=f"{enc.type.upper()}: {enc.container}", group_size=qw.group_size, shape=tuple(qw.shape),
        bytes=nbytes, bits_per_weight=round(8 * nbytes / qw.codes.numel(), 4),
    )
    return enc.type, note, record


def write_gguf(path: Path, model, qws: dict, tokenizer, folder: Path, opt: GGUFOptions, meta: dict | None = None,
               float_weights: bool = False) -> Written:
    """Write a complete llama.cpp model file. float_weights=True stores the quantized layers' dequantized
    weights in `opt.keep` precision instead (the F16 baseline of `winq bench`; not an exact export)."""
    import gguf

    config = model.config
    spec = arch_spec(config)
    arch = spec.name
    n_head = int(config.num_attention_heads)
    n_kv = int(config_value(config, "num_key_value_heads", n_head))
    n_blocks = int(config.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(_model_name(config, tokenizer))
    hp = add_hparams(w, config, arch)
    tk = add_tokenizer(w, folder, tokenizer, config, arch)
    if meta is not None:
        w.add_string("winq.export", json.dumps(meta, sort_keys=True))
    floats = float_tensors(model, qws)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    quant_names = {f"{n}.weight": n for n in qws}
    records, frecs, notes, layout, kept = [], [], [], {}, {}
    keys = _tensor_keys(floats, qws, quant_names, tied, opt, float_weights)
    for key in sorted(keys, key=_order):
        gname = gguf_name(key, arch, n_blocks)
        if gname is None:
            if "rotary_emb" in key:
                continue
            raise ConfigError(f"tensor {key} has no place in a llama.cpp {arch} model; GGUF export covers "
                              f"the {SUPPORTED} layouts")
        heads = n_head if ".q_proj." in key else n_kv if ".k_proj." in key else None
        if not spec.permute_qk:
            heads = None  # NEOX rope (qwen2, qwen3, gemma3, phi3) reads rows as they are
        if key in quant_names:
            mod = quant_names[key]
            qw = G.permute_qw(qws[mod], heads) if heads else qws[mod]
            if float_weights:
                arr, raw, _, _ = G.encode_float(key, qw.dequantize(), opt.keep)
                w.add_tensor(gname, arr, raw_dtype=raw)
                continue
            type_, note, record = _add_quantized(w, gname, mod, qw, opt)
            if note:
                notes.append(note)
            layout[gname] = (mod, type_, heads)
            records.append(record)
        else:
            t = floats[key]
            if heads and t.dim() >= 1:
                t = G.permute_rows(t, heads)
            if spec.norm_shift and key.endswith("norm.weight"):
                t = t.float() + spec.norm_shift  # Gemma's RMSNorm scales by (1 + w), llama.cpp's by the stored w
            arr, raw, dt, err = G.encode_float(key, t, opt.keep)
            w.add_tensor(gname, arr, raw_dtype=raw)
            frecs.append(FloatRecord(name=gname, dtype=dt, shape=tuple(t.shape), max_abs_err=err))
            if G.is_kept_float(key, t.dim()) and not heads:  # embeddings, a float lm_head: read back by verify
                kept[gname] = (key, dt, tuple(t.shape))
    notes.extend(hp.pop("notes", []))
    if tied and "lm_head.weight" in quant_names:
        notes.append("the quantized lm_head is written as its own `output` tensor; token_embd stays float (training "
                     "unties them: the embedding is trained as a float table, so the two hold different values)")
    types = [t for _, t, _ in layout.values()]
    w.add_file_type(G.file_type(types, opt.keep))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    info = {"file": path.name, "type": opt.type, "keep": opt.keep, **hp, **tk,
            "types": sorted({t.upper() for t in types})}
    return Written(tensors=records, floats=frecs, notes=notes, info=info, layout=layout, kept=kept)


def check_act_quant(written: Written, source: Source, types: dict[str, str]) -> None:
    """Record llama.cpp's activation quantizer per layer (ggml's vec_dot_type of its GGUF type) against the
    checkpoint's --act-quant in written.info["act_quant"]; a note (a printed warning) when they differ."""
    from winq.actplan import act_mismatch, ggml_act_quants

    runtime = ggml_act_quants(types)
    trained = (source.info.get("train") or {}).get("act_quant")
    record, warning = act_mismatch(trained, runtime, "llama.cpp")
    written.info["act_quant"] = record
    if warning:
        written.notes.append(warning)


def trained_q8_0(info: dict) -> bool:
    """Were the checkpoint's float tables trained on Q8_0's lattice (QuantConfig.embed == "q8_0")?"""
    return (info.get("quant") or {}).get("embed") == "q8_0"


def resolve_keep(options: GGUFOptions, info: dict) -> GGUFOptions:
    """--keep auto: q8_0 for tables trained on Q8_0's lattice (exact), f16 otherwise."""
    if options.keep != "auto":
        return options
    return replace(options, keep="q8_0" if trained_q8_0(info) else "f16")


@register("gguf")
class GGUFExporter(Exporter):
    """`winq export --format gguf`: see the module docstring."""

    Options = GGUFOptions
    single_file = FILE  # export() moves this file to --out and writes winq-export.json beside it

    def check(self, source: Source, options: GGUFOptions) -> None:
        """--keep must fit every float tensor it would store (write() checks the same, tensor by tensor)."""
        options = resolve_keep(options, source.info)
        for key, t in float_tensors(source.model, source.qweights).items():
            if "rotary_emb" not in key:
                G.check_keep(key, t.shape, options.keep)

    def write(self, folder: Path, source: Source, options: GGUFOptions) -> Written:
        options = resolve_keep(options, source.info)
        meta = {"options": {"type": options.type, "keep": options.keep}, "checkpoint": str(source.checkpoint),
                "winq": source.info}
        written = write_gguf(Path(folder) / FILE, source.model, source.qweights, source.tokenizer,
                             source.checkpoint, options, meta=meta)
        written.options = options
        check_act_quant(written, source, {mod: t for mod, t, _ in written.layout.values()})
        return written

    def verify(self, folder: Path, written: Written, reference: Source) -> Verified:
        """Read the file back with gguf-py and compare every quantized tensor with QuantizedWeight.dequantize()."""
        tensors = G.read_tensors(Path(folder) / FILE)
        errors = {}
        for gname, (mod, t, heads) in written.layout.items():
            qw = reference.qweights[mod]
            ref = (G.permute_qw(qw, heads) if heads else qw).dequantize().numpy()
            got = G.read_quantized(tensors, gname, t, ref.shape)
            errors[mod] = float(np.abs(got - ref).max()) if np.isfinite(got).all() else float("inf")
        checks = {}
        if all(e == 0.0 for e in errors.values()):
            checks = self._post_training(tensors, written, reference)
        return Verified(errors, checks=checks)

    @staticmethod
    def _post_training(tensors: dict, written: Written, reference: Source) -> dict:
        """info["post_training"] for float tensors kept in a quantized (or, when asked, any) --keep type: their
        values read back from the file, the perplexity cost of using them; {} when nothing is to record."""
        opt = written.options
        keep = opt.keep
        exact = keep == "q8_0" and trained_q8_0(reference.info)  # the tables are on Q8_0's lattice already
        lossy = keep in G.KEEP_QUANT and not exact
        n_tokens = keep_cost.eval_tokens(opt.keep_eval_tokens, lossy)
        if keep == "f32" or (not lossy and not exact and n_tokens == 0) or not written.kept:
            return {}
        replaced, recs = {}, []
        for gname, (key, dt, shape) in written.kept.items():
            data = np.asarray(tensors[gname].data)
            vals = G.decode_float(data, dt, shape) if dt in G.KEEP_QUANT else data.astype(np.float32).reshape(shape)
            ref = reference.model.get_parameter(key).detach().float()
            replaced[key] = torch.from_numpy(np.ascontiguousarray(vals))
            recs.append({"name": gname, "source": key, "stored_as": dt.upper(),
                         "max_abs_err": float((replaced[key] - ref).abs().max())})
        what = f"--keep {keep} (" + ", ".join(r["name"] for r in recs) + ")"
        if exact:
            bad = [r for r in recs if r["max_abs_err"] != 0.0]
            if bad:
                raise FormatError(f"{bad[0]['name']} was trained on Q8_0's lattice but reads back with max error "
                                  f"{bad[0]['max_abs_err']:.3g}: the checkpoint's table is not what training wrote")
            return {"post_training": {"exact": True, "method": "trained on Q8_0's lattice (embed=q8_0): stored "
                                      "exactly, read back with error 0", "tensors": recs}}
        method = ("gguf-py's Q8_0 quantizer (d = max|x| / 127 per 32)" if keep == "q8_0" else
                  "winq's Q6_K round-to-nearest (int8 scale per 16, float16 d per 256)" if keep == "q6_k" else
                  "float16 rounding")
        cost = None
        if n_tokens:
            cost = keep_cost.measure(reference.model, reference.tokenizer, replaced, n_tokens, opt.keep_eval_data, what)
        rec = keep_cost.record(method, recs, cost, None if cost else "keep_eval_tokens 0")
        written.notes.append(keep_cost.note(what, rec))
        return {"post_training": rec}

    @classmethod
    def write_float(cls, src: Path, out: Path, keep: str = "f16") -> None:
        """An F16 GGUF of the checkpoint `src` (every weight, quantized layers dequantized, in `keep` precision)."""
        from winq.checkpoint import load_checkpoint
        from winq.fsutil import atomic_file
        from winq.prepare import quantized_weights

        net, tok, _ = load_checkpoint(src)
        with atomic_file(out) as tmp:
            write_gguf(tmp, net, quantized_weights(net), tok, Path(src), GGUFOptions(keep=keep), float_weights=True)


def write_f16_gguf(checkpoint, out_file, keep: str = "f16") -> Path:
    """An F16 GGUF of the same model (every weight, quantized layers dequantized, in `keep` precision):
    the baseline `winq bench --backend llamacpp` compares against. Not an exact export; no record."""
    GGUFExporter.write_float(Path(checkpoint), Path(out_file), keep=keep)
    return Path(out_file)


__all__ = ["GGUFExporter", "GGUFOptions", "write_gguf", "write_f16_gguf", "gguf_name", "TYPES", "FILE"]
