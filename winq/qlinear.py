"""QuantLinear: an nn.Linear whose weight goes through a learned fake-quantizer.

Parameters (saved in checkpoints under the layer's name):
    weight      float32 (out, in)  the latent full-precision weight W (trained)
    alpha       float32 (out, G)   the learned scale per row (G = 1) or per group
    zero_point  float32 (out, G)   affine grid: learned zero, rounded (STE) in the forward; K grids with a min
                                   (q2_k, q4_k, q5_k): the float min magnitude mu (winq.kquant)
    bias        as in the original layer (never quantized)

Forward: W_q = half_ste(s(alpha)) * level(W / alpha) with straight-through rounding, so
W_q equals `quantized_weight().dequantize()` bit for bit when no noise is applied.
WinQ noise (training only): W + sigma * eps_w and alpha + sigma' * eps_a (sigma' = scale_noise_sigma: sigma in
units of a level step), with eps from the
model's NoiseSource (winq.noise), refilled at every training forward (reproducible, resumable).
`act_quant` (None, or a winq.actplan.ActQuant): a runtime's activation quantizer applied to the input
before either path below, straight-through while training with gradients (winq.actplan installs them).

Two forward paths compute the same W_q bit for bit:
* training with gradients, fixed-zero grids (lsq, seq, ternary, binary, nl4): one autograd Function
  (`_FakeQuantLinear`) that saves only the input, W and alpha and recomputes the quantizer in
  its backward. Autograd over the composite expression would keep W + noise, W / alpha, the
  clamped and rounded copies and W_q itself for the backward (about 20 bytes per weight: the
  default model's training step peaked at 5.5 GB without noise against 3.1 GB for plain fp32
  fine-tuning); the fused layer keeps none of them.
* training with gradients, K grids (q2_k .. q6_k): the sub-block scales and mins, one value per 16 or 32 weights,
  through autograd (winq.kquant.sub_scales: rounded per super-block as the file stores them), the per-weight part
  in one autograd Function (`_KQuantLinear`, the same saving).
* everything else (eval, no_grad, the affine grid, second derivatives for winq.hessian): the composite expression
  with straight-through rounding in `fake_weight()` (K grids: winq.kquant.kq_weight).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, ModelError
from . import kquant
from .grids import ALPHA_EPS, GridSpec, clamp_alpha, check_group, half_ste
from .qweight import QuantizedWeight


class QuantLinear(nn.Linear):
    def __init__(
        self, in_features, out_features, bias=True, *, grid="lsq", bits=4, group_size=-1, device=None, dtype=None
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.spec = GridSpec(grid, bits)
        check_group(grid, group_size, in_features)  # nl4: groups of 32 only
        g = in_features if group_size == -1 else group_size
        if in_features % g:
            raise ConfigError(f"group_size={group_size} does not divide in_features={in_features}")
        self.group_size = g
        n_groups = in_features // g
        self.alpha = nn.Parameter(torch.ones(out_features, n_groups, device=device, dtype=torch.float32))
        fmt = self.spec.kquant
        if fmt is not None and in_features % kquant.SUPER:
            raise ConfigError(f"grid {grid!r} stores super-blocks of {kquant.SUPER} weights, but rows have "
                              f"{in_features}: llama.cpp uses {fmt.fallback[0]} {fmt.fallback[1]}-bit for such rows "
                              "(winq.recipes picks it per layer)")
        if grid == "affine" or (fmt is not None and fmt.has_min):
            self.zero_point = nn.Parameter(torch.zeros(out_features, n_groups, device=device, dtype=torch.float32))
        else:
            self.register_parameter("zero_point", None)
        # set by winq.train during training (winq.noise.NoiseSource); off for eval and export
        self.noise_sigma = 0.0
        self.noise = None  # the NoiseSource whose buffer eps_w / eps_a view
        self.eps_w: torch.Tensor | None = None  # (out, in) standard-normal draws of the current forward
        self.eps_a: torch.Tensor | None = None  # (out, G)
        # runtime activation emulation (winq.actplan.ActQuant or any callable(x, ste=bool) -> x): applied to the
        # input of both forward paths, straight-through while training with gradients; None: float inputs
        self.act_quant = None

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls, linear: nn.Linear, grid: str, bits: int, group_size: int = -1, init: bool = True
    ) -> "QuantLinear":
        """Wrap an existing nn.Linear (weights copied to float32); init=True sets alpha (and zero) from W."""
        q = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            grid=grid,
            bits=bits,
            group_size=group_size,
            device=linear.weight.device,
            dtype=torch.float32,
        )
        with torch.no_grad():
            q.weight.copy_(linear.weight.float())
            if linear.bias is not None:
                q.bias.copy_(linear.bias.float())
        if init:
            q.init_scales()
        return q

    @torch.no_grad()
    def init_scales(self) -> None:
        """alpha (and the affine zero) from the current latent weights (ARCHITECTURE §3)."""
        w = self._grouped(self.weight.float())  # (out, G, g)
        if not torch.isfinite(w).all():
            raise ModelError("weight contains NaN or Inf; cannot initialise quantization scales")
        if self.spec.kquant is not None:
            alpha, mu = kquant.search(w, None, self.spec.kquant)
            self.alpha.copy_(alpha)
            if mu is not None:
                self.zero_point.copy_(mu)
            return
        alpha = self.spec.init_alpha(w)  # (out, G, 1)
        self.alpha.copy_(alpha[..., 0])
        if self.zero_point is not None:
            self.zero_point.copy_(self.spec.init_zero(w, alpha)[..., 0])

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the fake-quant weight (float32)."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.weight.device)
        with torch.no_grad():
            lin.weight.copy_(self.fake_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    # ---- the quantizer ------------------------------------------------------------------
    def _grouped(self, w: torch.Tensor) -> torch.Tensor:
        return w.reshape(self.out_features, self.in_features // self.group_size, self.group_size)  # (out, G, g)

    def deploy_scale(self, alpha: torch.Tensor) -> torch.Tensor:
        """Deployment scale s (float32, before fp16 rounding) from alpha; the same expression for forward and export."""
        return clamp_alpha(alpha) * self.spec.scale_factor

    def _noisy(self) -> bool:
        """True when this forward adds WinQ noise; then waits until the layer's share of the draw is filled."""
        if self.noise_sigma > 0 and self.eps_w is not None:
            if self.noise is not None:
                self.noise.ready(self)
            return True
        return False

    @property
    def scale_noise_sigma(self) -> float:
        """The scale's noise, in units of a level step like the weights' (sigma * scale_factor / step_scale): the
        reference's sigma 1e-3 is on an LSQ scale, which is one level step; nl4's alpha is a sixteenth of one, so
        its noise is a sixteenth (unscaled, sigma 1e-3 was 28% of the median nl4 scale of the default model)."""
        return self.noise_sigma * self.spec.scale_factor / self.spec.step_scale

    def fake_weight(self, noise: bool = False) -> torch.Tensor:
        """The fake-quant weight W_q, float32 (out, in). noise=True adds WinQ's training noise (the current draw)."""
        w = self.weight.float()
        alpha = self.alpha
        if noise and self._noisy():
            w = torch.add(w, self.eps_w, alpha=self.noise_sigma)  # one pass: W + sigma * eps
            alpha = torch.add(alpha, self.eps_a, alpha=self.scale_noise_sigma)
        if self.spec.kquant is not None:
            wq = kquant.kq_weight(self._grouped(w), alpha, self.zero_point, self.spec.kquant)
            return wq.reshape(self.out_features, self.in_features)
        a = clamp_alpha(alpha)[..., None]  # (out, G, 1)
        zp = self.zero_point[..., None] if self.zero_point is not None else None
        lev = self.spec.levels(self._grouped(w), a, zp)  # (out, G, g)
        s = half_ste(self.deploy_scale(alpha)[..., None])  # (out, G, 1) fp32 holding fp16 values
        return (s * lev).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant is not None:
            x = self.act_quant(x, ste=self.training and torch.is_grad_enabled())
        if self.training and torch.is_grad_enabled():
            if self.spec.kquant is not None:
                return self._kq_train_forward(x)
            if self.zero_point is None:
                return _FakeQuantLinear.apply(x, self.weight, self.alpha, self.bias, self)
        w = self.fake_weight(noise=self.training)
        b = self.bias
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            w = w.to(x.dtype)
            b = b.to(x.dtype) if b is not None else None
        return F.linear(x, w, b)

    def _kq_train_forward(self, x: torch.Tensor) -> torch.Tensor:
        """K grids in training: the sub-block scales S and mins M (out, G) through autograd (small: one value per
        sub-block, rounded per super-block as stored), the per-weight part fused in _KQuantLinear."""
        alpha = self.alpha
        noise = self._noisy()
        if noise:
            alpha = torch.add(alpha, self.eps_a, alpha=self.scale_noise_sigma)
        S, M, _ = kquant.sub_scales(alpha, self.zero_point, self.spec.kquant)
        return _KQuantLinear.apply(x, self.weight, S, M if self.zero_point is not None else None, self.bias, self,
                                   noise)

    @torch.no_grad()
    def quantized_weight(self) -> QuantizedWeight:
        """codes / fp16 scale / zero of the current weights (no noise)."""
        if self.spec.kquant is not None:
            return self._quantized_kq()
        a = clamp_alpha(self.alpha)[..., None]
        zp = self.zero_point[..., None] if self.zero_point is not None else None
        lev = self.spec.levels(self._grouped(self.weight.float()), a, zp)  # (out, G, g)
        zero = self.spec.zero_value(zp, a)  # (out, G, 1)
        codes = self.spec.codes(lev, zero).reshape(self.out_features, self.in_features)
        scale = self.deploy_scale(self.alpha).to(torch.float16)
        if not torch.isfinite(self.weight).all() or not torch.isfinite(scale).all():
            raise ModelError("weights or scales contain NaN/Inf; this layer cannot be exported")
        return QuantizedWeight(
            codes=codes.round().to(torch.uint8),
            scale=scale,
            zero=zero[..., 0].contiguous(),
            grid=self.spec.grid,
            bits=self.spec.bits,
            group_size=self.group_size,
        )

    @torch.no_grad()
    def _quantized_kq(self) -> QuantizedWeight:
        fmt = self.spec.kquant
        if not torch.isfinite(self.weight).all() or not torch.isfinite(self.alpha).all() or (
                self.zero_point is not None and not torch.isfinite(self.zero_point).all()):
            raise ModelError("weights or scales contain NaN/Inf; this layer cannot be exported")
        f = kquant.encode(self._grouped(self.weight.float()), self.alpha, self.zero_point, fmt)
        rep = fmt.n_sub
        return QuantizedWeight(
            codes=f["codes"].reshape(self.out_features, self.in_features),
            scale=f["d"].repeat_interleave(rep, 1),
            zero=torch.zeros_like(self.alpha, dtype=torch.float32),
            grid=self.spec.grid,
            bits=self.spec.bits,
            group_size=self.group_size,
            sub_scale=f["sc"],
            sub_min=f["m"],
            super_min=f["dmin"].repeat_interleave(rep, 1),
        )

    @torch.no_grad()
    def reinit(self, a: float) -> None:
        """WinQ reset: W <- a W + (1 - a) Q(W) (no noise)."""
        q = self.fake_weight(noise=False)  # Q(W) of the weights before the reset
        self.weight.mul_(a).add_(q, alpha=1.0 - a)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, grid={self.spec.grid}, bits={self.spec.bits}, group_size={self.group_size}"


class _FakeQuantLinear(torch.autograd.Function):
    """y = x W_q^T + b with W_q the (noisy) fake-quant weight of a fixed-zero grid.

    nl4 runs here too: its level_value is a table lookup, its levels (-127..113) are int8 as they are
    (m = 1) and its straight-through derivative is k = 1 inside [-127, 113], so the formulas are unchanged.

    Saved for the backward: x, W and alpha (held anyway), the levels as int8 (m * level) and the
    clip mask as bool: 2 bytes per weight, where autograd over the composite expression keeps
    about 20 (W + noise, W / alpha, the clamped, rounded and scaled copies, W_q). The noise is
    re-read from the layer's NoiseSource buffer, which is not refilled before the next forward.

    Backward, per group, with A = clamp(alpha, 1e-5), S = fp16(c A), W_q = S level(W / A) and
    G = dL/dW_q = g^T x (the straight-through derivative of the composite path):
        dL/dW     = G * k S / A                                  inside the clip range, else 0
        dL/dalpha = (c / S) sum_g G * W_q - sum_g (dL/dW) * W / A   where alpha >= 1e-5
    (the first term is c * level, the second -S * k * x / A, summed with G; x = W / A).
    """

    @staticmethod
    def forward(ctx, x, weight, alpha, bias, layer):
        spec = layer.spec
        noise = layer._noisy()
        w, a = _noisy_weight(layer, weight, noise), alpha
        if noise:
            a = torch.add(a, layer.eps_a, alpha=layer.scale_noise_sigma)
        A = clamp_alpha(a)[..., None]  # (out, G, 1)
        xq = layer._grouped(w) / A  # (out, G, g)
        lo, hi, _, m = spec.ste_clip
        lev = spec.level_value(xq)
        S = half_ste(layer.deploy_scale(a)[..., None])  # (out, G, 1), fp32 holding fp16 values
        wq = (S * lev).reshape(layer.out_features, layer.in_features)
        mask = (xq >= lo) & (xq <= hi)
        lev8 = (lev * m if m != 1 else lev).to(torch.int8)
        _remember(ctx, x, bias, layer, noise)
        ctx.save_for_backward(x, weight, alpha, lev8, mask)
        return _linear(ctx, x, wq, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight, alpha, lev8, mask = ctx.saved_tensors
        layer = ctx.layer
        spec = layer.spec
        _check_draw(ctx)
        if ctx.noise:
            alpha = torch.add(alpha, layer.eps_a, alpha=layer.scale_noise_sigma)
        A = clamp_alpha(alpha)[..., None]  # (out, G, 1)
        S = layer.deploy_scale(alpha).to(torch.float16).to(torch.float32)[..., None]
        _, _, k, m = spec.ste_clip
        out_f, in_f = layer.out_features, layer.in_features
        wq = (S / m if m != 1 else S) * lev8  # (out, G, g) == the forward's W_q
        g2, gx, gw_q = _matmul_grads(ctx, g, x, wq.reshape(out_f, in_f))
        G = layer._grouped(gw_q.float())  # (out, G, g), a fresh tensor: updated in place below
        need_a = ctx.needs_input_grad[2]
        term1 = torch.linalg.vecdot(G, wq) if need_a else None  # sum_g G * W_q, before G becomes dL/dW
        grad_w = G.mul_(k * S / A).mul_(mask)  # (out, G, g)
        grad_a = None
        if need_a:
            w = _noisy_weight(layer, weight, ctx.noise)
            c = spec.scale_factor
            grad_a = (c / S[..., 0]) * term1 - torch.linalg.vecdot(grad_w, layer._grouped(w)) / A[..., 0]
            grad_a = grad_a * (alpha.abs() >= ALPHA_EPS)
        grad_w = grad_w.reshape(out_f, in_f) if ctx.needs_input_grad[1] else None
        gb = g2.float().sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[3] else None
        if gx is not None:
            gx = gx.reshape(x.shape).to(x.dtype)
        return gx, grad_w, grad_a, gb, None


class _KQuantLinear(torch.autograd.Function):
    """y = x W_q^T + b for a K grid, W_q = S q - M per sub-block (winq.kquant.kq_weight's per-weight part), with the
    sub-block scales S and mins M (out, G) given (autograd computes them and carries their gradient to alpha and mu).

    Saved: x, W, S, M (held anyway or small), the levels as int8 and the clip mask as bool, where autograd over
    kq_weight keeps (W + M) / S, the clamped, rounded and scaled copies and W_q (float32 each). S and M are expanded
    to whole (out, in) tensors for the per-weight arithmetic: broadcasting a (out, G, 1) operand over sub-blocks of
    16 runs several times slower on the CPU than two contiguous operands. With X = (W + M) / S (W / S without a
    min), q = round(clamp(X, lo, hi)), k = [S != 0] (a zero S divides by 1), in = k [lo <= X <= hi] and
    G = dL/dW_q = g^T x, the straight-through derivatives of kq_weight are
        dL/dW = G * in
        dL/dS = sum_g G * (q - in X) = sum_g G q - (sum_g (dL/dW) W + M sum_g dL/dW) / S
        dL/dM = sum_g G * (in - 1) = sum_g dL/dW - sum_g G
    """

    @staticmethod
    def forward(ctx, x, weight, S, M, bias, layer, noise):
        fmt = layer.spec.kquant
        w = _noisy_weight(layer, weight, noise)
        Mf = _kq_full(layer, M) if M is not None else None
        zero = S == 0
        X = torch.div(w + Mf if Mf is not None else w, _kq_full(layer, torch.where(zero, 1.0, S)))  # kquant.levels'
        lo, hi = fmt.code_range
        c = torch.clamp(X, lo, hi)
        mask = c == X
        if bool(zero.any()):
            mask &= _kq_full(layer, ~zero)
        q = c.round_()
        wq = _kq_full(layer, S).mul_(q)
        if Mf is not None:
            wq = wq.sub_(Mf)
        _remember(ctx, x, bias, layer, noise)
        ctx.has_min = M is not None
        ctx.save_for_backward(x, weight, S, M if M is not None else S.new_zeros(()), q.to(torch.int8), mask)
        return _linear(ctx, x, wq, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight, S, M, q8, mask = ctx.saved_tensors
        layer = ctx.layer
        _check_draw(ctx)
        q = q8.float()
        wq = _kq_full(layer, S).mul_(q)
        if ctx.has_min:
            wq = wq.sub_(_kq_full(layer, M))
        g2, gx, gw_q = _matmul_grads(ctx, g, x, wq)
        G = layer._grouped(gw_q.float())  # (out, G, g), a fresh tensor: updated in place below
        grad_s = grad_m = None
        need_s, need_m = ctx.needs_input_grad[2], ctx.has_min and ctx.needs_input_grad[3]
        gq = torch.linalg.vecdot(G, layer._grouped(q)) if need_s else None  # sum_g G q, before G becomes dL/dW
        g_sum = G.sum(-1) if need_m else None
        grad_w = G.mul_(layer._grouped(mask))  # (out, G, g): dL/dW
        if need_s or need_m:
            gw_sum = grad_w.sum(-1)
        if need_s:
            w = _noisy_weight(layer, weight, ctx.noise)
            inner = torch.linalg.vecdot(grad_w, layer._grouped(w))
            if ctx.has_min:
                inner = inner + M * gw_sum
            grad_s = gq - inner / torch.where(S == 0, 1.0, S)
        if need_m:
            grad_m = gw_sum - g_sum
        grad_w = grad_w.reshape(layer.out_features, layer.in_features) if ctx.needs_input_grad[1] else None
        gb = g2.float().sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[4] else None
        if gx is not None:
            gx = gx.reshape(x.shape).to(x.dtype)
        return gx, grad_w, grad_s, grad_m, gb, None, None


def _kq_full(layer, v: torch.Tensor) -> torch.Tensor:
    """A per-sub-block (out, G) tensor as a contiguous (out, in) one, each value over its sub-block."""
    g = layer.group_size
    return v[..., None].expand(*v.shape, g).reshape(layer.out_features, layer.in_features)


def _matmul_grads(ctx, g: torch.Tensor, x: torch.Tensor, wq: torch.Tensor):
    """The two matmuls of y = x W_q^T's backward, under the forward's autocast: (g as (N, out), dL/dx (None unless
    asked), dL/dW_q (out, in))."""
    out_f, in_f = wq.shape
    g2 = g.reshape(-1, out_f)  # (N, out)
    x2 = x.reshape(-1, in_f)  # (N, in)
    with torch.autocast(g.device.type, dtype=ctx.amp_dtype or torch.bfloat16, enabled=ctx.amp):
        gx = g2.matmul(wq if g2.dtype == wq.dtype or ctx.amp else wq.to(g2.dtype)) if ctx.needs_input_grad[0] else None
        gw_q = g2.t().matmul(x2 if x2.dtype == g2.dtype or ctx.amp else x2.to(g2.dtype))  # (out, in)
    return g2, gx, gw_q


def _noisy_weight(layer, weight: torch.Tensor, noise: bool) -> torch.Tensor:
    """W (+ sigma eps_w when noisy): the same expression as QuantLinear.fake_weight()."""
    w = weight.float()
    return torch.add(w, layer.eps_w, alpha=layer.noise_sigma) if noise else w


def _remember(ctx, x: torch.Tensor, bias, layer, noise: bool) -> None:
    """What a fused layer's backward needs besides its saved tensors: autocast state, the layer, the noise draw."""
    dev = x.device.type
    ctx.amp = torch.is_autocast_enabled(dev)
    ctx.amp_dtype = torch.get_autocast_dtype(dev) if ctx.amp else None
    ctx.layer, ctx.noise, ctx.bias_dtype = layer, noise, bias.dtype if bias is not None else None
    ctx.draw = layer.noise.draws if noise else None


def _linear(ctx, x: torch.Tensor, wq: torch.Tensor, bias) -> torch.Tensor:
    """The fused layers' output: x W_q^T + b in x's dtype unless autocast decides."""
    if x.dtype != wq.dtype and not ctx.amp:
        return F.linear(x, wq.to(x.dtype), bias.to(x.dtype) if bias is not None else None)
    return F.linear(x, wq, bias)


def _check_draw(ctx) -> None:
    if ctx.noise and ctx.layer.noise.draws != ctx.draw:
        raise RuntimeError("WinQ noise was redrawn between a forward and its backward; run one forward per backward")
