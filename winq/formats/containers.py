"""The one rule for storing a grid's codes in a format's wider integer fields, and its exactness check.

A QuantizedWeight holds W = s (q - z) with a float16 scale s and a zero z that is an integer or
a half-integer. A format stores integer codes q' with an integer (or, for ONNX, float) zero z'
and its own scale s'. Every mapping winq writes is

    q' = m q + a,   z' = m z + a,   s' = s / m          so that   s' (q' - z') = s (q - z)

with m = 2 where z is a half-integer (seq, binary: levels +-0.5, +-1.5 become odd integers) and
m = 1 otherwise; a moves the levels onto the format's range or its fixed zero point (for a
format with a fixed zero z'_f and a grid with a learned zero, a = z'_f - m z differs per group).

Exactness (checked by `remap`, which raises FormatError naming the layer otherwise): q' and z'
fit the field, z' is an integer (unless the format stores float zeros), and s / m is exactly
representable in the format's scale dtype: always in float32 (m is a power of two); in float16
unless s is a subnormal with an odd last bit. Then float32(s') * (q' - z') and float32(s) * (q - z)
are the same real number, exact in float32 (11-bit mantissa times an integer below 2^9), so the
dequantized weights are equal bit for bit.

The rule needs evenly spaced levels q - z. A non-uniform grid (nl4: llama.cpp's IQ4_NL table) has no such
mapping: `remap` raises FormatError for it, and `lookup` refuses it with a ConfigError that names the
format that holds it (GGUF, `NON_UNIFORM`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from winq.errors import FormatError
from winq.grids import GridSpec
from winq.qweight import QuantizedWeight


# non-uniform grids -> where they are exact (the refusal of every integer-container format names it)
NON_UNIFORM = {"nl4": "--format gguf (IQ4_NL, exact; or the Q8_0 container)",
               **{g: f"--format gguf ({g.upper()}, exact)" for g in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")}}


def non_uniform_message(grid: str, bits: int, fmt: str) -> str:
    why = ("its levels are llama.cpp's IQ4_NL table, not evenly spaced" if grid == "nl4" else
           f"its scales are {grid.upper()}'s two-level ones (an fp16 scale per 256 weights times integer sub-block "
           "scales, and sub-block mins)")
    return (f"{fmt} cannot hold grid {grid!r} ({bits}-bit): {why}, and {fmt} stores scale * (q - zero) per group; "
            f"export it with {NON_UNIFORM.get(grid, '--format gguf')}")


def half_mul(qw: QuantizedWeight) -> int:
    """m: 1 when every zero point is an integer, 2 when they are half-integers (seq, binary)."""
    return 1 if torch.equal(qw.zero, torch.round(qw.zero)) else 2


@dataclass
class Remapped:
    """q', z', s' of one layer (out, in) orientation, per group as in QuantizedWeight."""

    codes: torch.Tensor  # int64 (out, in): q'
    zero: torch.Tensor  # float32 (out, G): z'
    scale: torch.Tensor  # (out, G) in the requested dtype: s'
    mul: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """float32 (out, in): float32(s') * (q' - z'), per group."""
        out, inf = self.codes.shape
        q = self.codes.to(torch.float32).reshape(out, -1, self.group_size)  # (out, G, g)
        return (self.scale.to(torch.float32)[..., None] * (q - self.zero[..., None])).reshape(out, inf)


def remap(qw: QuantizedWeight, mul: int, add, name: str, lo: int, hi: int, scale_dtype=torch.float16,
          integer_zero: bool = True, zero_range: tuple[int, int] | None = None) -> Remapped:
    """q' = mul q + add, z' = mul z + add, s' = s / mul, checked to be exact (see the module docstring).

    add: an int, or a float32 (out, G) tensor of integers (one offset per group). q' must lie in
    [lo, hi]; with integer_zero, z' must be an integer in zero_range (default [lo, hi]). FormatError otherwise.
    """
    if not GridSpec(qw.grid, qw.bits).uniform:
        raise FormatError(f"{name}: " + non_uniform_message(qw.grid, qw.bits, "an integer container q' = m q + a"))
    add_t = torch.as_tensor(add, dtype=torch.float32)
    zero = qw.zero * mul + add_t  # (out, G)
    if add_t.dim():
        if not torch.equal(add_t, torch.round(add_t)):
            raise FormatError(f"{name}: the code offsets are not integers")
        add_codes = add_t.to(torch.int64).repeat_interleave(qw.group_size, dim=1)  # (out, in)
    else:
        add_codes = int(add)
    codes = qw.codes.to(torch.int64) * mul + add_codes  # (out, in)
    if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise FormatError(f"{name}: codes {int(codes.min())}..{int(codes.max())} do not fit {lo}..{hi}")
    if integer_zero:
        if not torch.equal(zero, torch.round(zero)):
            raise FormatError(f"{name}: zero points {zero.unique()[:4].tolist()} are not integers after mapping; "
                              f"this format stores integer zeros")
        zlo, zhi = zero_range or (lo, hi)
        if zero.numel() and (float(zero.min()) < zlo or float(zero.max()) > zhi):
            raise FormatError(f"{name}: zero points {float(zero.min()):g}..{float(zero.max()):g} do not fit "
                              f"{zlo}..{zhi}")
    s32 = qw.scale.to(torch.float32)
    scale = (s32 / mul).to(scale_dtype)
    inexact = scale.to(torch.float32) * mul != s32
    if inexact.any():
        bad = qw.scale[inexact]
        raise FormatError(
            f"{name}: {int(inexact.sum())} scales are float16 subnormals with an odd last bit "
            f"(smallest {float(bad.abs().min()):.3g}), so s/{mul} is not exact in "
            f"{str(scale_dtype).removeprefix('torch.')} "
            f"and the {qw.grid} grid cannot be stored in this format's integer-zero container exactly"
        )
    return Remapped(codes=codes, zero=zero, scale=scale.contiguous(), mul=mul, group_size=qw.group_size)


@dataclass(frozen=True)
class Container:
    """A fixed mapping of one grid into a format: `bits` per code in the file, q' = mul q + add."""

    bits: int  # code width in the file
    mul: int = 1
    add: int = 0
    float_zero: bool = False  # the format stores z' as a float (ONNX's float zero point): half-integers allowed

    @property
    def native(self) -> bool:
        return self.mul == 1 and self.add == 0

    def remap(self, qw: QuantizedWeight, name: str, scale_dtype=torch.float16) -> Remapped:
        """This container's q', z', s' of qw (unsigned codes in 0..2^bits - 1), checked to be exact."""
        return remap(qw, self.mul, self.add, name, 0, 2**self.bits - 1, scale_dtype, integer_zero=not self.float_zero)

    def describe(self, grid: str, grid_bits: int, zero_name: str = "z'", default_zero: int | None = None,
                 learned_zero: str = "z") -> str:
        """'native' or the mapping, e.g. "3-bit container for 2-bit codes: q' = 2q + 1, z' = 4, s' = s/2"."""
        z = GridSpec(grid, grid_bits).fixed_zero  # None for a learned (affine) zero
        if self.native and self.bits == grid_bits:
            return "native"
        q = ("q" if self.mul == 1 else f"{self.mul}q") + (f" + {self.add}" if self.add else "")
        if z is None:
            zp = learned_zero if self.native else f"{self.mul}z + {self.add}"
        else:
            zv = self.mul * z + self.add
            zp = f"{zv:g}" + (" (default)" if default_zero is not None and zv == default_zero else "")
        s = "s" if self.mul == 1 else f"s/{self.mul}"
        head = (f"{self.bits}-bit codes" if self.bits == grid_bits
                else f"{self.bits}-bit container for {grid_bits}-bit codes")
        return f"{head}: q' = {q}, {zero_name} = {zp}, s' = {s}"


def lookup(table: dict, grid: str, bits: int, fmt: str) -> Container:
    """table[(grid, bits)], or a ConfigError listing what the format holds (for a non-uniform grid: naming the
    format that holds it)."""
    from winq.errors import ConfigError

    if (grid, bits) not in table and grid in NON_UNIFORM:
        raise ConfigError(non_uniform_message(grid, bits, fmt))
    try:
        return table[(grid, bits)]
    except KeyError:
        raise ConfigError(
            f"no {fmt} mapping for grid {grid!r} with {bits} bits; {fmt} "
            "holds: " + ", ".join(f"{g}{b}" for g, b in table)
        ) from None
