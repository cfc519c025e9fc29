"""Quantization grids: the integer levels, the zero point and the deployment scale.

Every grid maps a latent weight row (or group) W and a learned positive scale alpha to
integer codes q in [0, 2**bits) and a deployment scale s such that the fake-quant weight is

    W_q = float32(fp16(s)) * (q - z)

(ARCHITECTURE §2-3). The table, with the ParetoQ / WinQ definitions it reproduces:

| grid    | bits  | level q - z                  | z          | s         | codes from x = W / alpha             |
|---------|-------|------------------------------|------------|-----------|--------------------------------------|
| lsq     | 3,4,8 | -2^(b-1) .. 2^(b-1)-1        | 2^(b-1)    | alpha     | clamp(round(x), -2^(b-1), 2^(b-1)-1) |
| seq     | 2     | -1.5, -0.5, 0.5, 1.5         | 1.5        | alpha / 2 | round(clamp(x, ±0.99) * 2 - 0.5)+0.5 |
| ternary | 2     | -1, 0, 1                     | 1          | 2alpha/3  | round(clamp(x, ±0.99) * 1.5)         |
| binary  | 1     | -0.5, 0.5                    | 0.5        | 2 alpha   | sign(x) / 2 (x >= 0 -> +)            |
| affine  | 2..8  | q - z, z a learned integer   | 0..2^b - 1 | alpha     | clamp(round(x) + z, 0, 2^b - 1)      |

`levels()` computes the level (q - z) with straight-through rounding, so autograd gives
the LSQ / stretched-elastic gradients for both W and alpha: the product rule on
s(alpha) * level(W / alpha) reproduces ParetoQ's hand-written backward for lsq and seq
(clipped weights get zero gradient, clipped alpha terms Qn / Qp). Two documented
differences, both the true derivative of the forward: ternary's clipped alpha term is
+-2/3 (ParetoQ uses +-1), binary's alpha gradient is sign(W) - W / alpha inside the clip
range (ParetoQ uses sign(W)). ParetoQ's LSQ gradient scale 1/sqrt(numel * Qp) on alpha is
not applied: AdamW normalises each parameter's step, so it would only shift clipping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConfigError

GRIDS = ("lsq", "seq", "ternary", "binary", "affine")
# bits each grid accepts (the code width in the packed formats)
GRID_BITS = {
    "lsq": (3, 4, 8),
    "seq": (2,),
    "ternary": (2,),
    "binary": (1,),
    "affine": (2, 3, 4, 8),
}
DEFAULT_GRID = {1: "binary", 2: "seq", 3: "lsq", 4: "lsq", 8: "lsq"}
SEQ_CLIP = 1.0 - 1e-2  # ParetoQ's clip_val: keeps round(clamp(x) * 2 - 0.5) inside {-2..1}
ALPHA_EPS = 1e-5  # ParetoQ: alpha = max(alpha, 1e-5)


def check_grid(grid: str, bits: int) -> None:
    if grid not in GRIDS:
        raise ConfigError(f"unknown grid {grid!r}: choose one of {', '.join(GRIDS)}")
    if bits not in GRID_BITS[grid]:
        ok = ", ".join(str(b) for b in GRID_BITS[grid])
        pairs = "; ".join(f"{g}: {', '.join(map(str, b))}" for g, b in GRID_BITS.items())
        raise ConfigError(f"grid {grid!r} does not support bits={bits} (it takes {ok}); valid pairs are {pairs}")


class _RoundSTE(torch.autograd.Function):
    """round() in the forward, identity gradient (straight-through)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _HalfSTE(torch.autograd.Function):
    """Round to float16 and back in the forward (the deployed scale), identity gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.to(torch.float16).to(torch.float32)

    @staticmethod
    def backward(ctx, g):
        return g


class _SignSTE(torch.autograd.Function):
    """sign(x) with sign(0) = +1 in the forward, identity gradient (x is pre-clamped)."""

    @staticmethod
    def forward(ctx, x):
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g


round_ste = _RoundSTE.apply
half_ste = _HalfSTE.apply
sign_ste = _SignSTE.apply


@dataclass(frozen=True)
class GridSpec:
    """Static facts about one (grid, bits) pair."""

    grid: str
    bits: int

    def __post_init__(self):
        check_grid(self.grid, self.bits)

    @property
    def fixed_zero(self) -> float | None:
        """z for grids with a fixed zero point (None for affine, whose z is learned)."""
        return {
            "lsq": float(2 ** (self.bits - 1)),
            "seq": 1.5,
            "ternary": 1.0,
            "binary": 0.5,
            "affine": None,
        }[self.grid]

    @property
    def scale_factor(self) -> float:
        """Deployment scale s = scale_factor * alpha."""
        return {"lsq": 1.0, "seq": 0.5, "ternary": 2.0 / 3.0, "binary": 2.0, "affine": 1.0}[self.grid]

    @property
    def n_codes(self) -> int:
        """How many distinct codes the grid uses (ternary uses 3 of its 4)."""
        return 3 if self.grid == "ternary" else 2**self.bits

    def init_alpha(self, w: torch.Tensor) -> torch.Tensor:
        """Initial alpha per group from the weights w (..., g) -> (..., 1), as the WinQ reference does."""
        a = w.abs()
        if self.grid == "lsq":
            alpha = a.amax(-1, keepdim=True) / (2 ** (self.bits - 1) - 1)
        elif self.grid in ("seq", "ternary"):
            alpha = a.amax(-1, keepdim=True)
        elif self.grid == "binary":
            alpha = a.mean(-1, keepdim=True)
        else:  # affine: min/max over the group
            lo = w.amin(-1, keepdim=True).clamp(max=0)
            hi = w.amax(-1, keepdim=True).clamp(min=0)
            alpha = (hi - lo) / (2**self.bits - 1)
        return alpha.clamp(min=ALPHA_EPS)

    def init_zero(self, w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """Initial (float, learned) zero point for affine: round(-min / alpha)."""
        lo = w.amin(-1, keepdim=True).clamp(max=0)
        return torch.round(-lo / alpha).clamp(0, 2**self.bits - 1)

    def levels(self, w: torch.Tensor, alpha: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
        """Level q - z (float32, differentiable with STE) for w (..., g) and alpha (..., 1)."""
        x = w / alpha
        b = self.bits
        if self.grid == "lsq":  # clamp before rounding: clipped weights get no gradient (LSQ / ParetoQ)
            return round_ste(torch.clamp(x, -(2 ** (b - 1)), 2 ** (b - 1) - 1))
        if self.grid == "seq":
            return round_ste(torch.clamp(x, -SEQ_CLIP, SEQ_CLIP) * 2.0 - 0.5) + 0.5
        if self.grid == "ternary":
            return round_ste(torch.clamp(x, -SEQ_CLIP, SEQ_CLIP) * 1.5)
        if self.grid == "binary":
            return 0.5 * sign_ste(torch.clamp(x, -1.0, 1.0))
        # affine: q = clamp(round(x) + z, 0, 2^b - 1), level = q - z = round(clamp(x, -z, 2^b - 1 - z))
        # for an integer z (STE-rounded); clamping first gives clipped weights no gradient
        z = torch.clamp(round_ste(zero), 0, 2**b - 1)
        return round_ste(torch.clamp(x, -z, 2**b - 1 - z))

    @property
    def ste_clip(self) -> tuple[float, float, float, int]:
        """(lo, hi, k, m) of a fixed-zero grid: the straight-through derivative of the level w.r.t.
        x = W / alpha is k where lo <= x <= hi (torch.clamp passes gradient there) and 0 outside;
        m * level is an integer in int8 range (m = 2 for the half-integer levels of seq and binary)."""
        b = self.bits
        return {
            "lsq": (-(2.0 ** (b - 1)), 2.0 ** (b - 1) - 1, 1.0, 1),
            "seq": (-SEQ_CLIP, SEQ_CLIP, 2.0, 2),
            "ternary": (-SEQ_CLIP, SEQ_CLIP, 1.5, 1),
            "binary": (-1.0, 1.0, 0.5, 2),
        }[self.grid]

    def level_value(self, x: torch.Tensor) -> torch.Tensor:
        """The level at x = W / alpha without autograd, for the fixed-zero grids: `levels()`'s forward
        value bit for bit (same ops, same order). Used by the fused quantizer (winq.qlinear)."""
        lo, hi, _, _ = self.ste_clip
        if self.grid == "lsq":
            return torch.round(torch.clamp(x, lo, hi))
        if self.grid == "seq":
            return torch.round(torch.clamp(x, lo, hi) * 2.0 - 0.5) + 0.5
        if self.grid == "ternary":
            return torch.round(torch.clamp(x, lo, hi) * 1.5)
        return 0.5 * torch.where(torch.clamp(x, lo, hi) >= 0, 1.0, -1.0).to(x.dtype)

    def step_coordinates(self, x: torch.Tensor, zero: torch.Tensor | None = None):
        """x = W / alpha in units of the grid's step: (u, lo, hi) with code index round(clamp(u, lo, hi)).

        One step (the distance between neighbouring levels, s in weight units) is 1 in u; the
        rounding boundaries sit at half-integers of u inside [lo, hi]. For affine, hi - lo is
        2^b - 1 and lo = -z per group (tensors; floats for the other grids)."""
        if self.grid == "lsq":
            return x, -(2.0 ** (self.bits - 1)), 2.0 ** (self.bits - 1) - 1.0
        if self.grid == "seq":
            return 2.0 * x - 0.5, -2.0, 1.0
        if self.grid == "ternary":
            return 1.5 * x, -1.0, 1.0
        if self.grid == "binary":
            return 0.5 * x + 0.5, 0.0, 1.0
        z = torch.clamp(torch.round(zero), 0, 2**self.bits - 1)
        return x, -z, 2**self.bits - 1 - z

    def zero_value(self, zero: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """The exact zero point z (float32) with the shape of `like` (..., 1)."""
        if self.grid == "affine":
            return torch.clamp(torch.round(zero.detach()), 0, 2**self.bits - 1).to(torch.float32)
        return torch.full_like(like, self.fixed_zero, dtype=torch.float32)
