"""Byte layouts of the GGUF block types winq writes, built from integer codes (no re-rounding).

Every encoder takes `stored` codes (uint8 or int8, shape (rows, cols)) and one float16 scale
per block (rows, cols // block) and returns uint8 (rows, cols // block * bytes_per_block),
the rows ggml reads. The layouts follow ggml's block structs as described by gguf-py's
constants and dequantizers (ARCHITECTURE §5, FORMAT-NOTES):

| type  | block | bytes | layout                                             | value                      |
|-------|-------|-------|----------------------------------------------------|----------------------------|
| Q4_0  | 32    | 18    | d f16, qs[16]: x[i] low nibble, x[i+16] high       | d (q - 8)                  |
| Q4_1  | 32    | 20    | d f16, m f16, qs[16] as Q4_0                        | d q + m                    |
| Q8_0  | 32    | 34    | d f16, qs[32] int8                                 | d q                        |
| Q2_K  | 256   | 84    | scales[16] (sc | m << 4), qs[64], d f16, dmin f16  | d sc q - dmin m (per 16)   |
| Q3_K  | 256   | 110   | hmask[32], qs[64], scales[12] (6-bit, +32), d f16  | d sc (low2 - 4 (1 - hbit)) |
| TQ2_0 | 256   | 66    | qs[64] (2-bit t), d f16                            | d (t - 1)                  |
| TQ1_0 | 256   | 54    | qs[48] (5 trits/byte), qh[4] (4 trits/byte), d f16 | d (t - 1)                  |

The 2-bit fields of Q2_K / Q3_K / TQ2_0 put element 128 h + 32 s + l into byte 32 h + l at
bit 2 s; Q3_K's high bit of element 32 b + l is bit b of hmask[l].
"""

from __future__ import annotations

import numpy as np

QK = 256  # K-quant and TQ super-block

# name -> (elements per block, bytes per block)
BLOCKS = {
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "q8_0": (32, 34),
    "q2_k": (256, 84),
    "q3_k": (256, 110),
    "tq2_0": (256, 66),
    "tq1_0": (256, 54),
}


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
    q = q.reshape(n, 2, 4, 32).astype(np.uint8)
    out = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return out.reshape(n, 64)


def encode_q4_0(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    rows = q.shape[0]
    b = _blocks(q.astype(np.uint8), 32)
    return _rows(np.concatenate([_f16(d), _nibbles32(b)], axis=1), rows)


def encode_q4_1(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    rows = q.shape[0]
    b = _blocks(q.astype(np.uint8), 32)
    return _rows(np.concatenate([_f16(d), _f16(m), _nibbles32(b)], axis=1), rows)


def encode_q8_0(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    rows = q.shape[0]
    b = _blocks(q.astype(np.int8), 32).view(np.uint8)
    return _rows(np.concatenate([_f16(d), b], axis=1), rows)


def encode_q2_k(q: np.ndarray, d: np.ndarray, dmin: np.ndarray, sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """q: codes 0..3 (rows, cols); d, dmin: (rows, nb); sc, m: 4-bit ints (rows, cols // 16)."""
    rows = q.shape[0]
    b = _blocks(q, QK)
    scales = (_blocks(sc.astype(np.uint8), 16) | (_blocks(m.astype(np.uint8), 16) << 4)).astype(np.uint8)
    return _rows(np.concatenate([scales, _crumbs256(b), _f16(d), _f16(dmin)], axis=1), rows)


def encode_q3_k(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """q: 0..7 = level + 4 (rows, cols); every 6-bit sub-block scale is 1 (stored as 33)."""
    rows = q.shape[0]
    b = _blocks(q.astype(np.uint8), QK)
    n = b.shape[0]
    low = _crumbs256(b & 3)
    hi = ((b >> 2) & 1).reshape(n, 8, 32)  # element 32 bit + l
    hmask = np.zeros((n, 32), dtype=np.uint8)
    for bit in range(8):
        hmask |= (hi[:, bit] << bit).astype(np.uint8)
    # 16 six-bit scales of value 33 (0b10_0001): low nibbles 1 in bytes 0..7 (both halves), high crumbs 2 in bytes 8..11
    scales = np.tile(np.array([0x11] * 8 + [0xAA] * 4, dtype=np.uint8), (n, 1))
    return _rows(np.concatenate([hmask, low, scales, _f16(d)], axis=1), rows)


def encode_tq2_0(t: np.ndarray, d: np.ndarray) -> np.ndarray:
    """t: trits 0..2 (value t - 1)."""
    rows = t.shape[0]
    return _rows(np.concatenate([_crumbs256(_blocks(t, QK)), _f16(d)], axis=1), rows)


def _pack_trits(t: np.ndarray, k: int) -> np.ndarray:
    """(n, k, L) trits, most significant first -> (n, L) bytes: ceil(v * 256 / 243) with v = sum t_j 3^(4 - j)."""
    w = np.array([81, 27, 9, 3, 1][:k], dtype=np.uint16).reshape(1, k, 1)
    v = (t.astype(np.uint16) * w).sum(axis=1)
    return ((v * 256 + 242) // 243).astype(np.uint8)


def encode_tq1_0(t: np.ndarray, d: np.ndarray) -> np.ndarray:
    """t: trits 0..2 (value t - 1); elements 0..159 in qs[0:32], 160..239 in qs[32:48], 240..255 in qh."""
    rows = t.shape[0]
    b = _blocks(t.astype(np.uint8), QK)
    n = b.shape[0]
    qs0 = _pack_trits(b[:, :160].reshape(n, 5, 32), 5)
    qs1 = _pack_trits(b[:, 160:240].reshape(n, 5, 16), 5)
    qh = _pack_trits(b[:, 240:].reshape(n, 4, 4), 4)
    return _rows(np.concatenate([qs0, qs1, qh, _f16(d)], axis=1), rows)
