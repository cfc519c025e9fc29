"""Hessian spectrum of the training loss w.r.t. the latent weights of the quantized layers.

The WinQ analysis: QAT weights settle in flat regions around saddle points (many Hessian
eigenvalues near zero, both signs present, magnitudes shrinking over training), and the
periodic reset raises the magnitudes again. This module measures that.

Everything is built on one primitive, the Hessian-vector product (HVP) of a scalar loss
L(theta) for a list of parameters theta (Pearlmutter's trick, double backward):

    g = dL/dtheta (create_graph=True),   H v = d(g . v)/dtheta

For a model the loss is the mean LM loss over a fixed list of batches, one graph per batch
at a time (memory: one batch's double-backward graph, about 4x the model), in eval mode
(no WinQ noise, no dropout), for the `weight` latents of the QuantLinear layers only (alpha
and zero points excluded). Straight-through rounding (winq.grids) has an identity backward
built from differentiable ops, so the double backward runs through it (the fused
scaled-dot-product attention kernels have no double backward, so the HVP forward runs under
sdpa_kernel(MATH): same math, a little slower): the Hessian is that
of the STE surrogate (rounding's own second derivative is zero; clipped weights have zero
rows and columns).

Estimators, all driven by Lanczos with full re-orthogonalisation (the tridiagonal in float64):

* extremes: the top-k Ritz values at both ends (largest positive, most negative) of a
  Lanczos run of `steps` iterations from the first probe; `top_residual` / `bottom_residual`
  are the Ritz residual norms |beta_m s_mj|, a bound on the distance to a true eigenvalue;
* density: stochastic Lanczos quadrature (SLQ, Ubaru et al. 2017; PyHessian): for each
  Rademacher probe v the Ritz values theta_j with weights tau_j^2 (first component of the
  tridiagonal's eigenvectors) are a Gauss quadrature of the spectral measure; averaged over
  probes and smoothed with a Gaussian of width sigma = sigma_frac * (lambda_max - lambda_min);
* shares: the quadrature mass with |theta| <= eps (near zero), theta > eps (positive),
  theta < -eps (negative); eps = eps_rel * max|lambda| (default eps_rel = 1e-2: with 16-32
  Lanczos nodes per probe a tighter band rarely holds a node, so 1e-3 reads as 0);
* trace: Hutchinson, tr H ~ mean_v v^T H v over the Rademacher probes. It is free: for the
  SLQ probes v^T H v = |v|^2 alpha_1 exactly, so no extra HVP is spent.

Cost: `probes * steps` HVPs per summary (each = one forward and two backward passes per
batch). Memory: the Lanczos basis holds `steps` vectors of n floats (n = number of latent
weights: 106M for the default SmolLM2-135M, so 16 steps = 6.8 GB), plus the model and one
double-backward graph.

Measured (2-core shared CPU machine, torch 2.13, 1 thread, default model at lsq 4 bits, n =
106,168,320 latents, one batch of 1 x 128 PTB tokens): one HVP 7.3 s (the first, cold, 18 s;
a plain forward 0.6 s), peak RSS 7.3 GB for the HVP alone, 9.4 GB with a 3-step Lanczos basis;
a Lanczos step costs ~10 s (HVP + re-orthogonalisation over 106M floats). HVP time scales with
batches x tokens, so `winq hessian` defaults (4 batches, 8 probes x 16 steps = 128 HVPs) are
about 128 x 4 x 7.3 s = 1 h on one core and ~14 GB; `--batches 1 --probes 2 --steps 8`
(16 HVPs) takes ~3 min (estimates); measured end to end, `winq hessian --batches 1 --probes 1
--steps 2 --threads 1` on the default-model checkpoint: 47 s wall, 8.4 GB peak RSS.
Seeded: the probes come from torch.Generator(seed), so a summary is reproducible.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from .errors import ConfigError, ModelError

PARAM_SETS = ("all", "attention", "mlp")
ATTENTION_KEYS = ("self_attn", "attention", "attn")
MLP_KEYS = ("mlp", "feed_forward", "ffn")


# ---- the operator ---------------------------------------------------------------------------
class HessianOperator:
    """v -> H v for the mean of `loss_fns` (each a closure returning a scalar) w.r.t. `params`.

    Vectors are flat tensors of length n = sum of the parameters' numel, in the parameters'
    dtype and device. `hvps` counts products (one product evaluates every loss_fn once).
    """

    def __init__(
        self,
        loss_fns: Callable[[], torch.Tensor] | Sequence[Callable[[], torch.Tensor]],
        params: Sequence[torch.Tensor],
    ):
        self.loss_fns = [loss_fns] if callable(loss_fns) else list(loss_fns)
        self.params = list(params)
        if not self.loss_fns:
            raise ConfigError("HessianOperator needs at least one loss function (batch)")
        if not self.params:
            raise ConfigError("HessianOperator needs at least one parameter")
        if any(not p.requires_grad for p in self.params):
            raise ConfigError("every parameter of the Hessian must have requires_grad=True")
        self.n = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.hvps = 0

    def _split(self, v: torch.Tensor) -> list[torch.Tensor]:
        out, i = [], 0
        for p in self.params:
            out.append(v[i : i + p.numel()].view_as(p))
            i += p.numel()
        return out

    def loss(self) -> float:
        with torch.no_grad():
            return sum(float(fn()) for fn in self.loss_fns) / len(self.loss_fns)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        if v.shape != (self.n,):
            raise ConfigError(f"vector has shape {tuple(v.shape)}; the Hessian acts on ({self.n},)")
        vs = self._split(v.to(self.dtype))
        out = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        w = 1.0 / len(self.loss_fns)
        for fn in self.loss_fns:
            with torch.enable_grad():
                loss = fn() * w
                grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
                dot = sum((g * vi).sum() for g, vi in zip(grads, vs) if g is not None and g.requires_grad)
                if not torch.is_tensor(dot):  # the loss is (at most) linear in the parameters: H = 0
                    continue
                hv = torch.autograd.grad(dot, self.params, allow_unused=True)
            out += torch.cat(
                [(h if h is not None else torch.zeros_like(p)).reshape(-1) for h, p in zip(hv, self.params)]
            )
            del loss, grads, dot, hv
        self.hvps += 1
        return out

    __call__ = matvec


def rademacher(n: int, generator: torch.Generator, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """A vector of n independent +-1 entries drawn from `generator` (on the CPU, then moved)."""
    return (torch.randint(0, 2, (n,), generator=generator, dtype=torch.int8) * 2 - 1).to(dtype=dtype, device=device)


# ---- Lanczos ----------------------------------------------------------------------------------
@dataclass
class LanczosResult:
    ritz: torch.Tensor  # float64 (m,) eigenvalues of the tridiagonal, ascending
    weights: torch.Tensor  # float64 (m,) tau_j^2, sums to 1
    residuals: torch.Tensor  # float64 (m,) |beta_m s_mj|: Ritz residual norms
    vtHv: float  # v^T H v of the (unnormalised) start vector


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor, steps: int) -> LanczosResult:
    """`steps` Lanczos iterations from v0 with full re-orthogonalisation (classical Gram-Schmidt, twice).

    Stops early when the Krylov space is exhausted (then the Ritz values are exact eigenvalues).
    The basis is kept in v0's dtype: memory steps * n elements.
    """
    if steps < 1:
        raise ConfigError(f"steps={steps}: Lanczos needs at least 1 iteration")
    n = v0.numel()
    m = min(steps, n)
    V = torch.empty(m, n, dtype=v0.dtype, device=v0.device)  # (m, n) orthonormal basis
    norm0 = float(v0.norm())
    q = v0 / norm0
    alphas: list[float] = []
    betas: list[float] = []
    beta_last = 0.0
    tol = 100 * torch.finfo(v0.dtype).eps
    for j in range(m):
        V[j] = q
        w = matvec(q)
        scale = float(w.norm())
        a = float(torch.dot(w, q))
        alphas.append(a)
        basis = V[: j + 1]  # (j+1, n)
        for _ in range(2):  # "twice is enough" (Parlett)
            w = w - basis.T @ (basis @ w)
        b = float(w.norm())
        beta_last = b
        if j == m - 1 or b <= tol * max(scale, 1e-30):
            break
        betas.append(b)
        q = w / b
    k = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    evals, evecs = torch.linalg.eigh(T)
    weights = evecs[0] ** 2
    residuals = (beta_last * evecs[-1]).abs()
    return LanczosResult(ritz=evals, weights=weights / weights.sum(), residuals=residuals, vtHv=alphas[0] * norm0**2)


def hutchinson_trace(op: HessianOperator, probes: int = 8, seed: int = 0) -> tuple[float, float]:
    """(mean, standard error) of v^T H v over `probes` Rademacher vectors: `probes` HVPs."""
    gen = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(probes):
        v = rademacher(op.n, gen, op.dtype, op.device)
        vals.append(float(torch.dot(v, op.matvec(v))))
    t = torch.tensor(vals, dtype=torch.float64)
    return float(t.mean()), float(t.std() / math.sqrt(probes)) if probes > 1 else float("nan")


# ---- the summary ------------------------------------------------------------------------------
@dataclass
class HessianSummary:
    """What `spectrum()` measured. Eigenvalue lists: `top` descending, `bottom` ascending (most negative first)."""

    n_params: int
    top: list[float]
    bottom: list[float]
    top_residual: list[float]
    bottom_residual: list[float]
    trace: float
    trace_stderr: float
    near_zero: float  # share of spectral mass with |lambda| <= eps
    positive_mass: float  # share with lambda > eps
    negative_mass: float  # share with lambda < -eps
    eps: float
    eps_rel: float
    sigma: float
    grid: list[float] = field(repr=False)
    density: list[float] = field(repr=False)
    probes: int = 0
    steps: int = 0
    hvps: int = 0
    seconds: float = 0.0
    seed: int = 0
    loss: float | None = None
    params: str = ""

    @property
    def lambda_max(self) -> float:
        return self.top[0]

    @property
    def lambda_min(self) -> float:
        return self.bottom[0]

    def to_dict(self, density: bool = True) -> dict:
        d = asdict(self)
        if not density:
            d.pop("grid")
            d.pop("density")
        return d

    def brief(self) -> dict:
        """The few numbers logged per training step."""
        r = lambda x: float(f"{x:.6g}")  # noqa: E731
        return {
            "lambda_max": r(self.top[0]),
            "lambda_min": r(self.bottom[0]),
            "trace": r(self.trace),
            "near_zero": r(self.near_zero),
            "positive_mass": r(self.positive_mass),
            "negative_mass": r(self.negative_mass),
            "hvps": self.hvps,
            "seconds": round(self.seconds, 2),
        }


def slq_density(results: Sequence[LanczosResult], sigma: float, grid: torch.Tensor) -> torch.Tensor:
    """Gaussian-smoothed SLQ density on `grid` (float64), averaged over probes; integrates to ~1."""
    dens = torch.zeros_like(grid, dtype=torch.float64)
    for r in results:
        z = (grid[:, None] - r.ritz[None, :]) / sigma  # (G, m)
        dens += (r.weights[None, :] * torch.exp(-0.5 * z**2)).sum(1) / (sigma * math.sqrt(2 * math.pi))
    return dens / len(results)


def spectrum(
    op: HessianOperator,
    top_k: int = 8,
    probes: int = 8,
    steps: int = 32,
    seed: int = 0,
    eps_rel: float = 1e-2,
    sigma_frac: float = 0.01,
    grid_points: int = 512,
    params: str = "",
) -> HessianSummary:
    """Extremes, SLQ density, near-zero / positive / negative shares and Hutchinson trace: probes * steps HVPs."""
    for name, v in (("top_k", top_k), ("probes", probes), ("steps", steps), ("grid_points", grid_points)):
        if v < 1:
            raise ConfigError(f"{name}={v}: must be at least 1")
    if not (eps_rel >= 0 and sigma_frac > 0):
        raise ConfigError(f"eps_rel={eps_rel} must be >= 0 and sigma_frac={sigma_frac} > 0")
    t0 = time.time()
    h0 = op.hvps
    gen = torch.Generator().manual_seed(seed)
    runs = [lanczos(op.matvec, rademacher(op.n, gen, op.dtype, op.device), steps) for _ in range(probes)]
    first = runs[0]
    k = min(top_k, first.ritz.numel())
    top = first.ritz.flip(0)[:k]
    top_res = first.residuals.flip(0)[:k]
    bottom, bottom_res = first.ritz[:k], first.residuals[:k]
    lo = min(float(r.ritz.min()) for r in runs)
    hi = max(float(r.ritz.max()) for r in runs)
    span = max(hi - lo, abs(hi), abs(lo), 1e-30)
    sigma = sigma_frac * span
    grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, grid_points, dtype=torch.float64)
    dens = slq_density(runs, sigma, grid)
    eps = eps_rel * max(abs(hi), abs(lo))
    near = sum(float(r.weights[r.ritz.abs() <= eps].sum()) for r in runs) / probes
    pos = sum(float(r.weights[r.ritz > eps].sum()) for r in runs) / probes
    neg = sum(float(r.weights[r.ritz < -eps].sum()) for r in runs) / probes
    tr = torch.tensor([r.vtHv for r in runs], dtype=torch.float64)
    return HessianSummary(
        n_params=op.n,
        top=top.tolist(),
        bottom=bottom.tolist(),
        top_residual=top_res.tolist(),
        bottom_residual=bottom_res.tolist(),
        trace=float(tr.mean()),
        trace_stderr=float(tr.std() / math.sqrt(probes)) if probes > 1 else float("nan"),
        near_zero=near,
        positive_mass=pos,
        negative_mass=neg,
        eps=eps,
        eps_rel=eps_rel,
        sigma=sigma,
        grid=grid.tolist(),
        density=dens.tolist(),
        probes=probes,
        steps=steps,
        hvps=op.hvps - h0,
        seconds=time.time() - t0,
        seed=seed,
        params=params,
    )


# ---- models -----------------------------------------------------------------------------------
def hessian_params(model, params: str = "all") -> dict[str, torch.nn.Parameter]:
    """{name: latent weight} of the QuantLinear layers in `params`: all | attention | mlp."""
    from .prepare import quant_layers

    if params not in PARAM_SETS:
        raise ConfigError(f"unknown parameter set {params!r}: choose one of {', '.join(PARAM_SETS)}")
    layers = quant_layers(model)
    if not layers:
        raise ModelError(
            "model has no quantized layers: the Hessian is taken w.r.t. QuantLinear latent weights; "
            "call winq.prepare first"
        )
    keys = {"attention": ATTENTION_KEYS, "mlp": MLP_KEYS}.get(params)
    out = {}
    for n, m in layers.items():
        parts = n.split(".")
        if keys is None or any(k in parts for k in keys):
            out[f"{n}.weight"] = m.weight
    if not out:
        raise ModelError(
            f"no quantized layer matches {params!r} (module names containing one of {', '.join(keys)}); "
            f"e.g. {next(iter(layers))}"
        )
    return out


def model_hessian(model, batches: Sequence[torch.Tensor], params: str = "all") -> HessianOperator:
    """HVP operator of the mean LM loss over `batches` ((B, T + 1) id blocks) w.r.t. QuantLinear latents.

    The model is put in eval mode (no WinQ noise, no dropout); the caller restores train mode.
    Parameters outside the set keep requires_grad but receive no gradient here.
    """
    from .evaluate import lm_loss

    if not batches:
        raise ConfigError("model_hessian needs at least one batch")
    model.eval()
    ps = list(hessian_params(model, params).values())
    for p in ps:
        p.requires_grad_(True)

    def loss_of(b):
        # the fused CPU/CUDA attention kernels have no double backward: use the math kernel
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return lm_loss(model, b)

    fns = [lambda b=b: loss_of(b) for b in batches]
    return HessianOperator(fns, ps)


def model_spectrum(model, batches: Sequence[torch.Tensor], params: str = "all", **kw) -> HessianSummary:
    """`spectrum()` of the model's loss over `batches`; restores the model's train/eval mode."""
    was = model.training
    try:
        op = model_hessian(model, batches, params)
        s = spectrum(op, params=params, **kw)
        s.loss = op.loss()
        return s
    finally:
        model.train(was)


def basis_bytes(n: int, steps: int, dtype=torch.float32) -> int:
    """Bytes of the Lanczos basis for n parameters (the dominant memory term beyond the model)."""
    return n * min(steps, n) * torch.tensor([], dtype=dtype).element_size()


# ---- output -----------------------------------------------------------------------------------
def plot_density(summaries: dict[str, HessianSummary], path, title: str = "Hessian spectral density (SLQ)") -> None:
    """Log-scale density of each summary on one figure, written atomically to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, s in summaries.items():
        d = torch.tensor(s.density).clamp(min=1e-12)
        ax.semilogy(s.grid, d.tolist(), label=f"{label} (near0 {s.near_zero:.2f}, neg {s.negative_mass:.2f})")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from .fsutil import atomic_file

    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def fixed_batches(ids: torch.Tensor, n_batches: int, batch_size: int, seq_len: int) -> list[torch.Tensor]:
    """The first n_batches * batch_size blocks of seq_len + 1 tokens of an id stream: fixed (B, T + 1) batches."""
    from .data import PackedBlocks

    blocks = PackedBlocks(ids, seq_len)
    need = n_batches * batch_size
    if len(blocks) < need:
        raise ConfigError(
            f"{n_batches} batches x {batch_size} x {seq_len} tokens need {need} blocks; the data has {len(blocks)}: "
            "lower --batches or --seq-len"
        )
    return [blocks.batch(range(i * batch_size, (i + 1) * batch_size)) for i in range(n_batches)]  # each (B, T + 1)


def checkpoint_spectrum(
    checkpoint,
    data: str = "ptb",
    split: str = "train",
    batches: int = 4,
    batch_size: int = 1,
    seq_len: int = 128,
    by_type: bool = False,
    **kw,
) -> tuple[dict[str, HessianSummary], dict]:
    """({"all": summary, ["attention": ..., "mlp": ...]}, info) for a winq checkpoint folder."""
    from .checkpoint import load_checkpoint
    from .data import token_ids

    model, tok, info = load_checkpoint(checkpoint)
    model.config.use_cache = False
    bs = fixed_batches(token_ids(data, split, tok), batches, batch_size, seq_len)
    out = {}
    for params in ("all", "attention", "mlp") if by_type else ("all",):
        out[params] = model_spectrum(model, bs, params, **kw)
    meta = {
        "checkpoint": str(checkpoint),
        "data": data,
        "split": split,
        "batches": batches,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "quant": info.get("quant"),
        "step": info.get("step"),
        "method": info.get("train", {}).get("method"),
        "threads": torch.get_num_threads(),
    }
    return out, meta


def write_json(obj, path) -> None:
    """JSON written to a temporary name and renamed when complete."""
    import json

    from .fsutil import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))
