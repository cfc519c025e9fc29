"""ONNX MatMulNBits both ways, and onnxruntime sessions of a decoder export: the exporter writes and
verifies through here, the runtime's `ort` backend runs through here.

MatMulNBits (onnxruntime contrib op, domain com.microsoft), for a weight W (N = out, K = in):

    B            uint8   (N, kb, bs * bits / 8)  codes q', bs per block, lowest bits first; kb = ceil(K / bs)
    scales       float32 (N, kb)                 s' per block
    zero_points  uint8   (N, ceil(kb * bits / 8)) packed like B, or float32 (N, kb), or absent: 2^(bits-1)
    W[k, n] = (q'[n, k] - zp[n, k // bs]) * scales[n, k // bs]

Each grid maps exactly by the rule of winq.formats.containers (q' = m q + a, zp' = m z + a,
s' = s / m); with zp' = 2^(bits-1) the zero-point input is omitted (onnxruntime's default):

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

Scales are float32 here, so s / 2 of a float16 s is always exact. A block must not straddle two
groups with different scales, so for grouped scales block_size must divide group_size (per-row
scales allow every block size; K is padded to a whole block with the zero code, which
dequantizes to 0). The byte packing is written by hand: onnxruntime's own quantizer re-rounds.

A decoder export's graph I/O (names as onnxruntime-genai expects them; `io_names`):

    inputs   input_ids int64 (batch, seq), attention_mask int64 (batch, past + seq),
             position_ids int64 (batch, seq), past_key_values.N.key / .value float32 (batch, kv_heads, past, head_dim)
    outputs  logits float32 (batch, seq, vocab), present.N.key / .value float32 (batch, kv_heads, past + seq, head_dim)

`OrtDecoder` runs it: `prefill(ids)` from an empty past, then `step(token)` feeding the presents
back. `open_session(accuracy_level=...)` rewrites every MatMulNBits' accuracy_level in memory
(level 0: float32 activations, exact; level 4: int8 activations per block, faster).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from winq.errors import ConfigError, FormatError, ModelError, MissingDependencyError, require
from winq.grids import GridSpec
from winq.qweight import QuantizedWeight

from .containers import Container, lookup

MS_DOMAIN = "com.microsoft"
BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits: power of two in 16..256
ACCURACY_LEVELS = (0, 4)  # 0: float32 activations (exact path); 4: activations quantized to int8 per block
NBITS = (2, 4, 8)  # what MatMulNBits runs (3 and 5 are refused at session creation)
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
EXTERNAL_THRESHOLD = 1024  # bytes: every tensor at least this large goes to DATA_FILE
METADATA_KEY = "winq.export"  # metadata_props key of the export settings (JSON)

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


def require_onnx(purpose: str = "ONNX export"):
    """(onnx, onnxruntime), or MissingDependencyError with the pip command."""
    return require("onnx", "onnxruntime", extra="onnx", purpose=purpose)


def default_zero(bits: int) -> int:
    """MatMulNBits' zero point when the zero_points input is absent."""
    return 2 ** (bits - 1)


def container_for(grid: str, bits: int, two_bit: str = "container") -> Container:
    if two_bit == "float-zp" and (grid, bits) in FLOAT_ZERO:
        return FLOAT_ZERO[(grid, bits)]
    return lookup(CONTAINERS, grid, bits, "MatMulNBits")


def describe(c: Container, grid: str, bits: int) -> str:
    """'native' or the mapping, e.g. "4-bit container for 2-bit codes: q' = 2q + 5, zp' = 8 (default), s' = s/2"."""
    z = GridSpec(grid, bits).fixed_zero
    if c.float_zero:
        return f"{c.bits}-bit codes, float32 zero point {z:g} (onnxruntime's slow path)"
    d = c.describe(grid, bits, zero_name="zp'", default_zero=default_zero(c.bits), learned_zero="z, uint8")
    return "native, uint8 zero points" if d == "native" and z is None else d


def valid_block_sizes(qw: QuantizedWeight) -> tuple[int, ...]:
    """Block sizes that keep every block inside one scale group (all of them for per-row scales)."""
    return BLOCK_SIZES if qw.per_row else tuple(b for b in BLOCK_SIZES if qw.group_size % b == 0)


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
            return torch.full((N, kb), float(default_zero(self.bits)))
        if self.zero_points.dtype == torch.float32:
            return self.zero_points.reshape(N, kb)
        return unpack_codes(self.zero_points, self.bits)[:, :kb].to(torch.float32)

    def dequantize(self) -> torch.Tensor:
        """float32 (N, K): (q' - zp') * s' per block, as MatMulNBits defines it."""
        N, kb, blob = self.B.shape
        q = unpack_codes(self.B.reshape(N, kb * blob), self.bits).to(torch.float32)
        q = q.reshape(N, kb, self.block_size)  # (N, kb, bs)
        w = (q - self.zeros()[..., None]) * self.scales.reshape(N, kb)[..., None]  # (N, kb, bs)
        return w.reshape(N, kb * self.block_size)[:, : self.K]


def map_weight(name: str, qw: QuantizedWeight, block_size: int, two_bit: str = "container") -> NBitsWeight:
    """The exact MatMulNBits form of one QuantizedWeight; ConfigError / FormatError if it has none."""
    c = container_for(qw.grid, qw.bits, two_bit)
    N, K = qw.shape
    bs = block_size
    if bs not in valid_block_sizes(qw):
        ok = valid_block_sizes(qw)
        fix = (f"use block_size one of {', '.join(map(str, ok))}" if ok else
               "no MatMulNBits block size (16..256) divides it: retrain with a group size that is a multiple of 16, "
               "or per row")
        raise ConfigError(
            f"{name}: group_size={qw.group_size} is not a multiple of block_size={bs}: a MatMulNBits block would "
            f"straddle two scale groups with different scales; {fix}"
        )
    r = c.remap(qw, name, scale_dtype=torch.float32)  # codes, zeros checked; s / m exact in float32
    kb = -(-K // bs)
    grp = (torch.arange(kb) * bs) // qw.group_size  # (kb,): the group of each block's first input
    scale = r.scale[:, grp]  # (N, kb)
    zb = r.zero[:, grp]  # (N, kb)
    if c.float_zero:
        zero_points = zb.contiguous()  # float32 (N, kb)
        pad_code = torch.zeros(N, 1, dtype=torch.int64)  # no code dequantizes to 0 here; padded inputs are never read
    else:
        zi = zb.to(torch.int64)
        if bool((zi == default_zero(c.bits)).all()):
            zero_points = None
        else:
            per = 8 // c.bits
            zfull = torch.full((N, -(-kb // per) * per), default_zero(c.bits), dtype=torch.int64)
            zfull[:, :kb] = zi
            zero_points = pack_codes(zfull.to(torch.uint8), c.bits)  # (N, ceil(kb * bits / 8))
        pad_code = zi[:, -1:]  # the last block's zero: padded inputs dequantize to 0
    full = torch.empty(N, kb * bs, dtype=torch.uint8)
    full[:, :K] = r.codes
    full[:, K:] = pad_code.to(torch.uint8)
    B = pack_codes(full, c.bits).reshape(N, kb, bs * c.bits // 8)
    return NBitsWeight(B=B.contiguous(), scales=scale.contiguous(), zero_points=zero_points, K=K, N=N, bits=c.bits,
                       block_size=bs)


# ---------------------------------------------------------------------------------------------
# the graph's bytes: MatMulNBits nodes, metadata, model.onnx + model.onnx.data


def make_node(name: str, L: NBitsWeight, x: str, y: str, accuracy_level: int):
    """(node, initializers) of a MatMulNBits computing y = x @ W for the weight named `name`."""
    require_onnx()
    from onnx import helper, numpy_helper

    inputs = [x, f"{name}.qweight", f"{name}.scales"]
    inits = [numpy_helper.from_array(L.B.numpy(), f"{name}.qweight"),
             numpy_helper.from_array(L.scales.numpy(), f"{name}.scales")]
    if L.zero_points is not None:
        inputs.append(f"{name}.qzeros")
        inits.append(numpy_helper.from_array(L.zero_points.numpy(), f"{name}.qzeros"))
    node = helper.make_node("MatMulNBits", inputs, [y], name=f"{name}/MatMulNBits", domain=MS_DOMAIN,
                            K=L.K, N=L.N, bits=L.bits, block_size=L.block_size, accuracy_level=accuracy_level)
    return node, inits


def set_metadata(m, meta: dict) -> None:
    """Store `meta` as JSON in the model's metadata_props under METADATA_KEY (replacing an older value)."""
    for p in list(m.metadata_props):
        if p.key == METADATA_KEY:
            m.metadata_props.remove(p)
    p = m.metadata_props.add()
    p.key, p.value = METADATA_KEY, json.dumps(meta, sort_keys=True)


def save_model(m, folder: Path) -> None:
    """model.onnx + model.onnx.data (every tensor of EXTERNAL_THRESHOLD bytes or more)."""
    onnx, _ = require_onnx()
    folder = Path(folder)
    onnx.save_model(m, str(folder / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=EXTERNAL_THRESHOLD, convert_attribute=False)
    mask = os.umask(0)
    os.umask(mask)
    for f in (MODEL_FILE, DATA_FILE):  # onnx creates the data file 0600; give both the usual permissions
        if (folder / f).is_file():
            os.chmod(folder / f, 0o666 & ~mask)


def load_graph(path, weights: bool = False):
    """The ModelProto of a model.onnx (or of a folder's), with its external weights only when asked."""
    onnx = require("onnx", extra="onnx", purpose="reading ONNX")
    path = Path(path)
    return onnx.load(str(path / MODEL_FILE if path.is_dir() else path), load_external_data=weights)


def read_nbits(folder) -> tuple[dict[str, NBitsWeight], dict[str, dict]]:
    """({module name: NBitsWeight}, {module name: node attributes}) read back from the written files."""
    require_onnx()
    from onnx import helper, numpy_helper

    m = load_graph(folder, weights=True)
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
            raise FormatError(f"{MODEL_FILE}: {node.name} reads {e.args[0]}, which is not an initializer") from None
        B, scales = arr[0], arr[1]
        zp = arr[2] if len(arr) > 2 else None
        if B.dtype != torch.uint8 or scales.dtype != torch.float32 or B.dim() != 3:
            raise FormatError(f"{node.name}: B {B.dtype} {tuple(B.shape)}, scales {scales.dtype}: "
                              f"expected uint8 (N, kb, blob) and float32")
        kb = B.shape[1]
        out[n] = NBitsWeight(B=B, scales=scales.reshape(a["N"], kb), zero_points=zp, K=a["K"], N=a["N"], bits=a["bits"],
                             block_size=a["block_size"])
        attrs[n] = a
    return out, attrs


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    """(input names, output names) of a decoder export with n_layers layers."""
    kv = [f"{i}.{k}" for i in range(n_layers) for k in ("key", "value")]
    return (["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{x}" for x in kv],
            ["logits"] + [f"present.{x}" for x in kv])


def kv_shape(config) -> tuple[int, int]:
    """(kv heads, head dim) of a transformers config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return getattr(config, "num_key_value_heads", None) or heads, head_dim


# ---------------------------------------------------------------------------------------------
# onnxruntime


def check_folder(folder) -> Path:
    """`folder` if it holds model.onnx; ModelError saying how to make one otherwise."""
    folder = Path(folder)
    if not folder.exists():
        raise ModelError(f"ONNX export {folder} not found; make one with `winq export --format onnx --out {folder}`")
    if not folder.is_dir() or not (folder / MODEL_FILE).is_file():
        raise ModelError(f"{folder} is not an ONNX export (no {MODEL_FILE} inside); make one with `winq export "
                         "--format onnx`")
    return folder


def open_session(folder, threads: int | None = None, accuracy_level: int | None = None,
                 profile_prefix: str | None = None):
    """An onnxruntime CPU InferenceSession of folder/model.onnx; accuracy_level rewrites every MatMulNBits
    in memory (the graph without its weights; the session reads them from the folder). profile_prefix turns on
    onnxruntime's profiler (its JSON trace: session.end_profiling())."""
    folder = check_folder(folder)
    ort = require("onnxruntime", extra="onnx", purpose="running an ONNX export")
    if accuracy_level is not None and (isinstance(accuracy_level, bool) or accuracy_level not in ACCURACY_LEVELS):
        raise ConfigError(f"accuracy_level={accuracy_level!r}: choose 0 (float32 activations, exact) "
                          f"or 4 (int8 activations)")
    so = ort.SessionOptions()
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    # never a lossy DQ fusion behind our back
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    try:
        if accuracy_level is None:
            return ort.InferenceSession(str(folder / MODEL_FILE), so, providers=["CPUExecutionProvider"])
        require("onnx", extra="onnx", purpose="rewriting accuracy_level")
        from onnx import helper

        m = load_graph(folder)  # the graph only: small
        n = 0
        for node in m.graph.node:
            if node.op_type == "MatMulNBits":
                kept = [a for a in node.attribute if a.name != "accuracy_level"]
                del node.attribute[:]
                node.attribute.extend(kept + [helper.make_attribute("accuracy_level", int(accuracy_level))])
                n += 1
        if n == 0:
            raise ConfigError(f"{folder / MODEL_FILE} has no MatMulNBits nodes: accuracy_level applies to quantized "
                              f"exports only")
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder.resolve()))
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except (ConfigError, MissingDependencyError):
        raise
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...) for unreadable files
        raise ModelError(f"onnxruntime cannot load {folder / MODEL_FILE}: {type(e).__name__}: {e}") from None


class OrtDecoder:
    """A session of a decoder export plus the KV-cache plumbing, batch 1: `prefill(ids)`, then `step(token)`."""

    def __init__(self, folder, threads: int | None = None, accuracy_level: int | None = None,
                 profile_prefix: str | None = None):
        self.folder = Path(folder)
        self.session = open_session(folder, threads=threads, accuracy_level=accuracy_level,
                                    profile_prefix=profile_prefix)
        ins = {i.name: i for i in self.session.get_inputs()}
        need = {"input_ids", "attention_mask", "position_ids"}
        if not need <= set(ins):
            raise ModelError(f"{self.folder / MODEL_FILE}: inputs {sorted(ins)} lack {sorted(need - set(ins))}; "
                             f"not a winq decoder export")
        self.past_names = [n for n in ins if n.startswith("past_key_values.")]
        self.kv = {n: (ins[n].shape[1], ins[n].shape[3]) for n in self.past_names}  # (kv heads, head dim), static
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.reset()

    def reset(self) -> None:
        self.past = {n: np.zeros((1, h, 0, d), dtype=np.float32) for n, (h, d) in self.kv.items()}
        self.length = 0

    def run(self, ids) -> np.ndarray:
        """Logits float32 (T, V) of the next T tokens ids (T,) given the cache; the cache grows by T."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        T = ids.shape[1]
        feeds = {
            "input_ids": ids,
            "attention_mask": np.ones((1, self.length + T), dtype=np.int64),
            "position_ids": np.arange(self.length, self.length + T, dtype=np.int64)[None],
            **self.past,
        }
        out = dict(zip(self.output_names, self.session.run(None, feeds)))
        self.past = {n: out[n.replace("past_key_values.", "present.", 1)] for n in self.past_names}
        self.length += T
        return out["logits"][0]

    def prefill(self, ids) -> np.ndarray:
        """Logits float32 (T, V) of ids from an empty cache."""
        self.reset()
        return self.run(ids)

    def step(self, token: int) -> np.ndarray:
        """Logits float32 (V,) of one more token."""
        return self.run(np.array([token], dtype=np.int64))[0]

    def decode(self, ids, n_prefill: int | None = None) -> np.ndarray:
        """Logits float32 (T, V) of ids (T,): a prefill of n_prefill tokens (all by default), then one step per
        token."""
        ids = [int(t) for t in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        n = len(ids) if n_prefill is None else n_prefill
        return np.concatenate([self.prefill(ids[:n]), *[self.step(t)[None] for t in ids[n:]]])
