"""GPTQ safetensors export: a Hugging Face folder that transformers + optimum + gptqmodel load.

Per quantized Linear (out, in) with G groups of g inputs, the file holds (GPTQ's layout):

    qweight  int32   (in * b / 32, out)   codes q' packed along in, lowest bits first
    qzeros   int32   (G, out * b / 32)    zero fields packed along out the same way
    scales   float16 (G, out)             s'
    g_idx    int32   (in,)                i // g  (desc_act false: groups in input order)

    W[o, i] = s'[g_idx[i], o] * (q'[i, o] - z'[g_idx[i], o])

b = 3 packs 32 codes into 3 words (winq.packing documents the straddling codes 10 and 21).
The zero field is z' - 1 in v1 (`checkpoint_format: gptq`, what every loader reads) and z'
in v2 (`gptq_v2`, gptqmodel only). v1 therefore needs 1 <= z' <= 2^b - 1; an affine group
whose learned zero is 0 cannot be written in v1 (gptqmodel converts v1 to v2 by adding 1 to
every field, which would carry into the neighbour): by default the export then switches
to v2 and says so; an explicit `checkpoint_format="gptq"` refuses.

How each grid maps (ARCHITECTURE §5). GPTQ zeros are integers, so a half-integer zero is
doubled: q' = m q + a, z' = m z + a, s' = s / m gives s' (q' - z') = s (q - z).

| grid     | bits | file bits | m, a | z'        | s'   |
|----------|------|-----------|------|-----------|------|
| lsq      | 3,4,8| b         | 1, 0 | 2^(b-1)   | s    |
| ternary  | 2    | 2         | 1, 0 | 1         | s    |
| affine   | b    | b         | 1, 0 | learned z | s    |
| seq      | 2    | 3         | 2, 1 | 4         | s/2  |  container: warned, refused with strict
| binary   | 1    | 2         | 2, 0 | 1         | s/2  |  container: warned, refused with strict

Exactness: s/2 of a float16 s is exact unless s is below 2^-13 with an odd last bit
(float16 subnormals); such a layer is refused. float32(s') * (q' - z') and
float32(s) * (q - z) are then the same real number, exactly representable in float32 (an
11-bit mantissa times an integer below 2^8), so the dequantized weights are equal bit for
bit. `verify` re-reads the written file and checks exactly that.

Everything that is not a quantized Linear (embeddings, norms, lm_head, biases) is stored
in `float_dtype` (float16 by default, as GPTQ checkpoints do; float32 keeps it exact).
Shapes: in and out must be multiples of the packing period of the file bits (32 for
3-bit, 16 for 2-bit, 8 for 4-bit, 4 for 8-bit); other layers are refused by name.

Consumer facts (gptqmodel 7.6, measured): its torch kernel keeps `scales` in float16 and
computes the dequantized weight in float16, which rounds s' * (q' - z'); winq.runtime.gptq
upcasts the loaded scales to float32 (lossless), after which its weights equal ours exactly.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from winq.errors import ConfigError
from winq.grids import GridSpec
from winq.packing import pack, period, unpack
from winq.qweight import QuantizedWeight

from . import Exporter, ExportError, Written, register
from .manifest import FloatRecord, TensorRecord

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")  # v1 (zero fields store z - 1) | v2 (store z)
GPTQ_BITS = (2, 3, 4, 8)  # transformers' GPTQConfig accepts these
FLOAT_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
WEIGHTS_FILE = "model.safetensors"
QUANTIZE_CONFIG = "quantize_config.json"  # read by gptqmodel's and AutoGPTQ's own loaders
QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
# group sizes gptqmodel 7.6's kernels accept (TorchLinear.SUPPORTS_GROUP_SIZE)
CONSUMER_GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)
# files of a checkpoint folder that travel with the model (tokenizer, generation defaults)
COPIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


@dataclass(frozen=True)
class Container:
    """How a grid's codes sit in GPTQ's integer fields: q' = mul q + add, z' = mul z + add, s' = s / mul."""

    bits: int  # code width in the file
    mul: int = 1
    add: int = 0

    @property
    def native(self) -> bool:
        return self.mul == 1 and self.add == 0

    def describe(self, grid: str, grid_bits: int) -> str:
        if self.native:
            return "native"
        z = GridSpec(grid, grid_bits).fixed_zero
        return f"{self.bits}-bit container for {grid_bits}-bit codes: q' = {self.mul}q + {self.add}, z' = {self.mul * z + self.add:g}, s' = s/{self.mul}"


CONTAINERS = {
    ("lsq", 3): Container(3),
    ("lsq", 4): Container(4),
    ("lsq", 8): Container(8),
    ("ternary", 2): Container(2),
    ("seq", 2): Container(3, mul=2, add=1),  # levels +-0.5, +-1.5 -> +-1, +-3 around z' = 4
    ("binary", 1): Container(2, mul=2, add=0),  # levels +-0.5 -> +-1 around z' = 1
    **{("affine", b): Container(b) for b in GPTQ_BITS},
}


def container_for(grid: str, bits: int) -> Container:
    try:
        return CONTAINERS[(grid, bits)]
    except KeyError:
        raise ConfigError(
            f"no GPTQ mapping for grid {grid!r} with {bits} bits; GPTQ holds: "
            + ", ".join(f"{g}{b}" for g, b in CONTAINERS)
        ) from None


@dataclass(frozen=True)
class GPTQOptions:
    checkpoint_format: str | None = None  # gptq (v1) | gptq_v2 | None: v1 unless an affine zero is 0, then v2
    strict: bool = False  # refuse wider containers (seq2 in 3 bits, binary in 2 bits) instead of warning
    float_dtype: str = "float16"  # dtype of embeddings, norms, lm_head and biases: float16 | float32 | bfloat16

    def __post_init__(self):
        if self.checkpoint_format is not None and self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise ConfigError(
                f"checkpoint_format={self.checkpoint_format!r}: choose gptq (v1, every loader) or gptq_v2 (gptqmodel only)"
            )
        if self.float_dtype not in FLOAT_DTYPES:
            raise ConfigError(f"float_dtype={self.float_dtype!r}: choose one of {', '.join(FLOAT_DTYPES)}")


@dataclass
class GPTQLayer:
    """One Linear in GPTQ's terms, in (out, in) orientation like QuantizedWeight."""

    codes: torch.Tensor  # uint8 (out, in): q' in [0, 2^bits)
    zero: torch.Tensor  # int64 (out, G): z'
    scale: torch.Tensor  # float16 (out, G): s'
    bits: int
    group_size: int  # inputs per group (in_features for per-row)

    def dequantize(self) -> torch.Tensor:
        """float32 (out, in): float32(s') * (q' - z'), per group."""
        out, inf = self.codes.shape
        G = inf // self.group_size
        q = self.codes.to(torch.float32).reshape(out, G, self.group_size)  # (out, G, g)
        lev = q - self.zero.to(torch.float32)[..., None]
        return (self.scale.to(torch.float32)[..., None] * lev).reshape(out, inf)


def check_shape(name: str, out: int, inf: int, bits: int) -> None:
    """GPTQ packs along in (qweight) and out (qzeros) in whole words: both must be multiples of the period."""
    P = period(bits)
    bad = [(d, n) for d, n in (("in_features", inf), ("out_features", out)) if n % P]
    if bad:
        d, n = bad[0]
        raise ConfigError(
            f"{name}: {d}={n} is not a multiple of {P}: GPTQ packs {bits}-bit codes {P} at a time into whole int32 words "
            f"along in_features (qweight) and out_features (qzeros); this layer cannot be exported to GPTQ "
            f"(skip it when training, or use a model whose layer sizes are multiples of {P})"
        )


def map_weight(name: str, qw: QuantizedWeight) -> GPTQLayer:
    """The exact GPTQ form of one QuantizedWeight; ExportError if it has none."""
    c = container_for(qw.grid, qw.bits)
    out, inf = qw.shape
    check_shape(name, out, inf, c.bits)
    top = 2**c.bits - 1
    codes = qw.codes.to(torch.int64) * c.mul + c.add
    zero = qw.zero * c.mul + c.add  # float32 (out, G)
    if not torch.equal(zero, torch.round(zero)):
        raise ExportError(f"{name}: zero points {zero.unique()[:4].tolist()} are not integers after mapping; GPTQ zeros are integers")
    zero = zero.to(torch.int64)
    if codes.max() > top or zero.min() < 0 or zero.max() > top:
        raise ExportError(f"{name}: codes or zeros do not fit {c.bits} bits (codes max {int(codes.max())}, zeros {int(zero.min())}..{int(zero.max())})")
    scale = qw.scale
    if c.mul != 1:
        s = (qw.scale.to(torch.float32) / c.mul).to(torch.float16)
        inexact = s.to(torch.float32) * c.mul != qw.scale.to(torch.float32)
        if inexact.any():
            bad = qw.scale[inexact]
            raise ExportError(
                f"{name}: {int(inexact.sum())} scales are float16 subnormals with an odd last bit "
                f"(smallest {float(bad.abs().min()):.3g}), so s/{c.mul} is not exact in float16 and the "
                f"{qw.grid} grid cannot be stored in GPTQ's integer-zero container exactly"
            )
        scale = s
    return GPTQLayer(codes=codes.to(torch.uint8), zero=zero, scale=scale.contiguous(), bits=c.bits, group_size=qw.group_size)


def pack_layer(layer: GPTQLayer, checkpoint_format: str) -> dict[str, torch.Tensor]:
    """The four GPTQ tensors of one layer (see the module docstring for shapes)."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ConfigError(f"checkpoint_format={checkpoint_format!r}: choose one of {', '.join(CHECKPOINT_FORMATS)}")
    out, inf = layer.codes.shape
    fields = layer.zero - 1 if checkpoint_format == "gptq" else layer.zero  # (out, G)
    if fields.min() < 0:
        raise ConfigError("v1 GPTQ (checkpoint_format gptq) stores z - 1 and cannot hold a zero point of 0: use gptq_v2")
    return {
        "qweight": pack(layer.codes.T.contiguous(), layer.bits, dim=0).contiguous(),  # (in * b / 32, out)
        "qzeros": pack(fields.T.contiguous().to(torch.uint8), layer.bits, dim=1).contiguous(),  # (G, out * b / 32)
        "scales": layer.scale.T.contiguous(),  # (G, out) float16
        "g_idx": (torch.arange(inf, dtype=torch.int32) // layer.group_size).to(torch.int32),  # (in,)
    }


def unpack_layer(t: dict[str, torch.Tensor], bits: int, checkpoint_format: str) -> GPTQLayer:
    """Inverse of pack_layer, from the tensors as read from a file (an independent reading of the layout)."""
    qweight, qzeros, scales, g_idx = (t[k] for k in QUANT_SUFFIXES)
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or scales.dtype != torch.float16 or g_idx.dtype != torch.int32:
        raise ExportError(f"unexpected dtypes: qweight {qweight.dtype}, qzeros {qzeros.dtype}, scales {scales.dtype}, g_idx {g_idx.dtype}")
    codes = unpack(qweight, bits, dim=0)  # (in, out)
    fields = unpack(qzeros, bits, dim=1).to(torch.int64)  # (G, out)
    inf, out = codes.shape
    G = scales.shape[0]
    if tuple(scales.shape) != (G, out) or tuple(fields.shape) != (G, out) or g_idx.numel() != inf or inf % G:
        raise ExportError(f"inconsistent shapes: qweight -> {tuple(codes.shape)}, qzeros -> {tuple(fields.shape)}, scales {tuple(scales.shape)}, g_idx {tuple(g_idx.shape)}")
    g = inf // G
    if not torch.equal(g_idx.to(torch.int64), torch.arange(inf) // g):
        raise ExportError("g_idx is not i // group_size (act-order files are not written by winq)")
    zero = fields + 1 if checkpoint_format == "gptq" else fields
    return GPTQLayer(codes=codes.T.contiguous(), zero=zero.T.contiguous(), scale=scales.T.contiguous(), bits=bits, group_size=g)


def _block_layout(names: list[str], model) -> tuple[str, list[str] | None]:
    """(block prefix, modules_in_block_to_quantize or None when every Linear in the blocks is quantized).

    transformers/optimum replace every Linear inside the decoder blocks (model.layers.N) with a
    GPTQ layer; layers winq left in float must be named to it, the same in every block.
    """
    from torch import nn

    parts = [re.match(r"^(.*)\.(\d+)\.(.+)$", n) for n in names]
    if not all(parts) or len({p.group(1) for p in parts}) != 1:
        outside = [n for n, p in zip(names, parts) if not p][:3]
        raise ConfigError(
            f"GPTQ loaders quantize only the Linear layers inside the decoder blocks; winq quantized layers outside them "
            f"({', '.join(outside) or 'layers under several block lists'}): retrain without --quantize-lm-head / with those layers skipped"
        )
    prefix = parts[0].group(1)
    per_block: dict[str, set[str]] = {}
    for p in parts:
        per_block.setdefault(p.group(2), set()).add(p.group(3))
    quant = set(names)
    linears = [n for n, m in model.named_modules() if n.startswith(prefix + ".") and isinstance(m, nn.Linear)]
    if all(n in quant for n in linears):
        return prefix, None
    suffix_sets = {frozenset(s) for s in per_block.values()}
    n_blocks = len({n.split(".")[len(prefix.split("."))] for n in linears})
    if len(suffix_sets) != 1 or len(per_block) != n_blocks:
        raise ConfigError(
            "GPTQ's loader takes one list of quantized modules for every decoder block; this checkpoint quantizes "
            "different modules in different blocks"
        )
    return prefix, [sorted(next(iter(suffix_sets)))]


def _float_state(model, quant: set[str]) -> dict[str, torch.Tensor]:
    """Every tensor of the model that is not part of a quantized Linear's weight (tied copies once)."""
    owned = {f"{n}.{k}" for n in quant for k in ("weight", "alpha", "zero_point")}
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        if k in owned:
            continue
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if ptr in seen:  # tied lm_head = embed_tokens: stored once, as transformers does
            continue
        seen.add(ptr)
        out[k] = v.detach().cpu()
    return out


@register("gptq")
class GPTQExporter(Exporter):
    """`winq export --format gptq`: see the module docstring."""

    name = "gptq"
    Options = GPTQOptions

    def write(self, folder: Path, model, qws: dict[str, QuantizedWeight], tokenizer, checkpoint: Path, opt: GPTQOptions) -> Written:
        from safetensors.torch import save_file

        folder = Path(folder)
        cfg = getattr(model, "winq_quant_config", None)
        kinds = {(qw.grid, qw.bits) for qw in qws.values()}
        if len(kinds) != 1:
            raise ConfigError(f"GPTQ stores one bit width per model; this checkpoint mixes {sorted(kinds)}")
        grid, bits = next(iter(kinds))
        c = container_for(grid, bits)
        notes = []
        desc = c.describe(grid, bits)
        if c.bits != bits:
            what = f"{grid} {bits}-bit weights have no exact {bits}-bit GPTQ form (GPTQ zeros are integers); they are stored in the exact {desc}"
            if opt.strict:
                other = (
                    "GGUF Q2_K and ONNX MatMulNBits hold seq 2-bit weights in 2 bits"
                    if grid == "seq" else "every format stores binary weights in a 2-bit container"
                )
                raise ConfigError(f"{what}, which --strict refuses. Drop --strict to accept {c.bits} bits per code ({other})")
            notes.append(what + f": exact, {c.bits} bits per code instead of {bits}")
        group_sizes = {-1 if qw.per_row else qw.group_size for qw in qws.values()}
        if cfg is not None:
            gptq_group = cfg.group_size
        elif len(group_sizes - {-1}) <= 1:
            gptq_group = max(group_sizes)
        else:
            gptq_group = None
        if gptq_group is None or any(not qw.per_row and qw.group_size != gptq_group for qw in qws.values()):
            raise ConfigError(f"GPTQ stores one group size per model; this checkpoint has {sorted(group_sizes)}")
        if gptq_group not in CONSUMER_GROUP_SIZES:
            notes.append(f"group size {gptq_group} is valid GPTQ but gptqmodel 7.6's kernels accept only {CONSUMER_GROUP_SIZES}")
        prefix, in_block = _block_layout(list(qws), model)

        # map every layer first: a refusal leaves nothing half-written
        layers = {n: map_weight(n, qw) for n, qw in qws.items()}
        zero_min = min(int(l.zero.min()) for l in layers.values())
        fmt = opt.checkpoint_format
        if zero_min < 1:
            n0 = next(n for n, l in layers.items() if int(l.zero.min()) < 1)
            why = f"v1 GPTQ stores z - 1 and cannot hold the zero point 0 that {grid} layers such as {n0} use"
            if fmt == "gptq":
                raise ConfigError(f"{why}: export with --checkpoint-format gptq_v2 (loaded by gptqmodel, not by AutoGPTQ)")
            if fmt is None:
                notes.append(f"{why}: writing checkpoint_format gptq_v2 (gptqmodel loads it; AutoGPTQ does not)")
                fmt = "gptq_v2"
        fmt = fmt or "gptq"
        sym = grid == "lsq"  # z = 2^(b-1) everywhere: GPTQ's symmetric case

        tensors: dict[str, torch.Tensor] = {}
        records = []
        for n, layer in layers.items():
            t = pack_layer(layer, fmt)
            nbytes = sum(x.numel() * x.element_size() for x in t.values())
            for k, x in t.items():
                tensors[f"{n}.{k}"] = x
            qw = qws[n]
            records.append(TensorRecord(
                name=n, grid=grid, bits=bits, container_bits=c.bits, container=desc, group_size=qw.group_size,
                shape=tuple(qw.shape), bytes=nbytes, bits_per_weight=round(8 * nbytes / (qw.shape[0] * qw.shape[1]), 4),
            ))
        fdtype = FLOAT_DTYPES[opt.float_dtype]
        floats = []
        for k, v in _float_state(model, set(qws)).items():
            if v.is_floating_point():
                w = v.to(fdtype)
                if not torch.isfinite(w).all():
                    raise ExportError(f"{k} overflows {opt.float_dtype}: export with --float-dtype float32")
                err = float((w.to(torch.float32) - v.to(torch.float32)).abs().max()) if v.numel() else 0.0
                floats.append(FloatRecord(name=k, dtype=opt.float_dtype, shape=tuple(v.shape), max_abs_err=err))
                v = w
            tensors[k] = v.contiguous()
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "quantizer": "winq"})

        import winq

        qcfg = {
            "quant_method": "gptq",
            "bits": c.bits,
            "group_size": gptq_group,
            "desc_act": False,
            "sym": sym,
            "true_sequential": True,
            "damp_percent": 0.01,
            "static_groups": False,
            "lm_head": False,
            "pack_dtype": "int32",
            "checkpoint_format": fmt,
            "format": fmt,
            "meta": {"quantizer": [f"winq:{winq.__version__}"], "winq_grid": grid, "winq_bits": bits, "winq_container": desc},
        }
        if in_block is not None:
            qcfg["modules_in_block_to_quantize"] = in_block
        model.config.save_pretrained(str(folder))
        cj = json.loads((folder / "config.json").read_text())
        cj.pop("torch_dtype", None)
        cj["dtype"] = opt.float_dtype
        cj["quantization_config"] = qcfg
        (folder / "config.json").write_text(json.dumps(cj, indent=2, sort_keys=True) + "\n")
        (folder / QUANTIZE_CONFIG).write_text(json.dumps(qcfg, indent=2) + "\n")
        copied = [f for f in COPIED_FILES if (Path(checkpoint) / f).is_file()]
        for f in copied:
            shutil.copy2(Path(checkpoint) / f, folder / f)
        if not any(f.startswith("tokenizer") for f in copied) and tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
        info = {
            "checkpoint_format": fmt, "bits": c.bits, "group_size": gptq_group, "sym": sym, "grid": grid,
            "grid_bits": bits, "container": desc, "float_dtype": opt.float_dtype, "block_prefix": prefix,
            "weights_file": WEIGHTS_FILE,
        }
        return Written(tensors=records, floats=floats, notes=notes, info=info)

    def verify(self, folder: Path, qws: dict[str, QuantizedWeight], written: Written) -> dict[str, float]:
        """max |dequant(file) - QuantizedWeight.dequantize()| per layer, from the file read back."""
        from safetensors.torch import load_file

        sd = load_file(str(Path(folder) / WEIGHTS_FILE))
        fmt, bits = written.info["checkpoint_format"], written.info["bits"]
        errors = {}
        for n, qw in qws.items():
            try:
                layer = unpack_layer({k: sd[f"{n}.{k}"] for k in QUANT_SUFFIXES}, bits, fmt)
            except KeyError as e:
                raise ExportError(f"{WEIGHTS_FILE} lacks {e.args[0]}") from None
            w = layer.dequantize()
            ref = qw.dequantize()
            errors[n] = float((w - ref).abs().max()) if w.shape == ref.shape else math.inf
        return errors


__all__ = [
    "GPTQExporter", "GPTQOptions", "GPTQLayer", "Container", "CONTAINERS", "container_for",
    "map_weight", "pack_layer", "unpack_layer", "check_shape", "CHECKPOINT_FORMATS",
]
