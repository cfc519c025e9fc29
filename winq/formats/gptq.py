"""GPTQ tensors both ways: pack / unpack one layer, map a QuantizedWeight onto GPTQ's integer fields,
read a GPTQ folder back (the exporter's verify and the runtime's packed model both read it here).

Per quantized Linear (out, in) with G groups of g inputs, a GPTQ file holds:

    qweight  int32   (in * b / 32, out)   codes q' packed along in, lowest bits first
    qzeros   int32   (G, out * b / 32)    zero fields packed along out the same way
    scales   float16 (G, out)             s'
    g_idx    int32   (in,)                i // g  (desc_act false: groups in input order)

    W[o, i] = s'[g_idx[i], o] * (q'[i, o] - z'[g_idx[i], o])

b = 3 packs 32 codes into 3 words (winq.packing documents the straddling codes 10 and 21). The
zero field is z' - 1 in v1 (`checkpoint_format: gptq`, what every loader reads) and z' in v2
(`gptq_v2`, gptqmodel only), so v1 needs 1 <= z' <= 2^b - 1.

How each grid maps (winq.formats.containers: q' = m q + a, z' = m z + a, s' = s / m; GPTQ zeros
are integers, so a half-integer zero is doubled):

| grid     | bits | file bits | m, a | z'        | s'   |
|----------|------|-----------|------|-----------|------|
| lsq      | 3,4,8| b         | 1, 0 | 2^(b-1)   | s    |
| ternary  | 2    | 2         | 1, 0 | 1         | s    |
| affine   | b    | b         | 1, 0 | learned z | s    |
| seq      | 2    | 3         | 2, 1 | 4         | s/2  |  container
| binary   | 1    | 2         | 2, 0 | 1         | s/2  |  container

In and out must be multiples of the packing period of the file bits (32 for 3-bit, 16 for 2-bit,
8 for 4-bit, 4 for 8-bit): GPTQ packs whole int32 words along both. A 2- or 3-bit layer whose sizes
miss that period but are multiples of 8 goes into the exact 4-bit container (`wider_container`: the
same codes shifted so that a fixed zero becomes 8, s' unchanged), named to gptqmodel through its
per-module `dynamic` config (`dynamic_entry`; `layer_bits` reads it back).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from winq.errors import ConfigError, FormatError
from winq.grids import GridSpec
from winq.packing import pack, period, unpack
from winq.qweight import QuantizedWeight

from .containers import Container, lookup

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")  # v1 (zero fields store z - 1) | v2 (store z)
GPTQ_BITS = (2, 3, 4, 8)  # transformers' GPTQConfig accepts these
WEIGHTS_FILE = "model.safetensors"
QUANTIZE_CONFIG = "quantize_config.json"  # read by gptqmodel's and AutoGPTQ's own loaders
QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
# group sizes gptqmodel 7.6's kernels accept (TorchLinear.SUPPORTS_GROUP_SIZE)
CONSUMER_GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)

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
    return lookup(CONTAINERS, grid, bits, "GPTQ")


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
        q = self.codes.to(torch.float32).reshape(out, -1, self.group_size)  # (out, G, g)
        return (self.scale.to(torch.float32)[..., None] * (q - self.zero.to(torch.float32)[...,
                                                                                           None])).reshape(out, inf)


def check_shape(name: str, out: int, inf: int, bits: int) -> None:
    """GPTQ packs along in (qweight) and out (qzeros) in whole words: both must be multiples of the period."""
    P = period(bits)
    bad = [(d, n) for d, n in (("in_features", inf), ("out_features", out)) if n % P]
    if bad:
        d, n = bad[0]
        raise ConfigError(
            f"{name}: {d}={n} is not a multiple of {P}: GPTQ packs {bits}-bit codes {P} at a time into whole int32 "
            "words "
            f"along in_features (qweight) and out_features (qzeros); this layer cannot be exported to GPTQ "
            f"(skip it when training, or use a model whose layer sizes are multiples of {P})"
        )


WIDE_BITS = 4  # the container for 2/3-bit layers whose sizes miss their packing period


def fits_shape(out: int, inf: int, bits: int) -> bool:
    return out % period(bits) == 0 and inf % period(bits) == 0


def wider_container(grid: str, bits: int) -> Container | None:
    """The exact 4-bit container of a grid stored in 2 or 3 bits (None when it is stored wider already):
    the same q' = m q + a with a raised so that a fixed zero lands on 8 (GPTQ's symmetric 4-bit zero)."""
    c = container_for(grid, bits)
    if c.bits >= WIDE_BITS:
        return None
    z = GridSpec(grid, bits).fixed_zero
    add = c.add if z is None else c.add + 2 ** (WIDE_BITS - 1) - int(c.mul * z + c.add)
    return Container(WIDE_BITS, mul=c.mul, add=add)


def dynamic_entry(name: str, bits: int) -> tuple[str, dict]:
    """gptqmodel's per-module override for one layer: a positive regex matching exactly that module."""
    return "+:^" + re.escape(name) + "$", {"bits": bits}


def layer_bits(config: dict, name: str) -> int:
    """The bits of one module under a quantization_config, honouring gptqmodel's `dynamic` overrides
    ("+:regex" or "regex" override fields, first match wins; "-:regex" leaves the module unquantized)."""
    for key, over in (config.get("dynamic") or {}).items():
        neg, pat = key.startswith("-:"), key[2:] if key[:2] in ("+:", "-:") else key
        if re.match(pat, name):
            if neg:
                raise FormatError(f"{name}: quantization_config.dynamic leaves it unquantized ({key})")
            return int(over.get("bits", config["bits"]))
    return int(config["bits"])


def map_weight(name: str, qw: QuantizedWeight, container: Container | None = None) -> GPTQLayer:
    """The exact GPTQ form of one QuantizedWeight (in `container`, default the grid's own); ConfigError /
    FormatError if it has none."""
    c = container or container_for(qw.grid, qw.bits)
    check_shape(name, *qw.shape, c.bits)
    r = c.remap(qw, name, scale_dtype=torch.float16)
    return GPTQLayer(codes=r.codes.to(torch.uint8), zero=r.zero.to(torch.int64), scale=r.scale, bits=c.bits,
                     group_size=qw.group_size)


def pack_layer(layer: GPTQLayer, checkpoint_format: str) -> dict[str, torch.Tensor]:
    """The four GPTQ tensors of one layer (see the module docstring for shapes)."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ConfigError(f"checkpoint_format={checkpoint_format!r}: choose one of {', '.join(CHECKPOINT_FORMATS)}")
    out, inf = layer.codes.shape
    fields = layer.zero - 1 if checkpoint_format == "gptq" else layer.zero  # (out, G)
    if fields.min() < 0:
        raise ConfigError("v1 GPTQ (checkpoint_format gptq) stores z - 1 and cannot hold a zero point of 0: use "
                          "gptq_v2")
    return {
        "qweight": pack(layer.codes.T.contiguous(), layer.bits, dim=0).contiguous(),  # (in * b / 32, out)
        "qzeros": pack(fields.T.contiguous().to(torch.uint8), layer.bits, dim=1).contiguous(),  # (G, out * b / 32)
        "scales": layer.scale.T.contiguous(),  # (G, out) float16
        "g_idx": (torch.arange(inf, dtype=torch.int32) // layer.group_size).to(torch.int32),  # (in,)
    }


def zeros_of(t: dict[str, torch.Tensor], bits: int, checkpoint_format: str) -> torch.Tensor:
    """int64 (G, out): the zero points z' of a layer's tensors (v1's z - 1 undone)."""
    out = t["scales"].shape[1]
    fields = unpack(t["qzeros"], bits, dim=1)[:, :out].to(torch.int64)  # (G, out)
    return fields + 1 if checkpoint_format == "gptq" else fields


def group_size_of(t: dict[str, torch.Tensor], in_features: int, name: str) -> int:
    """Inputs per group; FormatError unless g_idx (when present) is i // group_size (act-order is not read)."""
    G = t["scales"].shape[0]
    if not G or in_features % G:
        raise FormatError(f"{name}: {G} groups do not divide in_features {in_features}")
    g = in_features // G
    g_idx = t.get("g_idx")
    if g_idx is not None and not torch.equal(g_idx.to(torch.int64), torch.arange(in_features) // g):
        raise FormatError(f"{name}: g_idx is not i // group_size (act-order GPTQ is not supported)")
    return g


def unpack_layer(t: dict[str, torch.Tensor], bits: int, checkpoint_format: str, name: str = "layer") -> GPTQLayer:
    """Inverse of pack_layer, from the tensors as read from a file (an independent reading of the layout)."""
    qweight, qzeros, scales, g_idx = (t[k] for k in QUANT_SUFFIXES)
    if (qweight.dtype, qzeros.dtype, scales.dtype, g_idx.dtype) != (torch.int32, torch.int32, torch.float16,
                                                                    torch.int32):
        raise FormatError(f"{name}: unexpected dtypes: qweight {qweight.dtype}, qzeros {qzeros.dtype}, "
                          f"scales {scales.dtype}, g_idx {g_idx.dtype}")
    codes = unpack(qweight, bits, dim=0)  # (in, out)
    inf, out = codes.shape
    zero = zeros_of(t, bits, checkpoint_format)  # (G, out)
    if tuple(scales.shape) != tuple(zero.shape) or scales.shape[1] != out or g_idx.numel() != inf:
        raise FormatError(f"{name}: inconsistent shapes: qweight -> {tuple(codes.shape)}, qzeros -> "
                          f"{tuple(zero.shape)}, "
                          f"scales {tuple(scales.shape)}, g_idx {tuple(g_idx.shape)}")
    g = group_size_of(t, inf, name)
    return GPTQLayer(codes=codes.T.contiguous(), zero=zero.T.contiguous(), scale=scales.T.contiguous(), bits=bits,
                     group_size=g)


def read_quant_config(folder) -> dict:
    """config.json's quantization_config of a GPTQ folder; FormatError when it is not one."""
    folder = Path(folder)
    f = folder / "config.json"
    if not f.is_file():
        raise FormatError(f"{folder} is not a Hugging Face model folder (no config.json); "
                          f"make one with `winq export --format gptq`")
    qc = json.loads(f.read_text()).get("quantization_config")
    if not qc or qc.get("quant_method") != "gptq":
        raise FormatError(f"{f} has no GPTQ quantization_config (quant_method gptq)")
    return qc


@dataclass
class GPTQFolder:
    """A GPTQ folder as read from disk."""

    config: dict  # quantization_config
    bits: int
    checkpoint_format: str  # gptq (v1) | gptq_v2
    layers: dict[str, dict[str, torch.Tensor]]  # module name -> {qweight, qzeros, scales[, g_idx]}
    others: dict[str, torch.Tensor]  # every other tensor (embeddings, norms, biases, lm_head)
    layer_bits: dict[str, int] | None = None  # per module: `bits`, or its `dynamic` override (4-bit containers)


def read_folder(folder) -> GPTQFolder:
    """Every tensor of a GPTQ folder's *.safetensors, the quantized layers' grouped by module."""
    from safetensors.torch import load_file

    folder = Path(folder)
    qc = read_quant_config(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{folder}: no .safetensors files")
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    names = sorted({k[: -len(".qweight")] for k in sd if k.endswith(".qweight")})
    layers = {}
    for n in names:
        missing = [s for s in QUANT_SUFFIXES[:3] if f"{n}.{s}" not in sd]
        if missing:
            raise FormatError(f"{folder}: {n} has a qweight but no {', '.join(missing)}")
        layers[n] = {s: sd.pop(f"{n}.{s}") for s in QUANT_SUFFIXES if f"{n}.{s}" in sd}
    return GPTQFolder(config=qc, bits=int(qc["bits"]), checkpoint_format=qc.get("checkpoint_format", "gptq"),
                      layers=layers, others=sd, layer_bits={n: layer_bits(qc, n) for n in layers})
