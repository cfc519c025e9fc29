"""GGUF tensor bytes both ways: the block types winq writes (a registry, one class per ggml type),
built from integer codes without re-rounding, and read back through gguf-py's dequantizer.

    from winq.formats import gguf as G
    enc, note = G.choose(qw, "auto", "model.layers.0.mlp.up_proj")   # tightest exact type
    G.TYPES["q4_0"].decode(enc.blocks, qw.shape)                       # == qw.dequantize(), bit for bit

Block sizes (elements, bytes) come from gguf-py's GGML_QUANT_SIZES; the layouts follow ggml's
block structs (ggml-common.h) as gguf-py's dequantizers read them (FORMAT-NOTES):

| type  | block | bytes | layout                                             | value                      |
|-------|-------|-------|----------------------------------------------------|----------------------------|
| Q4_0  | 32    | 18    | d f16, qs[16]: x[i] low nibble, x[i+16] high       | d (q - 8)                  |
| Q4_1  | 32    | 20    | d f16, m f16, qs[16] as Q4_0                        | d q + m                    |
| Q8_0  | 32    | 34    | d f16, qs[32] int8                                 | d q                        |
| IQ4_NL| 32    | 18    | d f16, qs[16] as Q4_0                              | d kvalues_iq4nl[q]         |
| Q2_K  | 256   | 84    | scales[16] (sc | m << 4), qs[64], d f16, dmin f16  | d sc q - dmin m (per 16)   |
| Q3_K  | 256   | 110   | hmask[32], qs[64], scales[12] (6-bit, +32), d f16  | d sc (low2 - 4 (1 - hbit)) |
| TQ2_0 | 256   | 66    | qs[64] (2-bit t), d f16                            | d (t - 1)                  |
| TQ1_0 | 256   | 54    | qs[48] (5 trits/byte), qh[4] (4 trits/byte), d f16 | d (t - 1)                  |

The 2-bit fields of Q2_K / Q3_K / TQ2_0 put element 128 h + 32 s + l into byte 32 h + l at bit 2 s;
Q3_K's high bit of element 32 b + l is bit b of hmask[l]. The byte packing is written by hand
because gguf-py's quantizers re-round float weights (Q4_0 uses d = max / -8 per block), which
would destroy QAT codes; reading uses gguf-py's own dequantizers, an independent implementation.

How each grid maps (winq.formats.containers: q' = m q + a, z' = m z + a, s' = s / m; m = 2 for
half-integer zeros), tightest first in `ORDER`: see `choose()` and README's table. The non-uniform nl4 grid
has no such mapping: IQ4_NL holds it natively (its codes are the nibbles, its scale is d; IQ4_NL's table is
winq.grids.NL4_LEVELS), Q8_0 as the int8 levels (q' = NL4_LEVELS[q], d = s), no other type. A block has one
scale, so a group must cover whole blocks (group_size a multiple of the block). q_proj / k_proj
rows are permuted for llama.cpp's `llama` rope (`permute_rows`), which keeps every row's and
every group's quantization exact.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUF_MAGIC, GGMLQuantizationType, LlamaFileType

from winq.errors import ConfigError, FormatError
from winq.qweight import QuantizedWeight

from .containers import half_mul, remap

MAGIC = struct.pack("<I", GGUF_MAGIC)  # b"GGUF": the first four bytes of every file
QK = 256  # K-quant and TQ super-block

TYPES: dict[str, type[BlockType]] = {}  # name ("q4_0") -> block type; filled by @register


def register(cls):
    TYPES[cls.name] = cls
    return cls


def is_gguf(path) -> bool:
    """Does the file start with the GGUF magic?"""
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


@dataclass
class Encoded:
    """One tensor in a block type: the rows ggml reads and how the codes were mapped."""

    type: str
    blocks: np.ndarray  # uint8 (rows, bytes per row)
    container: str  # "native" or the code mapping


# ---------------------------------------------------------------------------------------------
# byte helpers


def _blocks(x: np.ndarray, block: int) -> np.ndarray:
    rows, cols = x.shape
    assert cols % block == 0, (cols, block)
    return x.reshape(rows * (cols // block), block)


def _f16(d: np.ndarray) -> np.ndarray:
    """(rows, nb) float16 -> (rows * nb, 2) uint8."""
    return np.ascontiguousarray(d.astype(np.float16)).reshape(-1, 1).view(np.uint8)


def _rows(b: np.ndarray, rows: int) -> np.ndarray:
    return np.ascontiguousarray(b).reshape(rows, -1)


def _nibbles32(q: np.ndarray) -> np.ndarray:
    """(n, 32) values 0..15 -> (n, 16) bytes: x[i] | x[i + 16] << 4."""
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def _crumbs256(q: np.ndarray) -> np.ndarray:
    """(n, 256) values 0..3 -> (n, 64) bytes: element 128h + 32s + l at byte 32h + l, bits 2s."""
    n = q.shape[0]
    q = q.reshape(n, 2, 4, 32).astype(np.uint8)  # (n, h, s, l)
    out = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return out.reshape(n, 64)


def _pack_trits(t: np.ndarray, k: int) -> np.ndarray:
    """(n, k, L) trits, most significant first -> (n, L) bytes: ceil(v * 256 / 243) with v = sum t_j 3^(4 - j)."""
    w = np.array([81, 27, 9, 3, 1][:k], dtype=np.uint16).reshape(1, k, 1)
    v = (t.astype(np.uint16) * w).sum(axis=1)
    return ((v * 256 + 242) // 243).astype(np.uint8)


def _per_block(t: torch.Tensor, qw: QuantizedWeight, per: int) -> np.ndarray:
    """A per-group tensor (rows, G) repeated to (rows, in // per)."""
    return t.repeat_interleave(qw.group_size // per, dim=1).numpy()


# ---------------------------------------------------------------------------------------------
# the block types


class BlockType:
    """One ggml quant type: which grids it holds, and its bytes both ways."""

    name: ClassVar[str]
    ggml: ClassVar[GGMLQuantizationType]
    file_type: ClassVar[LlamaFileType]  # general.file_type of a file made mostly of this type
    code_bits: ClassVar[int]  # bits per code in the file (the manifest's container_bits)
    grids: ClassVar[tuple[str, ...]] = ()
    max_bits: ClassVar[int] = 8

    @classmethod
    def block(cls) -> int:
        return GGML_QUANT_SIZES[cls.ggml][0]

    @classmethod
    def bits_per_weight(cls) -> float:
        block, nbytes = GGML_QUANT_SIZES[cls.ggml]
        return 8 * nbytes / block

    @classmethod
    def can_hold(cls, grid: str, bits: int) -> bool:
        """Can this type hold every weight of this grid exactly (whatever the row length)?"""
        return grid in cls.grids and bits <= cls.max_bits

    @classmethod
    def fits(cls, qw: QuantizedWeight) -> bool:
        """Does this layer's layout fit whole blocks (row length, and a group covering whole blocks)?"""
        block = cls.block()
        return qw.shape[1] % block == 0 and qw.group_size % block == 0

    @classmethod
    def encode(cls, qw: QuantizedWeight, name: str) -> Encoded:
        """The blocks of qw in this type, exactly; FormatError when this type cannot hold these values."""
        if not cls.fits(qw):
            raise FormatError(f"{name}: rows of {qw.shape[1]} / groups of {qw.group_size} are not whole "
                              f"{cls.name.upper()} blocks of {cls.block()}")
        if not cls.can_hold(qw.grid, qw.bits):
            raise FormatError(f"{name}: {cls.name.upper()} cannot hold {qw.grid} {qw.bits}-bit weights")
        blocks, desc = cls._encode(qw, half_mul(qw), name)
        return Encoded(cls.name, blocks, desc)

    @classmethod
    def _encode(cls, qw: QuantizedWeight, mul: int, name: str) -> tuple[np.ndarray, str]:
        raise NotImplementedError

    @classmethod
    def decode(cls, blocks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """float32 (rows, cols) from this type's rows, through gguf-py's own dequantizer."""
        from gguf.quants import dequantize

        return np.asarray(dequantize(np.asarray(blocks), cls.ggml), dtype=np.float32).reshape(shape)


def _levels_at(qw: QuantizedWeight, mul: int, offset: int, lo: int, hi: int, name: str):
    """q' = m (q - z) + offset (the remap rule with a = offset - m z per group), checked to lie in lo..hi;
    returns (q' int64 (out, in), d = s / m float16 (out, G))."""
    r = remap(qw, mul, offset - qw.zero * mul, name, lo, hi)
    return r.codes, r.scale


@register
class Q8_0(BlockType):
    name, ggml, file_type, code_bits = "q8_0", GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0, 8
    grids = ("lsq", "seq", "ternary", "binary", "affine", "nl4")

    @classmethod
    def can_hold(cls, grid, bits):
        return grid in cls.grids and not (grid == "affine" and bits == 8)  # affine 8-bit levels q - z reach +-255

    @classmethod
    def encode(cls, qw, name):
        if qw.grid == "affine" and qw.bits == 8 and cls.fits(qw):  # exact when these levels happen to fit int8
            blocks, desc = cls._encode(qw, half_mul(qw), name)
            return Encoded(cls.name, blocks, desc)
        return super().encode(qw, name)

    @staticmethod
    def pack(q: np.ndarray, d: np.ndarray) -> np.ndarray:
        """q int8 (rows, cols), d float16 (rows, cols // 32) -> uint8 (rows, cols // 32 * 34)."""
        rows = q.shape[0]
        b = _blocks(q.astype(np.int8), 32).view(np.uint8)
        return _rows(np.concatenate([_f16(d), b], axis=1), rows)

    @classmethod
    def _encode(cls, qw, mul, name):
        if qw.grid == "nl4":  # the IQ4_NL levels -127..113 as they are, d = s
            q = qw.levels.to(torch.int64)
            return cls.pack(q.numpy(), _per_block(qw.scale, qw, 32)), "int8 q' = kvalues_iq4nl[q], d = s"
        q, d = _levels_at(qw, mul, 0, -128, 127, name)
        desc = "native" if qw.grid == "lsq" and qw.bits == 8 else (
            f"int8 q' = {mul}(q - z), d = s/{mul}" if mul > 1 else "int8 q' = q - z")
        return cls.pack(q.numpy(), _per_block(d, qw, 32)), desc


class _Offset32(BlockType):
    """Q4_0 / Q5_0: per 32 weights d f16 and codes q' = m (q - z) + offset, value d (q' - offset); native for lsq of
    the type's own width (offset 2^(b-1))."""

    grids = ("lsq", "seq", "ternary", "binary", "affine")

    @classmethod
    def _encode(cls, qw, mul, name):
        offset = 2 ** (cls.code_bits - 1)
        q, d = _levels_at(qw, mul, offset, 0, 2 * offset - 1, name)
        native = qw.grid == "lsq" and qw.bits == cls.code_bits
        desc = "native" if native else f"q' = {mul}(q - z) + {offset}" + (f", d = s/{mul}" if mul > 1 else "")
        return cls.pack(q.numpy(), _per_block(d, qw, 32)), desc


@register
class Q4_0(_Offset32):
    name, ggml, file_type, code_bits = "q4_0", GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0, 4
    max_bits = 4

    @staticmethod
    def pack(q: np.ndarray, d: np.ndarray) -> np.ndarray:
        """q 0..15 (rows, cols), d float16 (rows, cols // 32) -> uint8 (rows, cols // 32 * 18)."""
        rows = q.shape[0]
        return _rows(np.concatenate([_f16(d), _nibbles32(_blocks(q.astype(np.uint8), 32))], axis=1), rows)


@register
class IQ4_NL(BlockType):
    """llama.cpp's IQ4_NL: per 32 weights an fp16 d and 16 bytes of 4-bit indices into kvalues_iq4nl (the nibble
    order of Q4_0); x = d * kvalues[q]. Holds the nl4 grid natively: q = the code, d = s."""

    name, ggml, file_type, code_bits = "iq4_nl", GGMLQuantizationType.IQ4_NL, LlamaFileType.MOSTLY_IQ4_NL, 4
    grids, max_bits = ("nl4",), 4

    @staticmethod
    def pack(q: np.ndarray, d: np.ndarray) -> np.ndarray:
        """q 0..15 level indices (rows, cols), d float16 (rows, cols // 32) -> uint8 (rows, cols // 32 * 18)."""
        return Q4_0.pack(q, d)

    @classmethod
    def _encode(cls, qw, mul, name):
        if qw.codes.numel() and int(qw.codes.max()) > 15:
            raise FormatError(f"{name}: nl4 codes {int(qw.codes.max())} exceed 15")
        return cls.pack(qw.codes.numpy(), _per_block(qw.scale, qw, 32)), "native"


@register
class Q4_1(BlockType):
    name, ggml, file_type, code_bits = "q4_1", GGMLQuantizationType.Q4_1, LlamaFileType.MOSTLY_Q4_1, 4
    grids = ("lsq", "affine")

    @classmethod
    def can_hold(cls, grid, bits):
        return grid in cls.grids and bits == 4

    @staticmethod
    def pack(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
        """q 0..15 (rows, cols), d and m float16 (rows, cols // 32) -> uint8 (rows, cols // 32 * 20)."""
        rows = q.shape[0]
        b = _nibbles32(_blocks(q.astype(np.uint8), 32))
        return _rows(np.concatenate([_f16(d), _f16(m), b], axis=1), rows)

    @classmethod
    def _encode(cls, qw, mul, name):
        # x = d q + m with d = s and m = -z s: exact only where float16(-z s) is (checked)
        s = qw.scale.to(torch.float32)
        m = (-qw.zero * s).to(torch.float16)
        if mul != 1 or not torch.equal(m.to(torch.float32), -qw.zero * s):
            raise FormatError(f"{name}: -z s is not exact in float16, so Q4_1's min cannot hold it")
        blocks = cls.pack(qw.codes.numpy(), _per_block(qw.scale, qw, 32), _per_block(m, qw, 32))
        return blocks, "native" if qw.grid == "affine" else "q' = q, m = -z s"


@register
class Q3_K(BlockType):
    name, ggml, file_type, code_bits = "q3_k", GGMLQuantizationType.Q3_K, LlamaFileType.MOSTLY_Q3_K_M, 3
    grids = ("lsq", "q3_k")

    @classmethod
    def can_hold(cls, grid, bits):
        return (grid == "lsq" and bits == 3) or grid == "q3_k"

    @classmethod
    def fits(cls, qw):
        return _KType.fits(qw) if qw.grid == "q3_k" else super().fits(qw)

    @staticmethod
    def pack(q: np.ndarray, d: np.ndarray, sc: np.ndarray | None = None) -> np.ndarray:
        """q 0..7 = level + 4 (rows, cols), d float16 (rows, cols // 256); sc: the signed 6-bit sub-block scales
        (rows, cols // 16), else every one is 1."""
        rows = q.shape[0]
        b = _blocks(q.astype(np.uint8), QK)
        n = b.shape[0]
        low = _crumbs256(b & 3)
        hi = ((b >> 2) & 1).reshape(n, 8, 32)  # element 32 bit + l
        hmask = np.zeros((n, 32), dtype=np.uint8)
        for bit in range(8):
            hmask |= (hi[:, bit] << bit).astype(np.uint8)
        # 16 six-bit scales of value 33 (0b10_0001): low nibbles 1 in bytes 0..7 (both halves),
        # high crumbs 2 in bytes 8..11
        if sc is None:
            scales = np.tile(np.array([0x11] * 8 + [0xAA] * 4, dtype=np.uint8), (n, 1))
        else:  # stored sc + 32: low nibbles of k and k + 8 in byte k (k < 8), bits 4..5 of 4 t + i in byte 8 + i
            v = (np.asarray(sc).reshape(n, 16) + 32).astype(np.uint8)
            low4 = v & 15
            scales = np.concatenate([low4[:, :8] | (low4[:, 8:] << 4), np.zeros((n, 4), dtype=np.uint8)], axis=1)
            for t in range(4):
                scales[:, 8:] |= ((v[:, 4 * t:4 * t + 4] >> 4) << (2 * t)).astype(np.uint8)
        return _rows(np.concatenate([hmask, low, scales, _f16(d)], axis=1), rows)

    @classmethod
    def _encode(cls, qw, mul, name):
        if qw.grid == "q3_k":
            _, sc, _, d, _ = _kfields(qw)
            return cls.pack(qw.codes.numpy(), d.reshape(qw.shape[0], -1), sc.reshape(qw.shape[0], -1)), \
                "native (trained sub-block scales)"
        if mul != 1:
            raise FormatError(f"{name}: Q3_K holds integer zero points only")
        q, d = _levels_at(qw, 1, 4, 0, 7, name)
        return cls.pack(q.numpy(), _per_block(d, qw, QK)), "native"


@register
class Q2_K(BlockType):
    name, ggml, file_type, code_bits = "q2_k", GGMLQuantizationType.Q2_K, LlamaFileType.MOSTLY_Q2_K, 2
    grids, max_bits = ("seq", "ternary", "binary", "affine", "q2_k"), 2

    @classmethod
    def fits(cls, qw):
        return _KType.fits(qw) if qw.grid == "q2_k" else super().fits(qw)

    @staticmethod
    def pack(q: np.ndarray, d: np.ndarray, dmin: np.ndarray, sc: np.ndarray, m: np.ndarray) -> np.ndarray:
        """q 0..3 (rows, cols); d, dmin float16 (rows, cols // 256); sc, m 4-bit ints (rows, cols // 16)."""
        rows = q.shape[0]
        scales = (_blocks(sc.astype(np.uint8), 16) | (_blocks(m.astype(np.uint8), 16) << 4)).astype(np.uint8)
        b = _crumbs256(_blocks(q.astype(np.uint8), QK))
        return _rows(np.concatenate([scales, b, _f16(d), _f16(dmin)], axis=1), rows)

    @classmethod
    def _encode(cls, qw, mul, name):
        """x = d sc q - dmin m per 16: the codes as they are, d = dmin = s/m, sc = m, min m z (0..15); the q2_k
        grid's own trained sub-block scales and mins as they are."""
        if qw.grid == "q2_k":
            codes, sc, m, d, dmin = _kfields(qw)
            r = qw.shape[0]
            blocks = cls.pack(codes.reshape(r, -1), d.reshape(r, -1), dmin.reshape(r, -1), sc.reshape(r, -1),
                              m.reshape(r, -1))
            return blocks, "native (trained sub-block scales)"
        r = remap(qw, mul, 0, name, 0, 3 * mul, zero_range=(0, 15))  # q' = m q: q in 0..3
        d = _per_block(r.scale, qw, QK)
        sc = np.full((qw.shape[0], qw.shape[1] // 16), mul, dtype=np.uint8)
        m = _per_block(r.zero.to(torch.uint8), qw, 16)
        native = qw.grid in ("seq", "affine")
        desc = "native" if native else f"q' = q, sc = {mul}, m = {mul}z" + (f", d = s/{mul}" if mul > 1 else "")
        return cls.pack(qw.codes.numpy(), d, d, sc, m), desc


class _Ternary(BlockType):
    """TQ1_0 / TQ2_0: trits t = m (q - z) + 1 with value d (t - 1)."""

    grids = ("ternary", "binary")

    @classmethod
    def _encode(cls, qw, mul, name):
        t, d = _levels_at(qw, mul, 1, 0, 2, name)
        desc = "native" if qw.grid == "ternary" else f"t = {mul}(q - z) + 1, d = s/{mul}"
        return cls.pack(t.numpy(), _per_block(d, qw, QK)), desc


@register
class TQ2_0(_Ternary):
    name, ggml, file_type, code_bits = "tq2_0", GGMLQuantizationType.TQ2_0, LlamaFileType.MOSTLY_TQ2_0, 2

    @staticmethod
    def pack(t: np.ndarray, d: np.ndarray) -> np.ndarray:
        """t trits 0..2 (rows, cols), d float16 (rows, cols // 256) -> uint8 (rows, cols // 256 * 66)."""
        rows = t.shape[0]
        return _rows(np.concatenate([_crumbs256(_blocks(t.astype(np.uint8), QK)), _f16(d)], axis=1), rows)


@register
class TQ1_0(_Ternary):
    name, ggml, file_type, code_bits = "tq1_0", GGMLQuantizationType.TQ1_0, LlamaFileType.MOSTLY_TQ1_0, 2

    @staticmethod
    def pack(t: np.ndarray, d: np.ndarray) -> np.ndarray:
        """t trits 0..2; elements 0..159 in qs[0:32], 160..239 in qs[32:48], 240..255 in qh[4]."""
        rows = t.shape[0]
        b = _blocks(t.astype(np.uint8), QK)
        n = b.shape[0]
        qs0 = _pack_trits(b[:, :160].reshape(n, 5, 32), 5)
        qs1 = _pack_trits(b[:, 160:240].reshape(n, 5, 16), 5)
        qh = _pack_trits(b[:, 240:].reshape(n, 4, 4), 4)
        return _rows(np.concatenate([qs0, qs1, qh, _f16(d)], axis=1), rows)


# ---------------------------------------------------------------------------------------------
# the K grids (winq.kquant): the two-level scales stored as trained


def _kfields(qw: QuantizedWeight):
    """Per super-block: codes (n, 256) uint8, sc and m (n, n_sub) int64, d and dmin (n,) float16."""
    fmt = qw.spec.kquant
    rows = qw.shape[0]
    n_sub = fmt.n_sub
    codes = _blocks(qw.codes.numpy(), QK)
    sc = qw.sub_scale.numpy().astype(np.int64).reshape(-1, n_sub)
    m = qw.sub_min.numpy().astype(np.int64).reshape(-1, n_sub)
    d = qw.scale.numpy().reshape(rows, -1, n_sub)[..., 0].reshape(-1)
    dmin = qw.super_min.numpy().reshape(rows, -1, n_sub)[..., 0].reshape(-1)
    return codes, sc, m, d, dmin


def _scales_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K's 12 scale bytes from 8 six-bit scales and mins per block (n, 8) (gguf-py's get_scale_min
    read backwards): bytes 0..3 sc[j] | high 2 bits of sc[j + 4] << 6, bytes 4..7 the same for the mins, bytes
    8..11 low nibbles of sc[j + 4] | of m[j + 4] << 4."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    a = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    b = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    c = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return np.concatenate([a, b, c], axis=1).astype(np.uint8)


def _nibbles_k(q: np.ndarray) -> np.ndarray:
    """(n, 256) values 0..15 -> (n, 128): byte 32 c + l holds element 64 c + l low, 64 c + 32 + l high."""
    n = q.shape[0]
    q = q.reshape(n, 4, 2, 32).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)


class _KType(BlockType):
    """A K-quant holding its own K grid (winq.kquant) exactly: rows of whole super-blocks, groups of its sub-block."""

    max_bits = 8

    @classmethod
    def fits(cls, qw):
        return qw.shape[1] % QK == 0 and qw.spec.kquant is not None and qw.group_size == qw.spec.kquant.sub

    @classmethod
    def can_hold(cls, grid, bits):
        return grid == cls.name

    @classmethod
    def _encode(cls, qw, mul, name):
        return _rows(cls.pack_k(*_kfields(qw)), qw.shape[0]), "native (trained sub-block scales)"


@register
class Q4_K(_KType):
    name, ggml, file_type, code_bits = "q4_k", GGMLQuantizationType.Q4_K, LlamaFileType.MOSTLY_Q4_K_M, 4

    @staticmethod
    def pack_k(q, sc, m, d, dmin):
        """d, dmin f16, scales[12], qs[128]: x = d sc q - dmin m per 32."""
        return np.concatenate([_f16(d[:, None]), _f16(dmin[:, None]), _scales_k4(sc, m), _nibbles_k(q)], axis=1)


@register
class Q5_K(_KType):
    name, ggml, file_type, code_bits = "q5_k", GGMLQuantizationType.Q5_K, LlamaFileType.MOSTLY_Q5_K_M, 5

    @staticmethod
    def pack_k(q, sc, m, d, dmin):
        """d, dmin f16, scales[12], qh[32] (bit j of byte l: the high bit of element 32 j + l), qs[128]."""
        n = q.shape[0]
        hi = ((q >> 4) & 1).astype(np.uint8).reshape(n, 8, 32)
        qh = np.zeros((n, 32), dtype=np.uint8)
        for j in range(8):
            qh |= (hi[:, j] << j).astype(np.uint8)
        return np.concatenate([_f16(d[:, None]), _f16(dmin[:, None]), _scales_k4(sc, m), qh,
                               _nibbles_k(q & 15)], axis=1)


@register
class Q6_K(_KType):
    name, ggml, file_type, code_bits = "q6_k", GGMLQuantizationType.Q6_K, LlamaFileType.MOSTLY_Q6_K, 6

    @staticmethod
    def pack_k(q, sc, m, d, dmin):
        """ql[128], qh[64], scales[16] int8, d f16: x = d sc (q - 32) per 16."""
        return pack_q6_k(q, sc, d)


@register
class Q5_0(_Offset32):
    """llama.cpp's Q5_0: per 32 weights d f16, qh (the 32 high bits, little-endian), qs[16] as Q4_0; d (q - 16)."""

    name, ggml, file_type, code_bits = "q5_0", GGMLQuantizationType.Q5_0, LlamaFileType.MOSTLY_Q5_0, 5
    max_bits = 5

    @staticmethod
    def pack(q: np.ndarray, d: np.ndarray) -> np.ndarray:
        """q 0..31 (rows, cols), d float16 (rows, cols // 32) -> uint8 (rows, cols // 32 * 22)."""
        rows = q.shape[0]
        b = _blocks(q.astype(np.uint8), 32)
        qh = np.packbits((b >> 4) & 1, axis=-1, bitorder="little")  # (n, 4): bit j = high bit of element j
        return _rows(np.concatenate([_f16(d), qh, _nibbles32(b & 15)], axis=1), rows)


ORDER = tuple(sorted(TYPES, key=lambda t: TYPES[t].bits_per_weight()))  # tightest first


def choose(qw: QuantizedWeight, want: str, name: str) -> tuple[Encoded, str | None]:
    """(encoding, note) for one tensor: `want` ("auto": the tightest) where it fits, else the tightest exact
    type, with a note; ConfigError when `want` cannot hold the grid or no GGUF type holds the layer."""
    holders = [t for t in ORDER if TYPES[t].can_hold(qw.grid, qw.bits)]
    if want != "auto" and want not in holders:
        raise ConfigError(
            f"--type {want} cannot hold {qw.grid} {qw.bits}-bit weights exactly: "
            f"choose auto or one of {', '.join(holders) or '(none)'}"
        )
    for t in ([want] if want != "auto" else []) + [t for t in ORDER if t != want]:
        try:
            enc = TYPES[t].encode(qw, name)
        except FormatError:
            continue
        note = None
        if want != "auto" and t != want:
            note = (f"{name}: {want} does not fit this {qw.shape[0]}x{qw.shape[1]} layer (row or group {qw.group_size} "
                    f"not a multiple of {TYPES[want].block()}, or values outside its range): stored exactly as {t}")
        return enc, note
    raise ConfigError(
        f"{name}: no GGUF type holds {qw.grid} {qw.bits}-bit weights of shape {qw.shape[0]}x{qw.shape[1]} "
        f"(group {qw.group_size}) exactly (rows and groups must be multiples of 32, levels must fit int8): "
        f"export with --format gptq or --format onnx instead"
    )


def auto_types(weights: dict[str, QuantizedWeight]) -> dict[str, str]:
    """{name: ggml type ("Q4_0")} each QuantizedWeight is stored in by `winq export --format gguf` with its
    default `--type auto` (choose's tightest exact type): what llama.cpp's activation plan is read from when
    there is no export to read it from (winq.actplan.llamacpp_quant)."""
    return {name: choose(qw, "auto", name)[0].type.upper() for name, qw in weights.items()}


def file_type(types: list[str], keep: str) -> LlamaFileType:
    """general.file_type: the most common quantized type's, or F16 / F32 when nothing is quantized."""
    if not types:
        return LlamaFileType.MOSTLY_F16 if keep == "f16" else LlamaFileType.ALL_F32
    return TYPES[max(set(types), key=types.count)].file_type


# ---------------------------------------------------------------------------------------------
# float tensors and llama.cpp's q/k row order

KEEP = ("f16", "f32", "q8_0", "q6_k")  # how float tensors other than norms and biases may be stored
KEEP_BLOCK = {"f16": 1, "f32": 1, "q8_0": 32, "q6_k": QK}  # rows must be a multiple of this
KEEP_QUANT = ("q8_0", "q6_k")  # post-training quantization of float weights: never exact


def keeps_for(width: int) -> tuple[str, ...]:
    """The --keep choices whose blocks fit rows of `width`."""
    return tuple(k for k in KEEP if width % KEEP_BLOCK[k] == 0)


def check_keep(name: str, shape, keep: str) -> None:
    """ConfigError naming the valid --keep choices when `keep` cannot store this float tensor's rows."""
    shape = tuple(shape)
    if is_kept_float(name, len(shape)) and shape[-1] % KEEP_BLOCK[keep]:
        raise ConfigError(
            f"--keep {keep} stores rows in blocks of {KEEP_BLOCK[keep]}, but {name} has rows of {shape[-1]}: "
            f"choose one of {', '.join(keeps_for(int(shape[-1])))}"
        )


def is_kept_float(name: str, ndim: int) -> bool:
    """Is this float tensor stored in --keep precision (embeddings, a float lm_head), not F32 (norms, biases)?"""
    return not (ndim == 1 or name.endswith(".bias") or "norm" in name)


def encode_q6_k(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest Q6_K of float weights (rows, cols), cols a multiple of 256 -> uint8 (rows, cols / 256 * 210).

    gguf-py has no Q6_K quantizer, so this one is winq's own, written from the block layout gguf-py's
    dequantizer reads: per 256-block ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] int8 (one per
    16 elements), d float16; value = d * scale * (q - 32) with q in 0..63. Element 128 h + r: its low nibble
    is in ql[64 h + r % 64] (low half for r < 64, high half otherwise), its high crumb in qh[32 h + r % 32]
    at bits 2 (r // 32). Each 16-element sub-block takes the better (squared error) of two float scales:
    its largest-magnitude value mapped to -32, or max |x| / 31; the 16 scales are then rounded to int8
    against d = max |scale| / 127 and the codes re-rounded against the int8-rounded scales.
    """
    x = np.asarray(x, dtype=np.float32)
    rows, cols = x.shape
    b = _blocks(x, QK)  # (n, 256)
    n = b.shape[0]
    sub = b.reshape(n, 16, 16)
    idx = np.abs(sub).argmax(axis=2)[..., None]
    ext = np.take_along_axis(sub, idx, axis=2)[..., 0]  # (n, 16) the largest-magnitude value, signed
    cands = np.stack([ext / -32.0, np.abs(ext) / 31.0])  # (2, n, 16)

    def sq_err(scale):
        inv = np.where(scale != 0, 1.0 / np.where(scale != 0, scale, 1.0), 0.0)
        q = np.clip(np.rint(sub * inv[..., None]), -32, 31)
        return ((q * scale[..., None] - sub) ** 2).sum(axis=2)

    errs = np.stack([sq_err(c) for c in cands])
    scale = np.where(errs[0] <= errs[1], cands[0], cands[1]).astype(np.float32)  # (n, 16)
    d = (np.abs(scale).max(axis=1) / 127.0).astype(np.float16)  # (n,)
    d32 = d.astype(np.float32)
    sc = np.clip(np.rint(scale / np.where(d32 != 0, d32, 1.0)[:, None]), -128, 127).astype(np.int8)
    eff = d32[:, None] * sc.astype(np.float32)  # (n, 16): the scale a reader applies
    inv = np.where(eff != 0, 1.0 / np.where(eff != 0, eff, 1.0), 0.0)
    q = (np.clip(np.rint(sub * inv[..., None]), -32, 31) + 32).astype(np.uint8).reshape(n, 256)
    return _rows(pack_q6_k(q, sc, d), rows)


def pack_q6_k(q: np.ndarray, sc: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q6_K blocks (n, 210) from codes q 0..63 (n, 256), int8 scales sc (n, 16) and d float16 (n,)."""
    n = q.shape[0]
    q = q.astype(np.uint8).reshape(n, 2, 128)  # (n, h, r)
    low, high = q & 15, q >> 4
    ql = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(n, 128)
    hi = high.reshape(n, 2, 4, 32)  # (n, h, s, l)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(n, 64)
    out = np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), _f16(np.asarray(d)[:, None])], axis=1)
    return out.astype(np.uint8)


def decode_float(blocks: np.ndarray, keep: str, shape) -> np.ndarray:
    """float32 values of a --keep q8_0 / q6_k tensor, through gguf-py's dequantizer."""
    from gguf.quants import dequantize

    ggml = GGMLQuantizationType.Q8_0 if keep == "q8_0" else GGMLQuantizationType.Q6_K
    return np.asarray(dequantize(np.asarray(blocks), ggml), dtype=np.float32).reshape(tuple(shape))


def encode_float(name: str, t: torch.Tensor, keep: str):
    """(array, raw ggml type or None, dtype name, max abs err) of a float tensor: norms, biases and 1-d
    tensors F32, others in `keep` (Q8_0 through gguf-py's own quantizer, Q6_K through encode_q6_k: these are
    float weights, quantized post-training; ConfigError when the rows do not fill whole blocks)."""
    t32 = t.to(torch.float32)
    if not is_kept_float(name, t.dim()) or keep == "f32":
        return t32.numpy(), None, "f32", 0.0
    check_keep(name, t.shape, keep)
    if keep in KEEP_QUANT:
        if keep == "q8_0":
            from gguf.quants import quantize

            q, raw = quantize(t32.numpy(), GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
        else:
            q, raw = encode_q6_k(t32.numpy()), GGMLQuantizationType.Q6_K
        err = float(np.abs(decode_float(q, keep, tuple(t.shape)) - t32.numpy()).max())
        return q, raw, keep, err
    h = t32.to(torch.float16)
    return h.numpy(), None, "f16", float((h.to(torch.float32) - t32).abs().max())


def permute_rows(x, n_head: int):
    """llama.cpp's q/k row order for the `llama` (NORM) rope: per head, interleave the two halves."""
    rows = x.shape[0]
    return x.reshape(n_head, 2, rows // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def permute_qw(qw: QuantizedWeight, n_head: int) -> QuantizedWeight:
    def perm(t):
        return permute_rows(t, n_head) if t is not None else None

    return QuantizedWeight(perm(qw.codes), perm(qw.scale), perm(qw.zero), qw.grid, qw.bits, qw.group_size,
                           perm(qw.sub_scale), perm(qw.sub_min), perm(qw.super_min))


# ---------------------------------------------------------------------------------------------
# reading a file back


def read(path):
    """gguf-py's GGUFReader of a file (memory-mapped: metadata fields and tensors, nothing dequantized)."""
    from gguf import GGUFReader

    return GGUFReader(str(Path(path)))


def read_tensors(path) -> dict:
    """{GGUF tensor name: gguf-py ReaderTensor} of a file."""
    return {t.name: t for t in read(path).tensors}


def read_quantized(tensors: dict, name: str, type_name: str, shape: tuple[int, int]) -> np.ndarray:
    """float32 (rows, cols) of the quantized tensor `name` of a file's `read_tensors()`, dequantized by gguf-py;
    FormatError when it is missing or stored as another type."""
    if name not in tensors:
        raise FormatError(f"{name} is missing from the written file")
    t = tensors[name]
    if t.tensor_type.name.lower() != type_name:
        raise FormatError(f"{name}: written as {t.tensor_type.name}, expected {type_name.upper()}")
    return TYPES[type_name].decode(np.asarray(t.data), shape)
