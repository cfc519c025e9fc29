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
        """q - z as float32 (out, in) (nl4: NL4_LEVELS[q])."""
        out, inf = self.codes.shape
        q = self.spec.code_values(self.codes).reshape(out, self.n_groups, self.group_size)  # (out, G, g)
        return (q - self.zero[..., None]).reshape(out, inf)

    def dequantize(self) -> torch.Tensor:
        """float32 (out, in): float32(scale) * (codes - zero), per group (nl4: float32(scale) * NL4_LEVELS[codes])."""
        out, inf = self.codes.shape
        lev = self.levels.reshape(out, self.n_groups, self.group_size)  # (out, G, g)
        return (self.scale.to(torch.float32)[..., None] * lev).reshape(out, inf)

    @classmethod
    def from_module(cls, module) -> "QuantizedWeight":
        """The QuantizedWeight of a fake-quant layer (a winq QuantLinear)."""
        return module.quantized_weight()

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(
            self.codes.to(device), self.scale.to(device), self.zero.to(device), self.grid, self.bits, self.group_size
        )
