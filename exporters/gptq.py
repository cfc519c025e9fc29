"""GPTQ safetensors export: a Hugging Face folder that transformers + optimum + gptqmodel load.

    winq export --format gptq --checkpoint runs/winq --out runs/winq-gptq [--checkpoint-format gptq|gptq_v2]

The folder holds `model.safetensors` (per quantized Linear qweight / qzeros / scales / g_idx,
packed by winq.formats.gptq, which documents the layout and the grid mapping; everything else in
`float_dtype`), `config.json` with `quantization_config`, `quantize_config.json`, the tokenizer and
`winq-export.json`. Seq 2-bit is stored in the exact 3-bit container and binary in 2 bits: both
warn, and `strict` refuses them.

The zero field is z' - 1 in v1 (`checkpoint_format: gptq`, what every loader reads), so an affine
group whose learned zero is 0 cannot be written in v1 (gptqmodel converts v1 to v2 by adding 1 to
every field, which would carry into the neighbour): by default the export then switches to v2 and
says so; an explicit `checkpoint_format="gptq"` refuses.

Consumer facts (gptqmodel 7.6, measured): its torch kernel keeps `scales` in float16 and computes
the dequantized weight in float16, which rounds s' * (q' - z'); winq's gptq backend upcasts the
loaded scales to float32 (lossless), after which its weights equal ours exactly.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from winq.errors import ConfigError
from winq.formats import gptq as F
from winq.formats.manifest import FloatRecord, TensorRecord
from winq.packing import period

from . import Exporter, ExportError, Source, Verified, Written, copy_side_files, float_tensors, option, register

FLOAT_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class GPTQOptions:
    checkpoint_format: str | None = option(
        None, "gptq (v1, every loader) | gptq_v2 (gptqmodel only); default: v1, or v2 when an affine zero point is 0")
    strict: bool = option(
        False, "refuse wider exact containers (seq 2-bit in 3 bits, binary in 2 bits) instead of warning")
    float_dtype: str = option("float16", "embeddings, norms, lm_head: float16 (default) | float32 | bfloat16")

    def __post_init__(self):
        if self.checkpoint_format is not None and self.checkpoint_format not in F.CHECKPOINT_FORMATS:
            raise ConfigError(
                f"checkpoint_format={self.checkpoint_format!r}: choose gptq (v1, every loader) or gptq_v2 (gptqmodel "
                "only)"
            )
        if self.float_dtype not in FLOAT_DTYPES:
            raise ConfigError(f"float_dtype={self.float_dtype!r}: choose one of {', '.join(FLOAT_DTYPES)}")


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
            f"GPTQ loaders quantize only the Linear layers inside the decoder blocks; winq quantized layers outside "
            f"them ({', '.join(outside) or 'layers under several block lists'}): retrain without --quantize-lm-head / "
            f"with those layers skipped"
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


def _grid_and_group(source: Source, opt: GPTQOptions, notes: list[str]):
    """(grid, bits, container, GPTQ group size) of the checkpoint: one of each per GPTQ model."""
    qws = source.qweights
    kinds = {(qw.grid, qw.bits) for qw in qws.values()}
    if len(kinds) != 1:
        raise ConfigError(f"GPTQ stores one bit width per model; this checkpoint mixes {sorted(kinds)}")
    grid, bits = next(iter(kinds))
    c = F.container_for(grid, bits)
    if c.bits != bits:
        what = (f"{grid} {bits}-bit weights have no exact {bits}-bit GPTQ form (GPTQ zeros are integers); they are "
                f"stored in the exact {c.describe(grid, bits)}")
        if opt.strict:
            other = ("GGUF Q2_K and ONNX MatMulNBits hold seq 2-bit weights in 2 bits" if grid == "seq"
                     else "every format stores binary weights in a 2-bit container")
            raise ConfigError(f"{what}, which --strict refuses. Drop --strict to accept {c.bits} bits per code "
                              f"({other})")
        notes.append(what + f": exact, {c.bits} bits per code instead of {bits}")
    group_sizes = {-1 if qw.per_row else qw.group_size for qw in qws.values()}
    cfg = getattr(source.model, "winq_quant_config", None)
    if cfg is not None:
        group = cfg.group_size
    elif len(group_sizes - {-1}) <= 1:
        group = max(group_sizes)
    else:
        group = None
    if group is None or any(not qw.per_row and qw.group_size != group for qw in qws.values()):
        raise ConfigError(f"GPTQ stores one group size per model; this checkpoint has {sorted(group_sizes)}")
    if group not in F.CONSUMER_GROUP_SIZES:
        notes.append(f"group size {group} is valid GPTQ but gptqmodel 7.6's kernels accept only "
                     f"{F.CONSUMER_GROUP_SIZES}")
    return grid, bits, c, group


def _map_layers(qws: dict, grid: str, bits: int, c, opt: GPTQOptions, notes: list[str]):
    """Every layer's GPTQ form, and {name: container} of the 2/3-bit layers whose sizes miss the packing
    period and go into the exact 4-bit container instead (gptqmodel's per-module `dynamic` bits)."""
    layers, wide = {}, {}
    wc = F.wider_container(grid, bits)
    for n, qw in qws.items():
        if F.fits_shape(*qw.shape, c.bits) or wc is None or not F.fits_shape(*qw.shape, wc.bits):
            layers[n] = F.map_weight(n, qw)  # fits, or refused with the shape error
            continue
        if opt.strict:
            F.check_shape(n, *qw.shape, c.bits)  # raises: --strict takes no wider containers
        layers[n] = F.map_weight(n, qw, wc)
        wide[n] = wc
    if wide:
        first = next(iter(wide))
        notes.append(
            f"{len(wide)} layer(s) (e.g. {first}, {tuple(qws[first].shape)}) miss the {c.bits}-bit packing period "
            f"{period(c.bits)} and are stored in the exact {wc.describe(grid, bits)}, named in quantization_config."
            f"dynamic: gptqmodel's own loader (GPTQModel.load) reads per-module bits; transformers + optimum apply "
            f"one bit width to every layer and cannot load this folder")
    return layers, wide


def _checkpoint_format(layers: dict, grid: str, asked: str | None, notes: list[str]) -> str:
    """v1 unless a zero point is 0 (then v2 when not asked for v1, which refuses)."""
    n0 = next((n for n, layer in layers.items() if int(layer.zero.min()) < 1), None)
    if n0 is None:
        return asked or "gptq"
    why = f"v1 GPTQ stores z - 1 and cannot hold the zero point 0 that {grid} layers such as {n0} use"
    if asked == "gptq":
        raise ConfigError(f"{why}: export with --checkpoint-format gptq_v2 (loaded by gptqmodel, not by AutoGPTQ)")
    if asked is None:
        notes.append(f"{why}: writing checkpoint_format gptq_v2 (gptqmodel loads it; AutoGPTQ does not)")
    return "gptq_v2"


def _quant_config(bits: int, group: int, sym: bool, fmt: str, grid: str, grid_bits: int, desc: str) -> dict:
    import winq

    return {
        "quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False, "sym": sym,
        "true_sequential": True, "damp_percent": 0.01, "static_groups": False, "lm_head": False,
        "pack_dtype": "int32", "checkpoint_format": fmt, "format": fmt,
        "meta": {"quantizer": [f"winq:{winq.__version__}"], "winq_grid": grid, "winq_bits": grid_bits,
                 "winq_container": desc},
    }


@register("gptq")
class GPTQExporter(Exporter):
    """`winq export --format gptq`: see the module docstring."""

    Options = GPTQOptions

    def write(self, folder: Path, source: Source, options: GPTQOptions) -> Written:
        from safetensors.torch import save_file

        folder = Path(folder)
        qws, notes = source.qweights, []
        grid, bits, c, group = _grid_and_group(source, options, notes)
        desc = c.describe(grid, bits)
        prefix, in_block = _block_layout(list(qws), source.model)
        layers, wide = _map_layers(qws, grid, bits, c, options, notes)  # every layer first: a refusal writes nothing
        fmt = _checkpoint_format(layers, grid, options.checkpoint_format, notes)
        sym = grid == "lsq"  # z = 2^(b-1) everywhere: GPTQ's symmetric case
        if wide and not sym and fmt == "gptq":  # gptqmodel's own loader refuses v1 files with sym false
            why = (f"the 4-bit layers of this {grid} checkpoint are read only by gptqmodel's own loader, which loads "
                   f"asymmetric (sym false) GPTQ only as gptq_v2")
            if options.checkpoint_format == "gptq":
                raise ConfigError(f"{why}: export with --checkpoint-format gptq_v2")
            notes.append(f"{why}: writing checkpoint_format gptq_v2")
            fmt = "gptq_v2"

        tensors: dict[str, torch.Tensor] = {}
        records = []
        for n, layer in layers.items():
            t = F.pack_layer(layer, fmt)
            nbytes = sum(x.numel() * x.element_size() for x in t.values())
            tensors.update({f"{n}.{k}": x for k, x in t.items()})
            qw = qws[n]
            lc = wide.get(n, c)
            records.append(TensorRecord(
                name=n, grid=grid, bits=bits, container_bits=lc.bits, container=lc.describe(grid, bits),
                group_size=qw.group_size,
                shape=tuple(qw.shape), bytes=nbytes, bits_per_weight=round(8 * nbytes / (qw.shape[0] * qw.shape[1]), 4),
            ))
        fdtype = FLOAT_DTYPES[options.float_dtype]
        floats = []
        for k, v in float_tensors(source.model, qws, dedupe=True).items():
            if v.is_floating_point():
                w = v.to(fdtype)
                if not torch.isfinite(w).all():
                    raise ExportError(f"{k} overflows {options.float_dtype}: export with --float-dtype float32")
                err = float((w.to(torch.float32) - v.to(torch.float32)).abs().max()) if v.numel() else 0.0
                floats.append(FloatRecord(name=k, dtype=options.float_dtype, shape=tuple(v.shape), max_abs_err=err))
                v = w
            tensors[k] = v.contiguous()
        save_file(tensors, str(folder / F.WEIGHTS_FILE), metadata={"format": "pt", "quantizer": "winq"})

        qcfg = _quant_config(c.bits, group, sym, fmt, grid, bits, desc)
        if in_block is not None:
            qcfg["modules_in_block_to_quantize"] = in_block
        if wide:
            qcfg["dynamic"] = dict(F.dynamic_entry(n, lc.bits) for n, lc in wide.items())
        source.model.config.save_pretrained(str(folder))
        cj = json.loads((folder / "config.json").read_text())
        cj.pop("torch_dtype", None)
        cj["dtype"] = options.float_dtype
        cj["quantization_config"] = qcfg
        (folder / "config.json").write_text(json.dumps(cj, indent=2, sort_keys=True) + "\n")
        (folder / F.QUANTIZE_CONFIG).write_text(json.dumps(qcfg, indent=2) + "\n")
        copy_side_files(source.checkpoint, folder, source.tokenizer)
        info = {
            "checkpoint_format": fmt, "bits": c.bits, "group_size": group, "sym": sym, "grid": grid,
            "grid_bits": bits, "container": desc, "float_dtype": options.float_dtype, "block_prefix": prefix,
            "weights_file": F.WEIGHTS_FILE,
        }
        if wide:
            info["wide_layers"] = sorted(wide)
        return Written(tensors=records, floats=floats, notes=notes, info=info)

    def verify(self, folder: Path, written: Written, reference: Source) -> Verified:
        """max |dequant(file) - QuantizedWeight.dequantize()| per layer, from the folder read back."""
        read = F.read_folder(folder)
        errors = {}
        for n, qw in reference.qweights.items():
            if n not in read.layers or "g_idx" not in read.layers[n]:
                raise ExportError(f"{F.WEIGHTS_FILE} lacks {n}'s tensors")
            w = F.unpack_layer(read.layers[n], read.layer_bits[n], read.checkpoint_format, n).dequantize()
            ref = qw.dequantize()
            errors[n] = float((w - ref).abs().max()) if w.shape == ref.shape else math.inf
        return Verified(errors)


__all__ = ["GPTQExporter", "GPTQOptions", "FLOAT_DTYPES"]
