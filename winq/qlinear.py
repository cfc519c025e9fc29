"""QuantLinear: an nn.Linear whose weight goes through a learned fake-quantizer.

Parameters (saved in checkpoints under the layer's name):
    weight      float32 (out, in)  the latent full-precision weight W (trained)
    alpha       float32 (out, G)   the learned scale per row (G = 1) or per group
    zero_point  float32 (out, G)   affine grid only: learned zero, rounded (STE) in the forward
    bias        as in the original layer (never quantized)

Forward: W_q = half_ste(s(alpha)) * level(W / alpha) with straight-through rounding, so
W_q equals `quantized_weight().dequantize()` bit for bit when no noise is applied.
WinQ noise (training only): W + N(0, sigma_w^2) and alpha + N(0, sigma_s^2), fresh each
forward, drawn from the generator the trainer installs (reproducible, resumable).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, ModelError
from .grids import ALPHA_EPS, GridSpec, half_ste
from .qweight import QuantizedWeight


class QuantLinear(nn.Linear):
    def __init__(self, in_features, out_features, bias=True, *, grid="lsq", bits=4, group_size=-1, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.spec = GridSpec(grid, bits)
        g = in_features if group_size == -1 else group_size
        if in_features % g:
            raise ConfigError(f"group_size={group_size} does not divide in_features={in_features}")
        self.group_size = g
        n_groups = in_features // g
        self.alpha = nn.Parameter(torch.ones(out_features, n_groups, device=device, dtype=torch.float32))
        if grid == "affine":
            self.zero_point = nn.Parameter(torch.zeros(out_features, n_groups, device=device, dtype=torch.float32))
        else:
            self.register_parameter("zero_point", None)
        # set by winq.train during training; off for eval and export
        self.noise_sigma = 0.0
        self.noise_generator: torch.Generator | None = None

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, grid: str, bits: int, group_size: int = -1, init: bool = True) -> "QuantLinear":
        """Wrap an existing nn.Linear (weights copied to float32); init=True sets alpha (and zero) from W."""
        q = cls(
            linear.in_features, linear.out_features, linear.bias is not None,
            grid=grid, bits=bits, group_size=group_size, device=linear.weight.device, dtype=torch.float32,
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
        return alpha.clamp(min=ALPHA_EPS) * self.spec.scale_factor

    def fake_weight(self, noise: bool = False) -> torch.Tensor:
        """The fake-quant weight W_q, float32 (out, in). noise=True adds WinQ's training noise."""
        w = self.weight.float()
        alpha = self.alpha
        if noise and self.noise_sigma > 0:
            gen = self.noise_generator
            w = w + self.noise_sigma * torch.randn(w.shape, generator=gen, device=w.device, dtype=w.dtype)
            alpha = alpha + self.noise_sigma * torch.randn(alpha.shape, generator=gen, device=w.device, dtype=alpha.dtype)
        a = alpha.clamp(min=ALPHA_EPS)[..., None]  # (out, G, 1)
        zp = self.zero_point[..., None] if self.zero_point is not None else None
        lev = self.spec.levels(self._grouped(w), a, zp)  # (out, G, g)
        s = half_ste(self.deploy_scale(alpha)[..., None])  # (out, G, 1) fp32 holding fp16 values
        return (s * lev).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fake_weight(noise=self.training)
        b = self.bias
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            w = w.to(x.dtype)
            b = b.to(x.dtype) if b is not None else None
        return F.linear(x, w, b)

    @torch.no_grad()
    def quantized_weight(self) -> QuantizedWeight:
        """codes / fp16 scale / zero of the current weights (no noise)."""
        a = self.alpha.clamp(min=ALPHA_EPS)[..., None]
        zp = self.zero_point[..., None] if self.zero_point is not None else None
        lev = self.spec.levels(self._grouped(self.weight.float()), a, zp)  # (out, G, g)
        zero = self.spec.zero_value(zp, a)  # (out, G, 1)
        codes = (lev + zero).reshape(self.out_features, self.in_features)
        scale = self.deploy_scale(self.alpha).to(torch.float16)
        if not torch.isfinite(self.weight).all() or not torch.isfinite(scale).all():
            raise ModelError("weights or scales contain NaN/Inf; this layer cannot be exported")
        return QuantizedWeight(
            codes=codes.round().to(torch.uint8), scale=scale, zero=zero[..., 0].contiguous(),
            grid=self.spec.grid, bits=self.spec.bits, group_size=self.group_size,
        )

    @torch.no_grad()
    def reinit(self, a: float) -> None:
        """WinQ reset: W <- a W + (1 - a) Q(W) (no noise)."""
        q = self.fake_weight(noise=False)  # Q(W) of the weights before the reset
        self.weight.mul_(a).add_(q, alpha=1.0 - a)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, grid={self.spec.grid}, bits={self.spec.bits}, group_size={self.group_size}"
