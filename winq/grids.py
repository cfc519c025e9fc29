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
| nl4     | 4     | NL4_LEVELS[q] (IQ4_NL's)     | 0          | alpha     | nearest level to clamp(x, -127, 113) |
| q2_k .. q6_k | 2..6 | llama.cpp's K-quants: two-level scales, see winq.kquant (not s (q - z) per group)      |

`levels()` computes the level (q - z) with straight-through rounding, so autograd gives
the LSQ / stretched-elastic gradients for both W and alpha: the product rule on
s(alpha) * level(W / alpha) reproduces ParetoQ's hand-written backward for lsq and seq
(clipped weights get zero gradient, clipped alpha terms Qn / Qp). Two documented
differences, both the true derivative of the forward: ternary's clipped alpha term is
+-2/3 (ParetoQ uses +-1), binary's alpha gradient is sign(W) - W / alpha inside the clip
range (ParetoQ uses sign(W)). ParetoQ's LSQ gradient scale 1/sqrt(numel * Qp) on alpha is
not applied: AdamW normalises each parameter's step, so it would only shift clipping.

nl4 is llama.cpp's IQ4_NL lattice: 16 fixed non-uniform integer levels (ggml's kvalues_iq4nl, `NL4_LEVELS`)
times one learned scale per group of exactly 32 weights (`NL4_GROUP`, an IQ4_NL block). The code q is the
level's index 0..15 (the nibble IQ4_NL stores), the zero is 0, and the scale is IQ4_NL's d itself:
W_q = float32(fp16(alpha)) * NL4_LEVELS[q], which is llama.cpp's x = d * kvalues[q] with d = fp16(alpha)
(so the export writes s as d, bit for bit). Rounding is to the nearest level of clamp(x, -127, 113); the
decision thresholds are the midpoints between neighbouring levels (all multiples of 0.5, exact in float32)
and a value exactly on a midpoint goes to the upper level, as llama.cpp's best_index_int8 decides. The
level's straight-through derivative in x is 1 inside [-127, 113] and 0 outside, so dW_q/dW is S / alpha
inside the range (0 for clipped weights) and dW_q/dalpha = level - (S / alpha) x inside, level outside
(S = fp16(alpha)): the true derivative of the forward, LSQ-style, as for lsq. Its `init_alpha` is an
error-minimising search like llama.cpp's IQ4_NL quantizer (`nl4_search_alpha`), over both signs of alpha
(a negative alpha is the mirrored lattice, as llama.cpp's negative d; see clamp_alpha). Only GGUF holds it
(IQ4_NL, or the Q8_0 container): GPTQ and MatMulNBits store uniform levels s (q - z) and refuse it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConfigError

KGRIDS = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")  # llama.cpp's K-quants, two-level scales (winq.kquant)
GRIDS = ("lsq", "seq", "ternary", "binary", "affine", "nl4", *KGRIDS)
# bits each grid accepts (the code width in the packed formats)
GRID_BITS = {
    "lsq": (3, 4, 5, 8),
    "seq": (2,),
    "ternary": (2,),
    "binary": (1,),
    "affine": (2, 3, 4, 8),
    "nl4": (4,),
    "q2_k": (2,),
    "q3_k": (3,),
    "q4_k": (4,),
    "q5_k": (5,),
    "q6_k": (6,),
}

# ---- the K grids' formats (their quantizer: winq.kquant) ----

SUPER = 256  # weights per K-quant super-block (ggml's QK_K)


@dataclass(frozen=True)
class KFormat:
    name: str  # the grid name, also the ggml type's lower-case name ("q4_k")
    bits: int  # bits per weight code
    sub: int  # weights per sub-block (the grid's group size)
    scale_bits: int  # bits of each sub-block scale (and min) code
    has_min: bool  # W = S q - M with an unsigned scale and a min (else a signed scale and signed levels)
    fallback: tuple[str, int, int]  # (grid, bits, group) llama.cpp uses for rows that are not whole super-blocks

    @property
    def n_sub(self) -> int:
        return SUPER // self.sub

    @property
    def code_range(self) -> tuple[int, int]:
        """(lo, hi) of the level: q for the types with a min, the signed l otherwise."""
        return (0, 2**self.bits - 1) if self.has_min else (-(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1)

    @property
    def scale_range(self) -> tuple[int, int]:
        """(lo, hi) of the sub-block scale code sc (and min code m)."""
        return (0, 2**self.scale_bits - 1) if self.has_min else (-(2 ** (self.scale_bits - 1)),
                                                                 2 ** (self.scale_bits - 1) - 1)

    @property
    def offset(self) -> int:
        """The stored code is level + offset (0 .. 2^b - 1)."""
        return 0 if self.has_min else 2 ** (self.bits - 1)


# llama.cpp's fallbacks (tensor_type_fallback in llama-quant.cpp, as vendored by llama-cpp-python 0.3.36) for rows
# that are not a multiple of 256: Q2_K / Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1 (winq: Q5_0, whose uniform signed
# grid trains as lsq 5-bit; Q5_1's min is exact only where fp16(-z s) is), Q6_K -> Q8_0
KFORMATS: dict[str, KFormat] = {
    "q2_k": KFormat("q2_k", 2, 16, 4, True, ("lsq", 4, 32)),
    "q3_k": KFormat("q3_k", 3, 16, 6, False, ("lsq", 4, 32)),
    "q4_k": KFormat("q4_k", 4, 32, 6, True, ("lsq", 5, 32)),
    "q5_k": KFormat("q5_k", 5, 32, 6, True, ("lsq", 5, 32)),
    "q6_k": KFormat("q6_k", 6, 16, 8, False, ("lsq", 8, 32)),
}


KGRID_SUB = {k: f.sub for k, f in KFORMATS.items()}  # weights per sub-block (the group)
DEFAULT_GRID = {1: "binary", 2: "seq", 3: "lsq", 4: "lsq", 5: "lsq", 8: "lsq"}
SEQ_CLIP = 1.0 - 1e-2  # ParetoQ's clip_val: keeps round(clamp(x) * 2 - 0.5) inside {-2..1}
ALPHA_EPS = 1e-5  # ParetoQ: alpha = max(alpha, 1e-5)


def clamp_alpha(alpha: torch.Tensor) -> torch.Tensor:
    """alpha kept at least ALPHA_EPS away from 0 with its sign. A negative alpha is the grid's lattice mirrored
    (s (q - z) with s < 0): for the asymmetric levels of lsq (-8 .. 7) it puts the extra level on the positive
    side, as llama.cpp's Q4_0 does with a negative d (winq.calibrate picks the sign per group)."""
    return torch.where(alpha < 0, alpha.clamp(max=-ALPHA_EPS), alpha.clamp(min=ALPHA_EPS))

# nl4: llama.cpp's IQ4_NL levels (kvalues_iq4nl), code q -> level in units of the scale; one scale per 32 weights
NL4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
NL4_GROUP = 32
NL4_STEP = (NL4_LEVELS[-1] - NL4_LEVELS[0]) / (len(NL4_LEVELS) - 1)  # 16: the mean distance between levels
NL4_TRIES = 7  # the search tries the largest magnitude at level extremes +- 0..7, as llama.cpp's ntry = 7
# x >= t for a threshold t that is a multiple of 0.5 <=> floor(2 x) >= 2 t: a table over floor(2 x) gives the
# nearest level's index of any x in [-127, 113] with one gather (ties up, as the thresholds are inclusive)
_NL4_TWICE_LO = 2 * NL4_LEVELS[0]
_NL4_TABLES: dict = {}  # device -> (levels float32 (16,), index by floor(2x) - 2*lo int64 (481,), levels by it)
_NL4_SEGMENTS: dict = {}  # device -> segment i (lev[i] <= x < lev[i + 1], 0..14) by floor(x) - lo, int64 (241,)


def _nl4_tables(device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    key = str(device)
    if key not in _NL4_TABLES:
        lev = torch.tensor(NL4_LEVELS, dtype=torch.float32)
        mid = (lev[1:] + lev[:-1]) / 2  # the 15 decision thresholds
        twice = torch.arange(_NL4_TWICE_LO, 2 * NL4_LEVELS[-1] + 1, dtype=torch.float32)  # floor(2x) over the range
        idx = (twice[:, None] / 2 >= mid[None, :]).sum(1)  # how many thresholds x reaches
        _NL4_TABLES[key] = (lev.to(device), idx.to(device), lev[idx].to(device))
    return _NL4_TABLES[key]


def _nl4_segment(x: torch.Tensor) -> torch.Tensor:
    """int64 segment i of x (lev[i] <= x < lev[i + 1]; 0 below the range, 14 above it): the levels are integers,
    so floor(x) decides it."""
    key = str(x.device)
    if key not in _NL4_SEGMENTS:
        lev = torch.tensor(NL4_LEVELS, dtype=torch.float32)
        k = torch.arange(NL4_LEVELS[0], NL4_LEVELS[-1] + 1, dtype=torch.float32)
        _NL4_SEGMENTS[key] = (k[:, None] >= lev[None, 1:-1]).sum(1).to(x.device)
    i = torch.floor(torch.clamp(x.float(), NL4_LEVELS[0], NL4_LEVELS[-1])).sub_(NL4_LEVELS[0]).to(torch.int32)
    return _NL4_SEGMENTS[key].index_select(0, i.clamp_(0, NL4_LEVELS[-1] - NL4_LEVELS[0]).reshape(-1)).reshape(x.shape)


def _nl4_slot(x: torch.Tensor) -> torch.Tensor:
    """int32 (numel,) index into the floor(2x) tables for x already clamped to [-127, 113] (float32): floor(2x)
    is an exact integer, so the threshold tests x >= t <=> floor(2x) >= 2t are exact."""
    i = torch.floor(x * 2.0).sub_(_NL4_TWICE_LO).to(torch.int32)
    return i.clamp_(0, 2 * (NL4_LEVELS[-1] - NL4_LEVELS[0])).reshape(-1)  # NaN casts outside: keep the gather in range


def nl4_index(x: torch.Tensor) -> torch.Tensor:
    """The code (level index 0..15, int64) of the level nearest to x (in units of the scale, clamped to
    [-127, 113]); a tie goes to the upper level."""
    _, idx, _ = _nl4_tables(x.device)
    return idx.index_select(0, _nl4_slot(torch.clamp(x.float(), NL4_LEVELS[0], NL4_LEVELS[-1]))).reshape(x.shape)


def nl4_round(x: torch.Tensor) -> torch.Tensor:
    """The nearest IQ4_NL level (float32) of x already clamped to [-127, 113]; a tie goes to the upper level."""
    _, _, val = _nl4_tables(x.device)
    return val.index_select(0, _nl4_slot(x)).reshape(x.shape)


def nl4_values(codes: torch.Tensor) -> torch.Tensor:
    """float32 levels of nl4 codes (any integer dtype, values 0..15)."""
    lev, _, _ = _nl4_tables(codes.device)
    return lev.index_select(0, codes.reshape(-1).to(torch.int32)).reshape(codes.shape)


def check_grid(grid: str, bits: int) -> None:
    if grid not in GRIDS:
        raise ConfigError(f"unknown grid {grid!r}: choose one of {', '.join(GRIDS)}")
    if bits not in GRID_BITS[grid]:
        ok = ", ".join(str(b) for b in GRID_BITS[grid])
        pairs = "; ".join(f"{g}: {', '.join(map(str, b))}" for g, b in GRID_BITS.items())
        raise ConfigError(f"grid {grid!r} does not support bits={bits} (it takes {ok}); valid pairs are {pairs}")


def check_group(grid: str, group_size: int, in_features: int | None = None) -> None:
    """ConfigError when the grid cannot use this group size: nl4 takes groups of exactly 32 (an IQ4_NL block);
    group_size -1 (per row) is accepted only for rows of 32 (in_features given). A K grid's group is its sub-block
    (16 or 32, KGRID_SUB)."""
    if grid in KGRID_SUB:
        if group_size != KGRID_SUB[grid]:
            raise ConfigError(f"grid {grid!r} (llama.cpp's {grid.upper()}) has one scale per sub-block of "
                              f"{KGRID_SUB[grid]} weights: use group_size={KGRID_SUB[grid]} (--group-size "
                              f"{KGRID_SUB[grid]}), or --recipe {grid}, which sets it; got {group_size}")
        return
    if grid != "nl4":
        return
    g = in_features if group_size == -1 and in_features is not None else group_size
    if g != NL4_GROUP:
        got = "-1 (one scale per row)" if group_size == -1 else str(group_size)
        raise ConfigError(f"grid 'nl4' (llama.cpp's IQ4_NL) has one scale per block of {NL4_GROUP} weights: use "
                          f"group_size={NL4_GROUP} (--group-size {NL4_GROUP}), got {got}")


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


class _NL4RoundSTE(torch.autograd.Function):
    """The nearest IQ4_NL level in the forward (x pre-clamped to [-127, 113]), identity gradient."""

    @staticmethod
    def forward(ctx, x):
        return nl4_round(x)

    @staticmethod
    def backward(ctx, g):
        return g


round_ste = _RoundSTE.apply
half_ste = _HalfSTE.apply
sign_ste = _SignSTE.apply
nl4_round_ste = _NL4RoundSTE.apply


@torch.no_grad()
def nl4_search_alpha(w: torch.Tensor, importance: torch.Tensor | None = None, tries: int = NL4_TRIES,
                     refine: int = 2, signed: bool = True) -> torch.Tensor:
    """The nl4 scale per group (..., g) -> (..., 1) minimising the weighted squared error
    sum_j h_j (w_j - d * level_j)^2, as llama.cpp's IQ4_NL quantizer (quantize_row_iq4_nl_impl) chooses d:

    h_j = w_j^2 without importances (llama.cpp's weights without an imatrix), else
    importance_j * sqrt(sigma2 + w_j^2) with sigma2 = 2 mean(w^2) over the group (its imatrix form; importance
    broadcasts against w). Candidates put the group's largest magnitude m at a level extreme +- t,
    |1/d| = (127 + t) / m and (113 + t) / m for t in -tries..tries, with d > 0 and (signed) d < 0 (the mirrored
    lattice: the levels' asymmetry then favours the other side, as llama.cpp's negative d does); each candidate's
    levels are the nearest ones, its d the weighted least-squares fit sum h w level / sum h level^2, and the best
    fit wins (largest (sum h w level)^2 / sum h level^2). This covers every candidate llama.cpp tries. `refine`
    rounds of re-assigning the levels under the winner and re-fitting follow (kept where they lower the error).
    |d| >= ALPHA_EPS (clamp_alpha); all-zero groups get +ALPHA_EPS."""
    x = w.float()
    if importance is None:
        h = x * x
    else:
        sigma2 = 2.0 * (x * x).mean(-1, keepdim=True)
        h = importance.to(x.dtype) * torch.sqrt(sigma2 + x * x)
    amax = x.abs().amax(-1, keepdim=True)
    safe = amax.clamp(min=1e-30)
    lo, hi = float(NL4_LEVELS[0]), float(NL4_LEVELS[-1])
    best_d = amax / -lo
    best = torch.full_like(amax, -1.0)

    def fit(inv):  # inv = 1 / d, either sign
        lev = nl4_round(torch.clamp(x * inv, lo, hi))
        sqx = (h * lev * x).sum(-1, keepdim=True)
        sq2 = (h * lev * lev).sum(-1, keepdim=True)
        ok = (sq2 > 0) & (sqx * inv > 0)  # the fitted d keeps the candidate's sign
        sq2 = torch.where(ok, sq2, torch.ones_like(sq2))
        return torch.where(ok, sqx * sqx / sq2, torch.full_like(sqx, -1.0)), sqx / sq2

    def keep(score, d):
        nonlocal best, best_d
        better = score > best
        best, best_d = torch.where(better, score, best), torch.where(better, d, best_d)

    for sign in (1.0, -1.0) if signed else (1.0,):
        for top in (-lo, hi):
            for t in range(-tries, tries + 1):
                keep(*fit(sign * (top + t) / safe))
    for _ in range(refine):
        keep(*fit(1.0 / torch.where(best_d < 0, best_d.clamp(max=-1e-30), best_d.clamp(min=1e-30))))
    small = best_d.abs() < ALPHA_EPS  # the layer raises |alpha| to ALPHA_EPS: take the better side there
    if signed and bool(small.any()):
        def err(d):
            return (h * (x - d * nl4_round(torch.clamp(x / d, lo, hi))) ** 2).sum(-1, keepdim=True)

        side = torch.where(err(-ALPHA_EPS) < err(ALPHA_EPS), -ALPHA_EPS, ALPHA_EPS)
        best_d = torch.where(small, side, best_d)
    return clamp_alpha(torch.where(amax > 0, best_d, torch.full_like(best_d, ALPHA_EPS)))


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
            "nl4": 0.0,
        }.get(self.grid, 0.0)  # K grids: the level is the code minus KFormat.offset (winq.kquant)

    @property
    def scale_factor(self) -> float:
        """Deployment scale s = scale_factor * alpha."""
        return {"lsq": 1.0, "seq": 0.5, "ternary": 2.0 / 3.0, "binary": 2.0, "affine": 1.0}.get(self.grid, 1.0)

    @property
    def kquant(self) -> KFormat | None:
        """The KFormat of a K grid (q2_k .. q6_k; its quantizer is winq.kquant), else None."""
        return KFORMATS.get(self.grid)

    @property
    def uniform(self) -> bool:
        """Is the weight one scale per group times level q - z (every grid but nl4, whose levels are IQ4_NL's
        table, and the K grids, whose scales are two-level and whose mins are not integer zeros)?"""
        return self.grid != "nl4" and self.grid not in KGRID_SUB

    @property
    def level_table(self) -> tuple[int, ...] | None:
        """The level of each code for a non-uniform grid (nl4: NL4_LEVELS); None where level = q - z."""
        return NL4_LEVELS if self.grid == "nl4" else None

    @property
    def asymmetric(self) -> bool:
        """Fixed levels that are not symmetric about 0 (lsq: -8..7; nl4: -127..113), so the mirror image of the
        lattice (a negative scale) is a different lattice."""
        return self.grid in ("lsq", "nl4", "q3_k", "q6_k")

    @property
    def step_scale(self) -> float:
        """The distance between neighbouring levels in units of alpha (nl4: the mean distance, 16)."""
        return NL4_STEP if self.grid == "nl4" else self.scale_factor

    @property
    def n_codes(self) -> int:
        """How many distinct codes the grid uses (ternary uses 3 of its 4)."""
        return 3 if self.grid == "ternary" else 2**self.bits

    def init_alpha(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        """Initial alpha per group from the weights w (..., g) -> (..., 1), as the WinQ reference does; nl4 runs
        llama.cpp's IQ4_NL scale search (`nl4_search_alpha`, weighted by `importance` when given: per-weight
        importances broadcastable to w, e.g. mean squared inputs per column). The other grids' inits are the
        reference's closed forms and do not use `importance`."""
        if self.grid == "nl4":
            return nl4_search_alpha(w, importance)
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
        if self.grid == "nl4":  # clamp first: clipped weights get no gradient, alpha the clipped level
            return nl4_round_ste(torch.clamp(x, float(NL4_LEVELS[0]), float(NL4_LEVELS[-1])))
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
            "nl4": (float(NL4_LEVELS[0]), float(NL4_LEVELS[-1]), 1.0, 1),  # the levels are integers -127..113
        }[self.grid]

    def level_value(self, x: torch.Tensor) -> torch.Tensor:
        """The level at x = W / alpha without autograd, for the fixed-zero grids: `levels()`'s forward
        value bit for bit (same ops, same order). Used by the fused quantizer (winq.qlinear). For nl4 the
        level is in units of alpha (an IQ4_NL level, -127..113)."""
        lo, hi, _, _ = self.ste_clip
        if self.grid == "lsq":
            return torch.round(torch.clamp(x, lo, hi))
        if self.grid == "seq":
            return torch.round(torch.clamp(x, lo, hi) * 2.0 - 0.5) + 0.5
        if self.grid == "ternary":
            return torch.round(torch.clamp(x, lo, hi) * 1.5)
        if self.grid == "nl4":
            return nl4_round(torch.clamp(x, lo, hi))
        return 0.5 * torch.where(torch.clamp(x, lo, hi) >= 0, 1.0, -1.0).to(x.dtype)

    def step_coordinates(self, x: torch.Tensor, zero: torch.Tensor | None = None):
        """x = W / alpha in units of the grid's step: (u, lo, hi) with code index round(clamp(u, lo, hi)).

        One step (the distance between neighbouring levels, s in weight units) is 1 in u; the
        rounding boundaries sit at half-integers of u inside [lo, hi]. For affine, hi - lo is
        2^b - 1 and lo = -z per group (tensors; floats for the other grids). nl4's steps differ: u is piecewise
        linear, u = i at level i and linear in between (extended beyond the ends with the end steps), so its
        rounding boundaries (the midpoints) sit at half-integers of u as well and a step is the local one."""
        if self.grid == "lsq":
            return x, -(2.0 ** (self.bits - 1)), 2.0 ** (self.bits - 1) - 1.0
        if self.kquant is not None:  # x in units of the float sub-block scale; zero: mu / alpha (types with a min)
            lo, hi = self.kquant.code_range
            return (x + zero if zero is not None else x), float(lo), float(hi)
        if self.grid == "seq":
            return 2.0 * x - 0.5, -2.0, 1.0
        if self.grid == "ternary":
            return 1.5 * x, -1.0, 1.0
        if self.grid == "binary":
            return 0.5 * x + 0.5, 0.0, 1.0
        if self.grid == "nl4":
            lev, _, _ = _nl4_tables(x.device)
            seg = _nl4_segment(x)  # lev[seg] <= x < lev[seg + 1] inside the range
            left = lev[seg]
            return seg.to(torch.float32) + (x - left) / (lev[seg + 1] - left), 0.0, float(len(NL4_LEVELS) - 1)
        z = torch.clamp(torch.round(zero), 0, 2**self.bits - 1)
        return x, -z, 2**self.bits - 1 - z

    def codes(self, levels: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """The codes q (float32, integral) of exact levels (as `levels()` gives them) and zeros (`zero_value`):
        q = level + z, or for nl4 the index of the level in NL4_LEVELS."""
        if self.grid == "nl4":
            return nl4_index(levels).to(torch.float32)
        return levels + zero

    def code_values(self, codes: torch.Tensor) -> torch.Tensor:
        """float32 of what the codes stand for before the zero is subtracted: q itself, or for nl4 NL4_LEVELS[q]
        (QuantizedWeight.levels = code_values(codes) - zero)."""
        if self.grid == "nl4":
            return nl4_values(codes)
        return codes.to(torch.float32)

    def zero_value(self, zero: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """The exact zero point z (float32) with the shape of `like` (..., 1)."""
        if self.grid == "affine":
            return torch.clamp(torch.round(zero.detach()), 0, 2**self.bits - 1).to(torch.float32)
        return torch.full_like(like, self.fixed_zero, dtype=torch.float32)
