"""The step-0 quantizer: calibration statistics, an error-minimising scale search, GPTQ.

QAT on a short budget keeps most of the codes it starts from, so the start decides much of the
result. The WinQ reference starts from alpha = max|W| / (2^(b-1) - 1) per row or group, which is
worse than the target format's own rounding (llama.cpp's Q4_0 maps the group's largest value to
-8 instead of 7) and far worse than a calibrated post-training quantizer. `initialize()` gives
QuantLinear layers one of three starts (QuantConfig.init):

    max     the reference: alpha from the group's largest magnitude (GridSpec.init_alpha)
    search  per group, the alpha among `COARSE_FACTORS` (then `FINE_STEPS` around the best) x the max rule
            that minimises
                sum_j h_j (W_j - Q(W)_j)^2,
            with h_j the mean squared input of column j over calibration batches (an importance
            vector, the diagonal that llama.cpp's imatrix holds), or h = 1 without calibration.
            Each candidate is rounded to float16 first, so the error scored is the deployed one.
            With positive scales only, the asymmetric lsq levels (-8 .. 7) could use the extra level
            on one side alone; the search picks, per group, between the lattice and its mirror
            image by giving alpha a sign: s(q - z) with s < 0 is the same lattice reflected
            (Q4_0's signed-max rule does the same with a negative d).
    gptq    search's scales, then GPTQ (Frantar et al. 2022, arXiv 2210.17323): the columns are
            quantized in order, each one's rounding error spread over the columns not yet
            quantized through the Cholesky factor of the inverse of H = X^T X (the layer's
            calibration inputs, damped by `DAMP` x mean diag). The latent weight of a column is set
            to the value it was rounded from, so training starts exactly at GPTQ's codes and the
            latent keeps its distance to the rounding boundaries.

Statistics come from one pass of the float model over calibration blocks (`collect_hessians`):
forward pre-hooks accumulate X^T X per quantized Linear, once per distinct input (q/k/v, and
gate/up, read the same tensor: one accumulator each), summed in float64.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from .config import MIN_CALIB_TOKENS, check_init
from .errors import ConfigError, DataError
from . import kquant
from .grids import clamp_alpha

# alpha candidates as multiples of the max rule: a coarse pass (1.0, the reference, is among them), then a fine
# pass around each group's best; 0.49 .. 1.15 in 0.01 steps in effect, at a third of the evaluations
COARSE_FACTORS = tuple(round(0.52 + 0.04 * i, 2) for i in range(16))  # 0.52 .. 1.12, 1.0 among them
FINE_STEPS = (-0.03, -0.02, -0.01, 0.01, 0.02, 0.03)
DAMP = 0.01  # GPTQ's dampening: H + DAMP * mean(diag H) * I
BLOCK = 128  # GPTQ's lazy-update block of columns


def calibration_batches(ids: torch.Tensor, tokens: int, seed: int, seq_len: int = 512,
                        batch_size: int = 4) -> list[torch.Tensor]:
    """Blocks of ids (B, seq_len) drawn without replacement from one id stream: `tokens` in all, or the whole
    stream when it is shorter; DataError when it holds fewer than MIN_CALIB_TOKENS."""
    from .data import PackedBlocks

    n_ids = int(ids.numel())
    if n_ids < MIN_CALIB_TOKENS + 1:
        raise DataError(f"calibration data has {n_ids} tokens: the step-0 quantizer needs at least "
                        f"{MIN_CALIB_TOKENS}; use more text (--calib-data) or --init max")
    tokens = min(tokens, n_ids - 1)
    seq_len = min(seq_len, tokens)
    blocks = PackedBlocks(ids, seq_len)
    n = min(len(blocks), math.ceil(tokens / seq_len))
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))[:n]
    return [blocks.batch(order[i : i + batch_size])[:, :-1] for i in range(0, n, batch_size)]


class _Accumulator:
    """X^T X (float64, in x in), or only its diagonal, and the token count of one distinct layer input."""

    def __init__(self, n: int, device, diag: bool):
        self.diag = diag
        self.h = torch.zeros(n if diag else (n, n), dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).float()  # (N, in)
        if self.diag:
            self.h += (x2 * x2).sum(0).to(torch.float64)
        else:
            self.h += (x2.t() @ x2).to(torch.float64)  # float32 products (fast), float64 sums over batches
        self.tokens += x2.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.h / max(1, self.tokens)


@torch.no_grad()
def collect_hessians(model: nn.Module, names: list[str], batches: list[torch.Tensor],
                     diag: bool = False) -> dict[str, torch.Tensor]:
    """{module name: E[x x^T] (float64, in x in)} of the inputs of the modules `names` over `batches` ((B, T)
    id tensors), one forward each; diag=True keeps only the diagonal E[x^2] (in,) (what init 'search' needs)."""
    if not batches:
        raise DataError("calibration needs at least one batch")
    mods = {n: model.get_submodule(n) for n in names}
    acc: dict[str, _Accumulator] = {}
    alias: dict[str, str] = {}  # module -> the module whose accumulator holds its (shared) input
    last = {"name": None, "x": None}  # the previous hook call: a held reference, so equal pointers mean one tensor

    def hook(name):
        def fn(_mod, args):
            x = args[0]
            if name in alias:
                if alias[name] != name:
                    last.update(name=name, x=x)
                    return
            elif last["x"] is not None and last["x"] is x:
                alias[name] = alias[last["name"]]
                last.update(name=name, x=x)
                return
            else:
                alias[name] = name
            if name not in acc:
                acc[name] = _Accumulator(x.shape[-1], x.device, diag)
            acc[name].add(x)
            last.update(name=name, x=x)

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in mods.items()]
    was = model.training
    model.eval()
    try:
        prefix = getattr(model, "base_model_prefix", "")
        inside = prefix and hasattr(model, prefix) and all(n.startswith(prefix + ".") for n in names)
        body = getattr(model, prefix) if inside else model  # the decoder alone when the head is not calibrated
        for b in batches:
            body(input_ids=b)
            last.update(name=None, x=None)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    missing = [n for n in names if n not in alias]
    if missing:
        raise ConfigError(f"calibration forward never reached {missing[0]} ({len(missing)} layers)")
    means = {k: a.mean for k, a in acc.items()}  # one tensor per distinct input, shared by its readers
    return {n: means[alias[n]] for n in names}


# ---- quantize-dequantize with the layer's own grid ---------------------------------------------

def qdq(layer, w: torch.Tensor, alpha: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
    """The fake-quant value of w (..., g) under alpha (..., 1) (and zero), exactly as the layer's forward
    computes it: fp16(deploy scale) * level(w / alpha)."""
    a = clamp_alpha(alpha)
    lev = layer.spec.levels(w, a, zero)
    s = (a * layer.spec.scale_factor).to(torch.float16).to(torch.float32)
    return s * lev


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


@torch.no_grad()
def search_alpha(layer, w: torch.Tensor, h: torch.Tensor | None, signed: bool = True) -> torch.Tensor:
    """alpha (out, G) minimising sum h (w - qdq)^2 per group, for the grouped weights w (out, G, g) and
    importances h (in,) or None: a coarse pass over COARSE_FACTORS x the max rule (and, for asymmetric grids and
    signed=True, their mirror images), then a fine pass of FINE_STEPS around each group's best; the max rule
    itself (factor 1) is always a candidate, so the result is never worse than it."""
    spec = layer.spec
    base = spec.init_alpha(w)  # (out, G, 1)
    hw = torch.ones_like(w[:1]) if h is None else h.to(w.dtype).reshape(1, w.shape[1], w.shape[2])  # (1, G, g)
    signs = (1.0, -1.0) if signed and spec.asymmetric else (1.0,)
    best_err = torch.full(w.shape[:2], math.inf, dtype=torch.float32, device=w.device)
    best = base[..., 0].clone()

    def score(a: torch.Tensor) -> None:  # a (out, G, 1) or broadcastable
        nonlocal best_err, best
        a = _fp16(a.expand_as(base))
        zero = spec.init_zero(w, a.abs()) if spec.grid == "affine" else None
        err = (hw * (w - qdq(layer, w, a, zero)).square_()).sum(-1)  # (out, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, a[..., 0], best)

    for sign in signs:
        for f in COARSE_FACTORS:
            score(sign * base * f)
    ratio = (best / base[..., 0])[..., None]  # the winning signed factor per group
    for d in FINE_STEPS:
        score(base * (ratio + d * torch.sign(ratio)))
    return best


@torch.no_grad()
def gptq_weights(layer, H: torch.Tensor, alpha: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """GPTQ with the scales fixed: the latent weights (out, in) whose rounding gives GPTQ's codes."""
    W = layer.weight.detach().to(torch.float64).clone()  # (out, in)
    n = W.shape[1]
    g = layer.group_size
    H = H.to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(DAMP * torch.diag(H).mean())
    try:
        L = torch.linalg.cholesky(H)
        U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # Hinv = U^T U
    except torch.linalg.LinAlgError:
        raise ConfigError("GPTQ: the calibration Hessian is not positive definite even after dampening; "
                          "use more calibration tokens or --init search") from None
    spec = layer.spec
    # columns as contiguous rows: Wt (in, out), the scales per group (G, out)
    Wt = W.t().contiguous().float()  # float32 updates, as GPTQ's reference (the inverse is taken in float64)
    U = U.float()
    latent = torch.empty_like(Wt)
    fmt = spec.kquant
    if fmt is not None:  # K grids: the sub-block scale S and min M as the forward rounds them (winq.kquant)
        S, M, _ = kquant.sub_scales(alpha.to(torch.float32), zero.to(torch.float32) if zero is not None else None,
                                    fmt, ste=False)
        St, Mt = S.t().contiguous(), M.t().contiguous()  # (G, out)
    else:
        At = clamp_alpha(alpha.to(torch.float32)).t().contiguous()  # (G, out): x = W / A, in float32 as the layer
        St = _fp16(At * spec.scale_factor)  # (G, out): the deployed scale
        Zt = torch.clamp(torch.round(zero.t().to(torch.float32)), 0, 2**spec.bits - 1) if zero is not None else None
    hi = 2**spec.bits - 1

    def value(w, gi):  # the forward's fake-quant value of one column, on float32 values as the layer computes it
        if fmt is not None:
            return St[gi] * kquant.levels(w, St[gi], Mt[gi], fmt, ste=False) - Mt[gi]
        x = w / At[gi]
        if Zt is None:
            return St[gi] * spec.level_value(x)
        z = Zt[gi]
        return St[gi] * torch.minimum(torch.maximum(torch.round(x), -z), hi - z)

    for i1 in range(0, n, BLOCK):
        i2 = min(n, i1 + BLOCK)
        W1 = Wt[i1:i2].clone()  # (b, out)
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            gi = (i1 + i) // g
            w = W1[i]
            latent[i1 + i] = w
            e = (w - value(w, gi)) / U1[i, i]
            W1[i:].addr_(U1[i, i:], e, alpha=-1.0)
            E1[i] = e
        Wt[i2:] -= U[i1:i2, i2:].t() @ E1
    latent = latent.t()
    return latent.to(torch.float32)


def _kq_error(m, w, hw, alpha, mu) -> float:
    return float((hw * (w - kquant.kq_weight(w, alpha, mu, m.spec.kquant, ste=False)) ** 2).sum())


@torch.no_grad()
def _init_kq(m, w, h, H) -> tuple[float, float]:
    """A K-grid layer's start: the weighted sub-block search (winq.kquant.search), then GPTQ with the rounded
    sub-block scales when H is given; returns (its weighted error, the unweighted search's) before GPTQ."""
    fmt = m.spec.kquant
    hw = torch.ones_like(w[:1]) if h is None else h.reshape(1, w.shape[1], w.shape[2])
    alpha, mu = kquant.search(w, hw, fmt)
    base_a, base_mu = kquant.search(w, None, fmt)
    num, den = _kq_error(m, w, hw, alpha, mu), _kq_error(m, w, hw, base_a, base_mu)
    m.alpha.copy_(alpha)
    if mu is not None:
        m.zero_point.copy_(mu)
    if H is not None:
        m.weight.copy_(gptq_weights(m, H, alpha, mu))
    return num, den


@torch.no_grad()
def initialize(model: nn.Module, init: str, hessians: dict[str, torch.Tensor] | None = None,
               progress: bool = False) -> dict:
    """Set alpha (and zero, and for gptq the latent weights) of every QuantLinear of a prepared model;
    returns a summary {init, layers, seconds, weighted_mse_ratio} (the search's error over the max rule's)."""
    from .prepare import quant_layers

    check_init(init)
    layers = quant_layers(model)
    t0 = time.time()
    if init == "max":
        return {"init": init, "layers": len(layers), "seconds": 0.0}
    if init == "gptq" and (hessians is None or any(h.dim() != 2 for h in hessians.values())):
        raise ConfigError("init='gptq' needs full calibration Hessians (collect_hessians(..., diag=False))")
    it = layers.items()
    if progress:
        from rich.progress import track

        it = track(list(it), description=f"step-0 quantizer ({init})", transient=True)
    num = den = 0.0
    for name, m in it:
        H = hessians.get(name) if hessians is not None else None
        h = (H if H.dim() == 1 else torch.diag(H)).to(torch.float32) if H is not None else None
        w = m._grouped(m.weight.detach().float())  # (out, G, g)
        if not torch.isfinite(w).all():
            raise ConfigError(f"{name}.weight contains NaN or Inf; cannot initialise quantization scales")
        if m.spec.kquant is not None:
            n, d = _init_kq(m, w, h, H if init == "gptq" else None)
            num, den = num + n, den + d
            continue
        alpha = search_alpha(m, w, h)  # (out, G)
        zero = None
        if m.spec.grid == "affine":
            zero = m.spec.init_zero(w, alpha.abs()[..., None])[..., 0]
        hw = torch.ones_like(w[:1]) if h is None else h.reshape(1, w.shape[1], w.shape[2])
        base = m.spec.init_alpha(w)
        zb = m.spec.init_zero(w, base) if m.spec.grid == "affine" else None
        den += float((hw * (w - qdq(m, w, base, zb)) ** 2).sum())
        num += float((hw * (w - qdq(m, w, alpha[..., None], zero[..., None] if zero is not None else None)) ** 2).sum())
        m.alpha.copy_(alpha)
        if m.zero_point is not None:
            m.zero_point.copy_(zero)
        if init == "gptq":
            m.weight.copy_(gptq_weights(m, H, alpha, zero))
    return {"init": init, "layers": len(layers), "seconds": round(time.time() - t0, 2),
            "weighted_mse_ratio": round(num / den, 4) if den else None}
