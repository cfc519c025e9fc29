"""ONNX export: the whole decoder as one graph, every quantized Linear a com.microsoft MatMulNBits.

    export("onnx", "runs/winq", "runs/winq-onnx", block_size=32, accuracy_level=0, two_bit="container")

The folder holds `model.onnx` (the graph), `model.onnx.data` (every tensor of 1 KiB or more,
always external: one layout for every model size, no 2 GB protobuf limit), the tokenizer
files, the checkpoint's `winq.json`, `genai_config.json` for onnxruntime-genai and
`winq-export.json`. Graph I/O (names as onnxruntime-genai expects them):

    inputs   input_ids int64 (batch, seq), attention_mask int64 (batch, past + seq),
             position_ids int64 (batch, seq), past_key_values.N.key / .value float32 (batch, kv_heads, past, head_dim)
    outputs  logits float32 (batch, seq, vocab), present.N.key / .value float32 (batch, kv_heads, past + seq, head_dim)

How the graph is made: the checkpoint's model is traced by torch.onnx.export (TorchScript,
opset 18) with every quantized Linear swapped for a module that multiplies by its
dequantized weight held as a named (in, out) parameter `<module>.weight_t`; that MatMul is
then replaced by a MatMulNBits node built from the QuantizedWeight's codes, scales and
zeros (never from onnxruntime's own quantizer). Nodes are found by the initializer name, not
by scope names; initializer de-duplication is off during the trace, so every layer keeps
its own. Embeddings, norms and a float lm_head stay float32 (the tied lm_head reads the
embedding through a Transpose: stored once).

MatMulNBits (onnxruntime contrib op, domain com.microsoft), for a weight W (N = out, K = in):

    B            uint8   (N, kb, bs * bits / 8)  codes q', bs per block, lowest bits first; kb = ceil(K / bs)
    scales       float32 (N, kb)                 s' per block
    zero_points  uint8   (N, ceil(kb * bits / 8)) packed like B, or float32 (N, kb), or absent: 2^(bits-1)
    W[k, n] = (q'[n, k] - zp[n, k // bs]) * scales[n, k // bs]

Each grid maps exactly: q' = m q + a, zp' = m z + a, s' = s / m give s' (q' - zp') = s (q - z).
With zp' = 2^(bits-1) the zero-point input is omitted (onnxruntime's default).

| grid    | bits | file bits | m, a | zp'                  | s'  |                                          |
|---------|------|-----------|------|----------------------|-----|------------------------------------------|
| lsq     | 4, 8 | 4, 8      | 1, 0 | 8, 128 (default)     | s   | native                                   |
| lsq     | 3    | 4         | 1, 4 | 8 (default)          | s   | container: MatMulNBits has no 3 bits     |
| seq     | 2    | 4         | 2, 5 | 8 (default)          | s/2 | container (two_bit="container")          |
| seq     | 2    | 2         | 1, 0 | 1.5 float32          | s   | two_bit="float-zp": slow path in ORT     |
| ternary | 2    | 2         | 1, 1 | 2 (default)          | s   | codes {1, 2, 3}                          |
| binary  | 1    | 2         | 2, 1 | 2 (default)          | s/2 | codes {1, 3}                             |
| affine  | 2,4,8| b         | 1, 0 | learned z, uint8     | s   | native                                   |
| affine  | 3    | 4         | 1, 0 | learned z, uint8     | s   | container                                |

Exactness: scales are float32 here, so s / 2 of a float16 s is always exact; s' (q' - zp') and
s (q - z) are then the same real number, representable in float32 (11-bit mantissa times an
integer below 2^8): dequantized weights are equal bit for bit, and `verify` checks exactly
that from the file read back. Blocks: a block must not straddle two groups with different
scales, so for grouped scales block_size must divide group_size (per-row scales allow every
block size; K is padded to a whole block with the zero code, which dequantizes to 0).

The export settings (options + the checkpoint's quant settings) are stored as JSON in the
model's metadata_props under "winq.export".
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from winq.errors import ConfigError, MissingDependencyError
from winq.grids import GridSpec
from winq.qweight import QuantizedWeight

from . import Exporter, ExportError, Written, register
from .manifest import FloatRecord, TensorRecord

OPSET = 18  # the TorchScript exporter's tested opset for these models
MS_DOMAIN = "com.microsoft"
BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits: power of two in 16..256
ACCURACY_LEVELS = (0, 4)  # 0: float32 activations (exact path); 4: activations quantized to int8 per block
TWO_BIT = ("container", "float-zp")
NBITS = (2, 4, 8)  # what MatMulNBits runs (3 and 5 are refused at session creation)
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
EXTERNAL_THRESHOLD = 1024  # bytes: every tensor at least this large goes to DATA_FILE
GENAI_CONFIG = "genai_config.json"
METADATA_KEY = "winq.export"
WEIGHT_SUFFIX = ".weight_t"  # name of the placeholder parameter of a quantized layer during the trace
WRAPPED = "lm"  # attribute of the trace wrapper that holds the model (initializer names start with "lm.")
VERIFY_ATOL = 1e-4  # max |ORT logits - fake-quant logits| (relative to max(1, max |logits|)) accepted by verify
PIP = 'pip install "winq[onnx]"'
COPIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "generation_config.json", "winq.json",
)


def require_onnx():
    """(onnx, onnxruntime) or MissingDependencyError with the pip command."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise MissingDependencyError(f"ONNX export needs onnx and onnxruntime ({e.name} is missing): run `{PIP}`") from None
    return onnx, onnxruntime


# ---------------------------------------------------------------------------------------------
# options and the grid -> MatMulNBits mapping


@dataclass(frozen=True)
class ONNXOptions:
    block_size: int = 32  # MatMulNBits block along K: 16, 32, 64, 128 or 256 (must divide a grouped layer's group size)
    accuracy_level: int = 0  # the MatMulNBits attribute: 0 exact float32 activations, 4 int8 activations (faster)
    two_bit: str = "container"  # seq 2-bit: "container" (exact 4-bit codes, fast) | "float-zp" (2-bit, float zp 1.5, slow path)

    def __post_init__(self):
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size not in BLOCK_SIZES:
            raise ConfigError(f"block_size={self.block_size!r}: MatMulNBits takes a power of two in 16..256: choose one of {', '.join(map(str, BLOCK_SIZES))}")
        if isinstance(self.accuracy_level, bool) or self.accuracy_level not in ACCURACY_LEVELS:
            raise ConfigError(f"accuracy_level={self.accuracy_level!r}: choose 0 (float32 activations, exact) or 4 (int8 activations, faster)")
        if self.two_bit not in TWO_BIT:
            raise ConfigError(f"two_bit={self.two_bit!r}: choose container (exact 4-bit codes) or float-zp (2-bit codes, float zero point 1.5, slow in onnxruntime)")


@dataclass(frozen=True)
class Container:
    """How a grid's codes sit in MatMulNBits: q' = mul q + add, zp' = mul z + add, s' = s / mul."""

    bits: int  # bits per code in the file (2, 4 or 8)
    mul: int = 1
    add: int = 0
    float_zero: bool = False  # zero point stored as float32 (exact for half-integers; onnxruntime's slow path)

    @property
    def default_zero(self) -> int:
        return 2 ** (self.bits - 1)

    def describe(self, grid: str, grid_bits: int) -> str:
        """'native' or the mapping, e.g. "4-bit container for 2-bit codes: q' = 2q + 5, zp' = 8 (default), s' = s/2"."""
        z = GridSpec(grid, grid_bits).fixed_zero
        if self.float_zero:
            return f"{self.bits}-bit codes, float32 zero point {z:g} (onnxruntime's slow path)"
        if self.mul == 1 and self.add == 0 and self.bits == grid_bits:
            return "native" + (", uint8 zero points" if z is None else "")
        q = ("q" if self.mul == 1 else f"{self.mul}q") + (f" + {self.add}" if self.add else "")
        zp = "z, uint8" if z is None else f"{self.mul * z + self.add:g}" + (" (default)" if self.mul * z + self.add == self.default_zero else "")
        s = "s" if self.mul == 1 else f"s/{self.mul}"
        head = f"{self.bits}-bit codes" if self.bits == grid_bits else f"{self.bits}-bit container for {grid_bits}-bit codes"
        return f"{head}: q' = {q}, zp' = {zp}, s' = {s}"


CONTAINERS = {
    ("lsq", 3): Container(4, add=4),  # levels -4..3 -> q' 4..11 around 8
    ("lsq", 4): Container(4),
    ("lsq", 8): Container(8),
    ("seq", 2): Container(4, mul=2, add=5),  # levels +-0.5, +-1.5 -> q' 5, 7, 9, 11 around 8, s/2
    ("ternary", 2): Container(2, add=1),  # levels -1, 0, 1 -> q' 1, 2, 3 around 2
    ("binary", 1): Container(2, mul=2, add=1),  # levels +-0.5 -> q' 1, 3 around 2, s/2
    ("affine", 2): Container(2),
    ("affine", 3): Container(4),  # q' = q, zp' = z (0..7) fit 4 bits
    ("affine", 4): Container(4),
    ("affine", 8): Container(8),
}
FLOAT_ZERO = {("seq", 2): Container(2, float_zero=True)}  # two_bit="float-zp"


def container_for(grid: str, bits: int, two_bit: str = "container") -> Container:
    if two_bit == "float-zp" and (grid, bits) in FLOAT_ZERO:
        return FLOAT_ZERO[(grid, bits)]
    try:
        return CONTAINERS[(grid, bits)]
    except KeyError:
        raise ConfigError(
            f"no MatMulNBits mapping for grid {grid!r} with {bits} bits; ONNX holds: " + ", ".join(f"{g}{b}" for g, b in CONTAINERS)
        ) from None


def valid_block_sizes(qw: QuantizedWeight) -> tuple[int, ...]:
    """Block sizes that keep every block inside one scale group (all of them for per-row scales)."""
    return BLOCK_SIZES if qw.per_row else tuple(b for b in BLOCK_SIZES if qw.group_size % b == 0)


@dataclass
class NBitsWeight:
    """One MatMulNBits weight as stored in the file (see the module docstring for the layout)."""

    B: torch.Tensor  # uint8 (N, kb, bs * bits / 8)
    scales: torch.Tensor  # float32 (N, kb)
    zero_points: torch.Tensor | None  # uint8 (N, ceil(kb * bits / 8)) | float32 (N, kb) | None (2^(bits-1))
    K: int
    N: int
    bits: int
    block_size: int

    @property
    def nbytes(self) -> int:
        zp = 0 if self.zero_points is None else self.zero_points.numel() * self.zero_points.element_size()
        return self.B.numel() + self.scales.numel() * self.scales.element_size() + zp

    def codes(self) -> torch.Tensor:
        """uint8 (N, K): the codes q' unpacked from B (an independent reading of the layout)."""
        N, kb, blob = self.B.shape
        return unpack_codes(self.B.reshape(N, kb * blob), self.bits)[:, : self.K]

    def zeros(self) -> torch.Tensor:
        """float32 (N, kb): zp' per block."""
        N, kb = self.scales.shape
        if self.zero_points is None:
            return torch.full((N, kb), float(2 ** (self.bits - 1)))
        if self.zero_points.dtype == torch.float32:
            return self.zero_points.reshape(N, kb)
        return unpack_codes(self.zero_points, self.bits)[:, :kb].to(torch.float32)

    def dequantize(self) -> torch.Tensor:
        """float32 (N, K): (q' - zp') * s' per block, as MatMulNBits defines it."""
        N, kb, blob = self.B.shape
        q = unpack_codes(self.B.reshape(N, kb * blob), self.bits).to(torch.float32).reshape(N, kb, self.block_size)  # (N, kb, bs)
        w = (q - self.zeros()[..., None]) * self.scales.reshape(N, kb)[..., None]  # (N, kb, bs)
        return w.reshape(N, kb * self.block_size)[:, : self.K]


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 (N, bytes) -> uint8 (N, bytes * 8 / bits): value j of a byte sits at bits j*bits (lowest first)."""
    per = 8 // bits
    mask = 2**bits - 1
    parts = [(packed >> (bits * j)) & mask for j in range(per)]
    return torch.stack(parts, dim=-1).reshape(packed.shape[0], -1)  # (N, bytes, per) -> (N, bytes * per)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 (N, L) values < 2^bits, L a multiple of 8 / bits -> uint8 (N, L * bits / 8), lowest bits first."""
    N, L = codes.shape
    per = 8 // bits
    v = codes.to(torch.uint8).reshape(N, L // per, per)  # (N, bytes, per)
    out = v[..., 0].clone()
    for j in range(1, per):
        out |= v[..., j] << (bits * j)
    return out


def map_weight(name: str, qw: QuantizedWeight, block_size: int, two_bit: str = "container") -> NBitsWeight:
    """The exact MatMulNBits form of one QuantizedWeight; ConfigError / ExportError if it has none."""
    c = container_for(qw.grid, qw.bits, two_bit)
    N, K = qw.shape
    bs = block_size
    if bs not in valid_block_sizes(qw):
        ok = valid_block_sizes(qw)
        fix = (f"use block_size one of {', '.join(map(str, ok))}" if ok
               else "no MatMulNBits block size (16..256) divides it: retrain with a group size that is a multiple of 16, or per row")
        raise ConfigError(
            f"{name}: group_size={qw.group_size} is not a multiple of block_size={bs}: a MatMulNBits block would straddle "
            f"two scale groups with different scales; {fix}"
        )
    kb = -(-K // bs)
    Kp = kb * bs
    top = 2**c.bits - 1
    if int(qw.codes.max()) * c.mul + c.add > top:
        raise ExportError(f"{name}: codes up to {int(qw.codes.max()) * c.mul + c.add} do not fit {c.bits} bits")
    codes = qw.codes * c.mul + c.add if (c.mul, c.add) != (1, 0) else qw.codes  # uint8 (N, K): fits, checked above
    zero = qw.zero * c.mul + c.add  # float32 (N, G)
    # per block: the group of its first input (a block lies inside one group, see valid_block_sizes)
    grp = (torch.arange(kb) * bs) // qw.group_size  # (kb,)
    scale = qw.scale.to(torch.float32)[:, grp] / c.mul  # (N, kb): exact in float32 (a power-of-two divisor)
    zb = zero[:, grp]  # (N, kb)
    if c.float_zero:
        zero_points = zb.contiguous()  # float32 (N, kb)
        pad_code = torch.zeros(N, 1, dtype=torch.int64)  # no code dequantizes to 0 here; padded inputs are never read
    else:
        if not torch.equal(zb, torch.round(zb)) or zb.min() < 0 or zb.max() > top:
            raise ExportError(f"{name}: zero points {zb.unique()[:4].tolist()} are not integers in 0..{top}")
        zi = zb.to(torch.int64)
        if bool((zi == c.default_zero).all()):
            zero_points = None
        else:
            per = 8 // c.bits
            zpad = -(-kb // per) * per
            zfull = torch.full((N, zpad), c.default_zero, dtype=torch.int64)
            zfull[:, :kb] = zi
            zero_points = pack_codes(zfull.to(torch.uint8), c.bits)  # (N, ceil(kb * bits / 8))
        pad_code = zi[:, -1:]  # the last block's zero: padded inputs dequantize to 0
    full = torch.empty(N, Kp, dtype=torch.uint8)
    full[:, :K] = codes
    full[:, K:] = pad_code.to(torch.uint8)
    B = pack_codes(full, c.bits).reshape(N, kb, bs * c.bits // 8)
    return NBitsWeight(B=B.contiguous(), scales=scale.contiguous(), zero_points=zero_points, K=K, N=N, bits=c.bits, block_size=bs)


# ---------------------------------------------------------------------------------------------
# tracing the decoder with its KV cache


class _ExportLinear(nn.Module):
    """x @ weight_t (+ bias): the traced stand-in of a quantized Linear, its weight a named (in, out) parameter."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight_t = nn.Parameter(weight.detach().t().contiguous(), requires_grad=False)  # (in, out)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


class _Decoder(nn.Module):
    """Flat tensors in and out: past_key_values.N.key/value -> a DynamicCache -> present.N.key/value."""

    def __init__(self, model, n_layers: int):
        super().__init__()
        setattr(self, WRAPPED, model)
        self.n_layers = n_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        model = getattr(self, WRAPPED)
        cache = DynamicCache(config=model.config)
        for i in range(self.n_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=cache, use_cache=True)
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    kv = [f"{i}.{k}" for i in range(n_layers) for k in ("key", "value")]
    return (["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{x}" for x in kv],
            ["logits"] + [f"present.{x}" for x in kv])


def kv_shape(config) -> tuple[int, int]:
    """(kv heads, head dim) of a transformers config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return getattr(config, "num_key_value_heads", None) or heads, head_dim


def trace_decoder(model, path: Path, quantized: dict[str, QuantizedWeight] | None = None) -> None:
    """torch.onnx.export the float decoder to `path` (float32, quantized layers as MatMul by `<name>.weight_t`).

    `quantized` layers are swapped (and swapped back afterwards) for _ExportLinear holding
    their dequantized weight; other modules are traced as they are. The model is not changed.
    """
    import warnings

    cfg = model.config
    n_layers = cfg.num_hidden_layers
    swapped = {}
    try:
        for name, qw in (quantized or {}).items():
            mod = model.get_submodule(name)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            swapped[name] = (parent, child, mod)
            setattr(parent, child, _ExportLinear(qw.dequantize(), getattr(mod, "bias", None)))
        wrapper = _Decoder(model, n_layers).eval()
        B, T, P = 2, 3, 2  # traced shapes; every axis below is dynamic
        H, D = kv_shape(cfg)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
        mask = torch.ones(B, P + T, dtype=torch.int64)
        pos = torch.arange(P, P + T)[None].expand(B, T).contiguous()
        past = [torch.zeros(B, H, P, D) for _ in range(2 * n_layers)]
        names_in, names_out = io_names(n_layers)
        dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
               "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
        dyn.update({n: {0: "batch", 2: "past"} for n in names_in[3:]})
        dyn.update({n: {0: "batch", 2: "total"} for n in names_out[1:]})
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(
                wrapper, (ids, mask, pos, *past), str(path), input_names=names_in, output_names=names_out,
                dynamic_axes=dyn, opset_version=OPSET, dynamo=False, do_constant_folding=True,
                keep_initializers_as_inputs=True,  # turns off initializer de-duplication: one initializer per layer
            )
    finally:
        for parent, child, mod in swapped.values():
            setattr(parent, child, mod)


def _load_traced(path: Path):
    """The traced graph with its parameters moved from graph inputs to plain initializers, tied copies undone."""
    onnx, _ = require_onnx()
    m = onnx.load(str(path))
    inits = {i.name for i in m.graph.initializer}
    keep = [i for i in m.graph.input if i.name not in inits]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    _untie_transposed(m)
    return m


def _untie_transposed(m) -> None:
    """A MatMul weight that is the transpose of another initializer (a tied lm_head: the tracer folds
    embedding.T into a new tensor) reads that initializer through a Transpose node instead: stored once.
    onnxruntime folds the Transpose when the session is created."""
    from onnx import helper, numpy_helper

    g = m.graph
    # quantized layers' placeholders are never tied copies (and are replaced later): leave them out
    by_name = {t.name: t for t in g.initializer if not t.name.endswith(WEIGHT_SUFFIX)}
    arrays = {}

    def arr(t):
        if t.name not in arrays:
            arrays[t.name] = numpy_helper.to_array(t)
        return arrays[t.name]

    for node in list(g.node):
        if node.op_type != "MatMul" or node.input[1] not in by_name:
            continue
        b = by_name[node.input[1]]
        if len(b.dims) != 2:
            continue
        for e in list(by_name.values()):
            if e.name != b.name and list(e.dims) == list(b.dims)[::-1] and e.data_type == b.data_type:
                if (arr(e).T == arr(b)).all():
                    out = f"{e.name}.T"
                    if out not in {o for n in g.node for o in n.output}:
                        g.node.insert(0, helper.make_node("Transpose", [e.name], [out], name=f"{e.name}/Transpose", perm=[1, 0]))
                    node.input[1] = out
                    if not any(b.name in n.input for n in g.node):
                        g.initializer.remove(b)
                        del by_name[b.name]
                    break


def save_model(m, folder: Path) -> None:
    """model.onnx + model.onnx.data (every tensor of EXTERNAL_THRESHOLD bytes or more)."""
    onnx, _ = require_onnx()
    onnx.save_model(m, str(folder / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=EXTERNAL_THRESHOLD, convert_attribute=False)
    mask = os.umask(0)
    os.umask(mask)
    for f in (MODEL_FILE, DATA_FILE):  # onnx creates the data file 0600; give both the usual permissions
        if (folder / f).is_file():
            os.chmod(folder / f, 0o666 & ~mask)


def export_float(model, folder: Path, metadata: dict | None = None) -> None:
    """A plain float32 ONNX of `model` (QuantLinear layers as their dequantized weights) into folder."""
    from winq.prepare import quantized_weights, quant_layers

    folder = Path(folder)
    quant = quantized_weights(model) if quant_layers(model) else {}
    work = folder / ".trace"
    work.mkdir(parents=True, exist_ok=True)
    try:
        trace_decoder(model, work / MODEL_FILE, quant)
        m = _load_traced(work / MODEL_FILE)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    m.producer_name = "winq"
    if metadata is not None:
        _set_metadata(m, metadata)
    save_model(m, folder)


def _set_metadata(m, meta: dict) -> None:
    for p in list(m.metadata_props):
        if p.key == METADATA_KEY:
            m.metadata_props.remove(p)
    p = m.metadata_props.add()
    p.key, p.value = METADATA_KEY, json.dumps(meta, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# the graph surgery: MatMul by `<name>.weight_t` -> MatMulNBits


def replace_matmuls(m, layers: dict[str, NBitsWeight], accuracy_level: int) -> None:
    """Replace the MatMul that reads `lm.<name>.weight_t` by MatMulNBits for every layer (in place)."""
    onnx, _ = require_onnx()
    from onnx import helper, numpy_helper

    g = m.graph
    wanted = {f"{WRAPPED}.{n}{WEIGHT_SUFFIX}": n for n in layers}
    users: dict[str, list[int]] = {}
    for idx, node in enumerate(g.node):
        for x in node.input:
            if x in wanted:
                users.setdefault(x, []).append(idx)
    for w, n in wanted.items():
        idx = users.get(w, [])
        if len(idx) != 1 or g.node[idx[0]].op_type != "MatMul" or list(g.node[idx[0]].input)[1:] != [w]:
            found = [g.node[i].op_type for i in idx]
            raise ExportError(f"{n}: expected one MatMul reading {w} in the traced graph, found {found or 'none'}")
    new_inits = []
    for w, n in wanted.items():
        i = users[w][0]
        old = g.node[i]
        L = layers[n]
        inputs = [old.input[0], f"{n}.qweight", f"{n}.scales"]
        new_inits += [numpy_helper.from_array(L.B.numpy(), f"{n}.qweight"),
                      numpy_helper.from_array(L.scales.numpy(), f"{n}.scales")]
        if L.zero_points is not None:
            inputs.append(f"{n}.qzeros")
            new_inits.append(numpy_helper.from_array(L.zero_points.numpy(), f"{n}.qzeros"))
        node = helper.make_node("MatMulNBits", inputs, list(old.output), name=f"{n}/MatMulNBits", domain=MS_DOMAIN,
                                K=L.K, N=L.N, bits=L.bits, block_size=L.block_size, accuracy_level=accuracy_level)
        g.node.remove(old)
        g.node.insert(i, node)
    keep = [t for t in g.initializer if t.name not in wanted]
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    if not any(o.domain == MS_DOMAIN for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def read_nbits(folder: Path) -> tuple[dict[str, NBitsWeight], dict[str, dict]]:
    """({module name: NBitsWeight}, {module name: node attributes}) read back from the written files."""
    onnx, _ = require_onnx()
    from onnx import helper, numpy_helper

    m = onnx.load(str(Path(folder) / MODEL_FILE))  # with the external data
    inits = {t.name: t for t in m.graph.initializer}
    out, attrs = {}, {}
    for node in m.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        n = node.name.removesuffix("/MatMulNBits")
        try:
            arr = [torch.from_numpy(numpy_helper.to_array(inits[x]).copy()) for x in node.input[1:]]
        except KeyError as e:
            raise ExportError(f"{MODEL_FILE}: {node.name} reads {e.args[0]}, which is not an initializer") from None
        B, scales = arr[0], arr[1]
        zp = arr[2] if len(arr) > 2 else None
        if B.dtype != torch.uint8 or scales.dtype != torch.float32 or B.dim() != 3:
            raise ExportError(f"{node.name}: B {B.dtype} {tuple(B.shape)}, scales {scales.dtype}: expected uint8 (N, kb, blob) and float32")
        kb = B.shape[1]
        out[n] = NBitsWeight(B=B, scales=scales.reshape(a["N"], kb), zero_points=zp, K=a["K"], N=a["N"], bits=a["bits"], block_size=a["block_size"])
        attrs[n] = a
    return out, attrs


# ---------------------------------------------------------------------------------------------
# onnxruntime sessions (the runtime's loader lives in winq.runtime.ort; this one is for verify)


def make_session(folder: Path, accuracy_level: int | None = None, threads: int | None = None):
    """An onnxruntime CPU session of folder/model.onnx; accuracy_level rewrites every MatMulNBits in memory."""
    onnx, ort = require_onnx()
    from onnx import helper

    folder = Path(folder)
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # never a lossy DQ fusion behind our back
    if accuracy_level is None:
        return ort.InferenceSession(str(folder / MODEL_FILE), so, providers=["CPUExecutionProvider"])
    m = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
    for node in m.graph.node:
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level":
                    node.attribute.remove(a)
                    break
            node.attribute.append(helper.make_attribute("accuracy_level", int(accuracy_level)))
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder.resolve()))
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def session_logits(sess, ids: torch.Tensor, n_prefill: int | None = None) -> torch.Tensor:
    """float32 (T, V) logits of ids (T,): a prefill of n_prefill tokens (all by default), then one token at a time."""
    import numpy as np

    ids = ids.to(torch.int64).reshape(-1)
    T = ids.numel()
    n_prefill = T if n_prefill is None else n_prefill
    past_inputs = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    feeds_past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=np.float32) for i in past_inputs}
    names = [o.name for o in sess.get_outputs()]
    out, start = [], 0
    for stop in [n_prefill] + list(range(n_prefill + 1, T + 1)):
        x = ids[start:stop].numpy()[None]
        feeds = {"input_ids": x, "attention_mask": np.ones((1, stop), dtype=np.int64),
                 "position_ids": np.arange(start, stop, dtype=np.int64)[None], **feeds_past}
        res = dict(zip(names, sess.run(None, feeds)))
        out.append(torch.from_numpy(res["logits"][0]))
        feeds_past = {n: res[n.replace("past_key_values.", "present.")] for n in feeds_past}
        start = stop
    return torch.cat(out)


def check_ids(vocab_size: int, n: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab_size, (n,), generator=torch.Generator().manual_seed(1234))


# ---------------------------------------------------------------------------------------------
# genai_config.json for onnxruntime-genai


def genai_config(config, tokenizer) -> dict:
    H, D = kv_shape(config)
    eos = config.eos_token_id if config.eos_token_id is not None else getattr(tokenizer, "eos_token_id", 0)
    pad = config.pad_token_id if getattr(config, "pad_token_id", None) is not None else (eos if isinstance(eos, int) else eos[0])
    return {
        "model": {
            "bos_token_id": config.bos_token_id if config.bos_token_id is not None else pad,
            "context_length": config.max_position_embeddings,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": D,
                "hidden_size": config.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
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
            "max_length": config.max_position_embeddings, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


# ---------------------------------------------------------------------------------------------
# the exporter


@register("onnx")
class ONNXExporter(Exporter):
    """`winq export --format onnx`: see the module docstring."""

    name = "onnx"
    Options = ONNXOptions

    def write(self, folder: Path, model, qws: dict[str, QuantizedWeight], tokenizer, checkpoint: Path, opt: ONNXOptions) -> Written:
        onnx, _ = require_onnx()
        import winq

        folder = Path(folder)
        checkpoint = Path(checkpoint)
        # map every layer first: a refusal costs no trace and leaves nothing half-written
        layers = {n: map_weight(n, qw, opt.block_size, opt.two_bit) for n, qw in qws.items()}
        notes, records = [], []
        kinds = sorted({(qw.grid, qw.bits) for qw in qws.values()})
        for grid, bits in kinds:
            c = container_for(grid, bits, opt.two_bit)
            if c.float_zero:
                notes.append(f"{grid} {bits}-bit weights are stored as 2-bit codes with a float32 zero point 1.5: exact, but "
                             f"onnxruntime runs float zero points on its slow path (two_bit='container' is faster)")
            elif c.bits != max(bits, 2):
                notes.append(f"{grid} {bits}-bit weights are stored in the exact {c.describe(grid, bits)}"
                             + (" (MatMulNBits has no 3-bit kernel)" if bits == 3 else ""))
        for n, qw in qws.items():
            L = layers[n]
            c = container_for(qw.grid, qw.bits, opt.two_bit)
            records.append(TensorRecord(
                name=n, grid=qw.grid, bits=qw.bits, container_bits=L.bits, container=c.describe(qw.grid, qw.bits),
                group_size=qw.group_size, shape=tuple(qw.shape), bytes=L.nbytes,
                bits_per_weight=round(8 * L.nbytes / (qw.shape[0] * qw.shape[1]), 4),
            ))
        # the fake-quant reference verify() compares onnxruntime with
        ids = check_ids(model.config.vocab_size)
        with torch.no_grad():
            self._reference = (ids, model(input_ids=ids[None]).logits[0].float())

        info_path = checkpoint / "winq.json"
        ckpt_quant = json.loads(info_path.read_text()).get("quant") if info_path.is_file() else None
        meta = {"format": "onnx", "winq_version": winq.__version__, "options": asdict(opt), "quant": ckpt_quant,
                "containers": {f"{g}{b}": container_for(g, b, opt.two_bit).describe(g, b) for g, b in kinds}}
        work = folder / ".trace"
        work.mkdir()
        try:
            trace_decoder(model, work / MODEL_FILE, qws)
            m = _load_traced(work / MODEL_FILE)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        replace_matmuls(m, layers, opt.accuracy_level)
        m.producer_name = "winq"
        m.producer_version = winq.__version__
        _set_metadata(m, meta)
        floats = []
        for t in m.graph.initializer:
            if t.data_type == onnx.TensorProto.FLOAT and not t.name.endswith(".scales"):
                floats.append(FloatRecord(name=t.name.removeprefix(f"{WRAPPED}."), dtype="float32", shape=tuple(t.dims), max_abs_err=0.0))
        save_model(m, folder)
        del m
        for f in COPIED_FILES:
            if (checkpoint / f).is_file():
                shutil.copy2(checkpoint / f, folder / f)
        if not (folder / "tokenizer_config.json").is_file() and tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
        (folder / GENAI_CONFIG).write_text(json.dumps(genai_config(model.config, tokenizer), indent=2) + "\n")
        model.config.save_pretrained(str(folder))  # config.json: what a reader needs to know the architecture
        info = {
            "opset": OPSET, "block_size": opt.block_size, "accuracy_level": opt.accuracy_level, "two_bit": opt.two_bit,
            "model_file": MODEL_FILE, "data_file": DATA_FILE, "external_threshold_bytes": EXTERNAL_THRESHOLD,
            "metadata_key": METADATA_KEY, "genai_config": GENAI_CONFIG,
            "containers": meta["containers"],
        }
        return Written(tensors=records, floats=floats, notes=notes, info=info)

    def verify(self, folder: Path, qws: dict[str, QuantizedWeight], written: Written) -> dict[str, float]:
        """max |dequant(file) - QuantizedWeight.dequantize()| per layer from the file read back; then onnxruntime vs fake-quant logits."""
        folder = Path(folder)
        layers, attrs = read_nbits(folder)
        missing = [n for n in qws if n not in layers]
        if missing:
            raise ExportError(f"{MODEL_FILE} has no MatMulNBits for {len(missing)} quantized layers (first: {missing[0]})")
        errors = {}
        for n, qw in qws.items():
            L, a = layers[n], attrs[n]
            ref = qw.dequantize()
            if (a["N"], a["K"]) != tuple(ref.shape) or L.B.shape[2] != L.block_size * L.bits // 8:
                errors[n] = math.inf
                continue
            errors[n] = float((L.dequantize() - ref).abs().max())
        if any(e != 0.0 for e in errors.values()):
            return errors  # export() names the first layer that differs
        ids, ref_logits = self._reference
        sess = make_session(folder, accuracy_level=0)
        got = session_logits(sess, ids, n_prefill=len(ids) - 3)  # a prefill, then 3 steps with the KV cache
        diff = float((got - ref_logits).abs().max())
        tol = VERIFY_ATOL * max(1.0, float(ref_logits.abs().max()))
        written.info["ort_check"] = {"tokens": len(ids), "decode_steps": 3, "accuracy_level": 0, "max_abs_logit_diff": diff, "tolerance": tol}
        if not diff <= tol:
            raise ExportError(
                f"onnxruntime's logits differ from the fake-quant model's by {diff:.3g} (tolerance {tol:.3g}) although every "
                f"weight reads back exactly: the traced graph does not compute the model"
            )
        return errors


__all__ = [
    "ONNXExporter", "ONNXOptions", "Container", "CONTAINERS", "NBitsWeight", "container_for", "map_weight",
    "pack_codes", "read_nbits", "replace_matmuls", "trace_decoder", "export_float", "make_session", "session_logits",
    "genai_config", "io_names", "valid_block_sizes", "MODEL_FILE", "DATA_FILE", "METADATA_KEY",
]
