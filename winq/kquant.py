"""K-quant grids: llama.cpp's Q2_K .. Q6_K lattices with their two-level scales, trained as the format stores them.

A K-quant super-block holds 256 weights in sub-blocks of 16 or 32. Each sub-block j has an integer scale code
sc_j (and, for the types with a min, an integer min code m_j) of `scale_bits` bits; the super-block holds one fp16
d (and an fp16 dmin). The weight is (ggml's dequantize_row_q*_K, gguf-py's dequantizers)

    with a min (Q2_K, Q4_K, Q5_K):   W = (d sc_j) q - (dmin m_j),   q in 0 .. 2^b - 1,  sc_j, m_j in 0 .. 2^sb - 1
    signed (Q3_K, Q6_K):             W = (d sc_j) l,                l in -2^(b-1) .. 2^(b-1) - 1, sc_j signed

Every product there is exact in float32 (11 bits of fp16 times at most 8 bits of sc times at most 6 of q), so
the one rounding is the subtraction, and a float32 forward computing S_j = d sc_j, M_j = dmin m_j and
S_j q - M_j is the dequantizer's value bit for bit.

Training (`kq_weight`): a QuantLinear with a K grid has groups of the sub-block size; its `alpha` is the float
sub-block scale and, for the types with a min, its `zero_point` is the float min magnitude mu >= 0 (the sub-block's
values start at -mu). The forward rounds both as llama.cpp's quantizers store them (make_qkx2_quants' final step,
quantize_row_q3_K's and q6_K's): per super-block

    d = fp16(max_j alpha_j / (2^sb - 1)),  sc_j = clamp(round(alpha_j / d), 0, 2^sb - 1)      (with a min; dmin, m_j
                                                                                             alike from mu)
    d = fp16(alpha_k / -2^(sb-1)) for the alpha_k of largest |alpha|, sc_j = clamp(round(alpha_j / d), -2^(sb-1),
        2^(sb-1) - 1)                                                                        (signed)

with straight-through rounding (the fp16 rounding and the integer rounding pass the gradient), then the codes
q = clamp(round((W + M_j) / S_j), 0, 2^b - 1) (signed: l = clamp(round(W / S_j), ...)), straight-through and
clamped first, as lsq. So the sub-block scales are learned in the forward exactly as the file stores them.

The step-0 quantizer (`init_kq`) searches each sub-block's float scale (and min) for the least
importance-weighted squared error, like llama.cpp's make_qkx2_quants / make_qx_quants with an imatrix, then the
super-block rounding above applies; winq.calibrate runs GPTQ with the rounded scales.
"""

from __future__ import annotations

import math

import torch

from .grids import KFORMATS, SUPER, KFormat, _HalfSTE, _RoundSTE

__all__ = ["KFORMATS", "SUPER", "KFormat", "kq_weight", "encode", "dequantize", "search", "sub_scales", "levels"]

def is_kgrid(grid: str) -> bool:
    return grid in KFORMATS


def _half(x: torch.Tensor, ste: bool) -> torch.Tensor:
    return _HalfSTE.apply(x) if ste else x.to(torch.float16).to(torch.float32)


def _round(x: torch.Tensor, ste: bool) -> torch.Tensor:
    return _RoundSTE.apply(x) if ste else torch.round(x)


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x == 0, torch.ones_like(x), x)


def _two_level(v: torch.Tensor, fmt: KFormat, signed: bool, ste: bool):
    """v (out, G) float sub-block values -> (S (out, G) float32 exact products d * code, d (out, G // n) fp16 values
    as float32, code (out, G) float32 integers)."""
    out, G = v.shape
    x = v.reshape(out, G // fmt.n_sub, fmt.n_sub)
    lo, hi = fmt.scale_range if signed else (0, 2**fmt.scale_bits - 1)
    if signed:
        top = x.gather(-1, x.abs().argmax(-1, keepdim=True))  # the signed value of largest magnitude
        d = _half(top / lo, ste)  # lo = -2^(sb-1): top's code is the extreme level, as llama.cpp's -32 / -128
    else:
        x = torch.clamp(x, min=0.0)
        d = _half(x.amax(-1, keepdim=True) / hi, ste)
    code = _round(torch.clamp(x / _nonzero(d), lo, hi), ste)
    return (d * code).reshape(out, G), d[..., 0], code.reshape(out, G)


def sub_scales(alpha: torch.Tensor, mu: torch.Tensor | None, fmt: KFormat, ste: bool = True):
    """(S, M) per sub-block (out, G) as the format stores them, M = 0 without a min; plus the integer parts
    (d, sc, dmin, m) (dmin, m None without a min)."""
    S, d, sc = _two_level(alpha, fmt, signed=not fmt.has_min, ste=ste)
    if not fmt.has_min:
        return S, torch.zeros_like(S), (d, sc, None, None)
    M, dmin, m = _two_level(mu, fmt, signed=False, ste=ste)
    return S, M, (d, sc, dmin, m)


def levels(w: torch.Tensor, S: torch.Tensor, M: torch.Tensor, fmt: KFormat, ste: bool = True) -> torch.Tensor:
    """The integer level (q, or the signed l) of the grouped weights w (out, G, g) under S, M (out, G, 1)."""
    lo, hi = fmt.code_range
    x = (w + M) / _nonzero(S) if fmt.has_min else w / _nonzero(S)
    return _round(torch.clamp(x, lo, hi), ste)


def kq_weight(w: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor | None, fmt: KFormat,
              ste: bool = True) -> torch.Tensor:
    """The fake-quant weight (out, G, g) of the grouped latent weights w (out, G, g): S q - M, bit for bit the
    dequantizer's value of the codes `encode` gives."""
    S, M, _ = sub_scales(alpha, mu, fmt, ste)
    S, M = S[..., None], M[..., None]
    return S * levels(w, S, M, fmt, ste) - M


@torch.no_grad()
def encode(w: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor | None, fmt: KFormat) -> dict:
    """The integer fields of the grouped weights w (out, G, g): codes uint8 (out, G, g) (level + offset),
    sc, m int16 (out, G), d, dmin float16 (out, G // n_sub)."""
    S, M, (d, sc, dmin, m) = sub_scales(alpha, mu, fmt, ste=False)
    lev = levels(w, S[..., None], M[..., None], fmt, ste=False)
    zeros = torch.zeros_like(d)
    return {
        "codes": (lev + fmt.offset).to(torch.uint8),
        "sc": sc.to(torch.int16),
        "m": (m if m is not None else torch.zeros_like(sc)).to(torch.int16),
        "d": d.to(torch.float16),
        "dmin": (dmin if dmin is not None else zeros).to(torch.float16),
    }


def dequantize(codes: torch.Tensor, sc: torch.Tensor, m: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor,
               fmt: KFormat) -> torch.Tensor:
    """float32 (out, in) from the integer fields (codes (out, in), sc / m (out, G), d / dmin (out, G // n_sub))."""
    out, inf = codes.shape
    rep = fmt.n_sub
    S = d.to(torch.float32).repeat_interleave(rep, 1) * sc.to(torch.float32)  # (out, G)
    M = dmin.to(torch.float32).repeat_interleave(rep, 1) * m.to(torch.float32)
    lev = codes.to(torch.float32).reshape(out, -1, fmt.sub) - fmt.offset
    return (S[..., None] * lev - M[..., None]).reshape(out, inf)


# ---- the step-0 quantizer -------------------------------------------------------------------------------------

FACTORS = tuple(round(0.60 + 0.04 * i, 2) for i in range(14))  # x the range rule: 0.60 .. 1.12


def _err(w, h, S, M, fmt):
    return (h * (w - (S * levels(w, S, M, fmt, ste=False) - M)) ** 2).sum(-1)


@torch.no_grad()
def search(w: torch.Tensor, h: torch.Tensor | None, fmt: KFormat) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(alpha (out, G), mu (out, G) or None) per sub-block of w (out, G, g) minimising sum h (w - Q(w))^2 with
    float sub-block scales (h: importances broadcastable to w, or None for 1); the super-block rounding then
    applies in the forward. With a min: candidates S = f (max - min) / (2^b - 1), each with the min refitted by
    weighted least squares over two rounds (make_qkx2_quants' search in effect); signed: S = f * amax / 2^(b-1) and
    its mirror (largest magnitude on the negative level, as Q3_K / Q6_K's quantizers put it)."""
    x = w.float()
    hw = torch.ones_like(x) if h is None else h.to(x.dtype).expand_as(x)
    lo, hi = fmt.code_range
    best = torch.full(x.shape[:2], math.inf, device=x.device)
    bS = torch.zeros(x.shape[:2], device=x.device)
    bM = torch.zeros(x.shape[:2], device=x.device)

    def keep(S, M):
        nonlocal best, bS, bM
        e = _err(x, hw, S, M, fmt)
        better = e < best
        best = torch.where(better, e, best)
        bS, bM = torch.where(better, S[..., 0], bS), torch.where(better, M[..., 0], bM)

    if fmt.has_min:
        mn = x.amin(-1, keepdim=True).clamp(max=0)
        rng = (x.amax(-1, keepdim=True) - mn).clamp(min=1e-12)
        for f in FACTORS:
            S, M = rng * f / hi, -mn
            for _ in range(2):  # refit the min for these codes: M = sum h (S q - w) / sum h, kept >= 0
                q = levels(x, S, M, fmt, ste=False)
                M = ((hw * (S * q - x)).sum(-1, keepdim=True) / hw.sum(-1, keepdim=True).clamp(min=1e-30)).clamp(min=0)
                keep(S, M)
        return bS, bM
    amax = x.abs().amax(-1, keepdim=True).clamp(min=1e-12)
    zero = torch.zeros_like(amax)
    for sign in (1.0, -1.0):
        for f in FACTORS:
            keep(sign * amax * f / -lo, zero)
            keep(sign * amax * f / hi, zero)
    return bS, None
