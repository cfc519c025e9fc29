"""Bit packing of integer codes into int32 words: the GPTQ layout, shared by winq.formats.gptq
and the runtime's kernels. Written here rather than taken from gptqmodel / auto-gptq: their
packers start from float weights and re-quantize them (and need the optional extra); winq packs
the trained integer codes as they are.

Along the packed dimension the codes form one little-endian bit stream: code i occupies
stream bits [i*b, (i+1)*b), and word k holds stream bits [32k, 32k+32) (bit 0 = least
significant). For b = 2, 4, 8 every word holds 32/b whole codes (code j of the word at bit
b*j). For b = 3 a period of 32 codes fills 3 words, and codes 10 and 21 straddle words:
word0 holds codes 0-9 at 3j and the low 2 bits of code 10 at bits 30-31; word1 the top bit
of code 10 at bit 0, codes 11-20 at 3j+1 and the low bit of code 21 at bit 31; word2 the
top 2 bits of code 21 at bits 0-1 and codes 22-31 at 3j+2. This is exactly GPTQ's qweight
(packed along the input dim) and qzeros (packed along the output dim) layout.

The packed length must be a multiple of the period P = 32 / gcd(32, b) codes (32 for 3-bit,
16 for 2-bit, 8 for 4-bit, 4 for 8-bit); `pad_to_period` pads with zero codes.
"""

from __future__ import annotations

import math

import torch

from .errors import WinqError

PACK_BITS = (1, 2, 3, 4, 8)


def period(bits: int) -> int:
    """Codes per whole number of words."""
    _check_bits(bits)
    return 32 // math.gcd(32, bits)


def _check_bits(bits: int) -> None:
    if bits not in PACK_BITS:
        raise WinqError(f"cannot pack {bits}-bit codes: supported widths are {', '.join(map(str, PACK_BITS))}")


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit values -> int32 with the same bits."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def pack(codes: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack integer codes (any int dtype, values in [0, 2**bits)) along `dim` into int32 words.

    codes (..., K, ...) -> int32 (..., K * bits / 32, ...); K must be a multiple of period(bits).
    """
    _check_bits(bits)
    P = period(bits)
    W = bits * P // 32  # words per period
    x = codes.movedim(dim, 0).to(torch.int64)
    K = x.shape[0]
    if K % P:
        raise WinqError(f"cannot pack {K} codes of {bits} bits along dim {dim}: the length must be a multiple of {P} "
                        "(pad first)")
    if x.numel() and (x.min() < 0 or x.max() >= 2**bits):
        raise WinqError(f"codes out of range for {bits} bits: min {int(x.min())}, max {int(x.max())}")
    rest = x.shape[1:]
    x = x.reshape(K // P, P, *rest)  # (periods, P, ...)
    words = torch.zeros((K // P, W, *rest), dtype=torch.int64, device=x.device)  # (periods, W, ...)
    for j in range(P):
        start = j * bits
        w, off = divmod(start, 32)
        words[:, w] |= (x[:, j] << off) & 0xFFFFFFFF
        if off + bits > 32:  # the code straddles into the next word
            words[:, w + 1] |= x[:, j] >> (32 - off)
    out = _to_int32(words.reshape(K // P * W, *rest))
    return out.movedim(0, dim)


def unpack(words: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Inverse of pack: int32 words along `dim` -> uint8 codes (length words * 32 / bits)."""
    _check_bits(bits)
    P = period(bits)
    W = bits * P // 32
    x = words.movedim(dim, 0).to(torch.int64) & 0xFFFFFFFF
    n = x.shape[0]
    if n % W:
        raise WinqError(f"{n} words of {bits}-bit codes along dim {dim}: must be a multiple of {W}")
    rest = x.shape[1:]
    x = x.reshape(n // W, W, *rest)  # (periods, W, ...)
    mask = 2**bits - 1
    codes = torch.empty((n // W, P, *rest), dtype=torch.int64, device=x.device)
    for j in range(P):
        start = j * bits
        w, off = divmod(start, 32)
        v = x[:, w] >> off
        if off + bits > 32:
            v = v | (x[:, w + 1] << (32 - off))
        codes[:, j] = v & mask
    return codes.reshape(n // W * P, *rest).to(torch.uint8).movedim(0, dim)


def pad_to_period(codes: torch.Tensor, bits: int, dim: int = 0, value: int = 0) -> torch.Tensor:
    """Pad `codes` along `dim` with `value` up to a multiple of period(bits)."""
    P = period(bits)
    K = codes.shape[dim]
    extra = (-K) % P
    if not extra:
        return codes
    shape = list(codes.shape)
    shape[dim] = extra
    return torch.cat([codes, torch.full(shape, value, dtype=codes.dtype, device=codes.device)], dim=dim)
