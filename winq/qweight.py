"""QuantizedWeight: the one representation every export format is written from.

    codes  uint8   (out, in)       integer code q in [0, 2**bits)
    scale  float16 (out, in // g)  deployment scale s
    zero   float32 (out, in // g)  zero point z (integer or half-integer)
    W[o, i] = float32(scale[o, i // g]) * (codes[o, i] - zero[o, i // g])

`dequantize()` is bit-for-bit the fake-quant weight used in training (ARCHITECTURE §2,
Rule 1): both compute float32(fp16 scale) * float32(level) elementwise.

The non-uniform grid nl4 (llama.cpp's IQ4_NL) uses the same fields with a level table: its codes are
level indices 0..15, zero is 0 and

    W[o, i] = float32(scale[o, i // 32]) * NL4_LEVELS[codes[o, i]]

(scale is IQ4_NL's d; groups of exactly 32). `levels` is code_values(codes) - zero for every grid
(GridSpec.code_values: the code itself, or its table entry).

The K grids (q2_k .. q6_k, winq.kquant) carry two-level scales in three more fields, per sub-block of
group_size weights (G groups):

    sub_scale  int16   (out, G)  sc_j (signed for q3_k / q6_k)
    sub_min    int16   (out, G)  m_j (0 for the signed types)
    super_min  float16 (out, G)  dmin of the sub-block's super-block (repeated over its sub-blocks; 0 when signed)
    scale      float16 (out, G)  d of the sub-block's super-block (repeated), zero 0
    W[o, i] = (float32(d) * sc) * (codes - offset) - float32(dmin) * m       (KFormat.offset: 0, or 2^(b-1))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import WinqError
from .grids import NL4_GROUP, GridSpec


@dataclass(frozen=True)
class QuantizedWeight:
    codes: torch.Tensor  # uint8 (out, in)
    scale: torch.Tensor  # float16 (out, n_groups)
    zero: torch.Tensor  # float32 (out, n_groups)
    grid: str
    bits: int
    group_size: int  # elements per group along the input dim (== in_features for per-row)
    sub_scale: torch.Tensor | None = None  # K grids only: int16 (out, G)
    sub_min: torch.Tensor | None = None  # K grids only: int16 (out, G)
    super_min: torch.Tensor | None = None  # K grids only: float16 (out, G)

    def __post_init__(self):
        GridSpec(self.grid, self.bits)  # validates the pair
        if self.codes.dtype != torch.uint8 or self.codes.dim() != 2:
            raise WinqError(f"codes must be uint8 (out, in), got {self.codes.dtype} {tuple(self.codes.shape)}")
        out, inf = self.codes.shape
        if self.group_size < 1 or inf % self.group_size:
            raise WinqError(f"group_size={self.group_size} does not divide in_features={inf}")
        groups = (out, inf // self.group_size)
        if self.scale.dtype != torch.float16 or tuple(self.scale.shape) != groups:
            raise WinqError(f"scale must be float16 {groups}, got {self.scale.dtype} {tuple(self.scale.shape)}")
        if self.zero.dtype != torch.float32 or tuple(self.zero.shape) != groups:
            raise WinqError(f"zero must be float32 {groups}, got {self.zero.dtype} {tuple(self.zero.shape)}")
        if self.spec.kquant is not None:
            for field in ("sub_scale", "sub_min", "super_min"):
                t = getattr(self, field)
                want = torch.float16 if field == "super_min" else torch.int16
                if t is None or t.dtype != want or tuple(t.shape) != groups:
                    got = "missing" if t is None else f"{t.dtype} {tuple(t.shape)}"
                    raise WinqError(f"{self.grid} weights need {field} {want} {groups}, got {got}")
        if self.grid == "nl4":
            if self.group_size != NL4_GROUP:
                raise WinqError(f"nl4 weights have groups of {NL4_GROUP} (IQ4_NL blocks), "
                                f"got group_size={self.group_size}")
            if self.zero.numel() and bool(self.zero.any()):
                raise WinqError("nl4 weights have zero 0 (their levels are IQ4_NL's table)")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def n_groups(self) -> int:
        return self.codes.shape[1] // self.group_size

    @property
    def per_row(self) -> bool:
        return self.group_size == self.codes.shape[1]

    @property
    def spec(self) -> GridSpec:
        return GridSpec(self.grid, self.bits)

    @property
    def levels(self) -> torch.Tensor:
        """q - z as float32 (out, in) (nl4: NL4_LEVELS[q]; K grids: the integer level, codes - offset)."""
        out, inf = self.codes.shape
        if self.spec.kquant is not None:
            return self.codes.to(torch.float32) - self.spec.kquant.offset
        q = self.spec.code_values(self.codes).reshape(out, self.n_groups, self.group_size)  # (out, G, g)
        return (q - self.zero[..., None]).reshape(out, inf)

    def dequantize(self) -> torch.Tensor:
        """float32 (out, in): float32(scale) * (codes - zero), per group (nl4: float32(scale) * NL4_LEVELS[codes])."""
        out, inf = self.codes.shape
        fmt = self.spec.kquant
        if fmt is not None:  # (d sc) level - dmin m, as winq.kquant.dequantize, from the repeated d / dmin
            S = self.scale.to(torch.float32) * self.sub_scale.to(torch.float32)
            M = self.super_min.to(torch.float32) * self.sub_min.to(torch.float32)
            lev = self.levels.reshape(out, self.n_groups, self.group_size)
            return (S[..., None] * lev - M[..., None]).reshape(out, inf)
        lev = self.levels.reshape(out, self.n_groups, self.group_size)  # (out, G, g)
        return (self.scale.to(torch.float32)[..., None] * lev).reshape(out, inf)

    @classmethod
    def from_module(cls, module) -> "QuantizedWeight":
        """The QuantizedWeight of a fake-quant layer (a winq QuantLinear)."""
        return module.quantized_weight()

    def to(self, device) -> "QuantizedWeight":
        def mv(t):
            return t.to(device) if t is not None else None

        return QuantizedWeight(
            self.codes.to(device), self.scale.to(device), self.zero.to(device), self.grid, self.bits, self.group_size,
            mv(self.sub_scale), mv(self.sub_min), mv(self.super_min),
        )
