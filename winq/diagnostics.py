"""Code-flip diagnostics: are the integer codes still moving, and can they?

A WinQ reset W <- 0.2 W + 0.8 Q(W) keeps every code and parks each latent weight at least
0.4 of a step from a rounding boundary; a code changes again only after its weight has
travelled that far. These numbers say, during training, whether that happens:

    flip_rate           share of codes that differ from those at the previous logged step
    flips_since_reset   share of codes that differ from those right after the last reset (or the start)
    oscillation         share of codes that changed at least once in the last `window` logged
                        steps yet are back to the value they had `window` logged steps ago
                        (weights flipping back and forth across a boundary)
    boundary_margin     median distance of the latent weights to their nearest rounding boundary,
                        in steps (0: on a boundary; 0.5: on a level; a reset makes it >= 0.4)
    travel              mean |W - W_at_last_reset| in units of the median step s (the distance
                        between neighbouring levels in weight units), from the actual weights
    lr_travel           the sum of the learning rates since the last reset over the median step:
                        the most an AdamW weight can have moved (about one lr per step)

They are computed on a fixed, evenly strided sample of the latent weights of every quantized
layer (about `target` weights in all; every weight of a small model), so they cost a few
milliseconds a step on the default model instead of a pass over its 106M weights. Shares are
over the sampled weights; with 1M samples a share of 1e-4 is counted from about 100 flips.
The tracker's state (codes at the last reset, the ring of recent codes, W at the last reset)
is saved in checkpoints so that a resumed run continues the same series.
"""

from __future__ import annotations

import torch
from torch import nn

from .grids import clamp_alpha

DEFAULT_SAMPLE = 1_000_000
DEFAULT_WINDOW = 8


class CodeTracker:
    """Flip, oscillation, margin and travel statistics over a fixed sample of quantized weights."""

    def __init__(self, layers: dict[str, nn.Module], target: int = DEFAULT_SAMPLE, window: int = DEFAULT_WINDOW):
        self.layers = layers
        total = sum(m.weight.numel() for m in layers.values())
        self.stride = max(1, total // max(1, target))
        self.window = window
        self._idx, self._gidx = {}, {}
        off = 0
        for name, m in layers.items():
            n = m.weight.numel()
            start = (-off) % self.stride  # one stride over the concatenation of all layers
            idx = torch.arange(start, n, self.stride, device=m.weight.device)
            self._idx[name] = idx
            self._gidx[name] = (idx // m.in_features) * (m.in_features // m.group_size) + (
                idx % m.in_features
            ) // m.group_size
            off += n
        self.n = sum(len(i) for i in self._idx.values())
        self.ring: list[torch.Tensor] = []  # codes at the last `window` + 1 logged steps, oldest first
        self.reset_codes: torch.Tensor | None = None
        self.reset_w: torch.Tensor | None = None
        self.lr_since_reset = 0.0

    # ---- sampling -------------------------------------------------------------------------
    @torch.no_grad()
    def _sample(self):
        """(w, code, s, margin), 1-D over the sample: latent weight, code index, step in weight units,
        distance to the nearest rounding boundary in steps."""
        ws, codes, steps, margins = [], [], [], []
        for name, m in self.layers.items():
            idx, gidx = self._idx[name], self._gidx[name]
            w = m.weight.detach().reshape(-1)[idx].float()
            alpha = clamp_alpha(m.alpha.detach().reshape(-1)[gidx])  # signed: a negative alpha mirrors the lattice
            zero = m.zero_point.detach().reshape(-1)[gidx] if m.zero_point is not None else None
            if zero is not None and m.spec.kquant is not None:  # a K grid's min mu, in units of its float scale
                zero = zero.clamp(min=0) / alpha.abs()
            u, lo, hi = m.spec.step_coordinates(w / alpha, zero)  # the layer's own x = W / alpha
            uc = torch.clamp(u, lo, hi)
            code = torch.round(uc)
            codes.append(code.to(torch.int16))
            margins.append(0.5 - (uc - code).abs() + (u - uc).abs())
            ws.append(w)
            steps.append(alpha.abs() * m.spec.step_scale)  # the level spacing in weight units (nl4: the mean)
        cat = torch.cat
        return cat(ws), cat(codes), cat(steps), cat(margins)

    # ---- the series -----------------------------------------------------------------------
    @torch.no_grad()
    def start(self) -> None:
        """Take the reference state at the start of a run (or right after a reset)."""
        w, code, _, _ = self._sample()
        self.reset_codes, self.reset_w = code, w
        self.lr_since_reset = 0.0
        if not self.ring:
            self.ring = [code]

    @torch.no_grad()
    def measure(self, lr: float) -> dict[str, float]:
        """Statistics at the current weights; call once per logged step, after the optimizer step."""
        if self.reset_codes is None:
            self.start()
        self.lr_since_reset += lr
        w, code, s, margin = self._sample()
        prev = self.ring[-1]
        self.ring.append(code)
        if len(self.ring) > self.window + 1:
            self.ring.pop(0)
        old = self.ring[0]
        changed = torch.zeros_like(code, dtype=torch.bool)
        for a, b in zip(self.ring[:-1], self.ring[1:]):
            changed |= a != b
        med_s = s.median().clamp(min=1e-12)
        n = float(self.n)
        return {
            "flip_rate": (code != prev).sum().item() / n,
            "flips_since_reset": (code != self.reset_codes).sum().item() / n,
            "oscillation": (changed & (code == old)).sum().item() / n,
            "boundary_margin": margin.median().item(),
            "travel": ((w - self.reset_w).abs().mean() / med_s).item(),
            "lr_travel": self.lr_since_reset / med_s.item(),
        }

    # ---- checkpoints ----------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.reset_codes is None:
            return {}
        st = {
            "reset_codes": self.reset_codes.cpu().clone(),
            "reset_w": self.reset_w.cpu().clone(),
            "lr_since_reset": torch.tensor([self.lr_since_reset], dtype=torch.float64),
        }
        st.update(
            {f"ring.{i}": c.cpu().clone() for i, c in enumerate(self.ring)}
        )  # clones: safetensors refuses shared storage
        return st

    def load_state_tensors(self, st: dict[str, torch.Tensor]) -> None:
        if not st:
            return
        from .errors import CheckpointError

        if st["reset_codes"].numel() != self.n:
            raise CheckpointError(
                f"diagnostics state holds {st['reset_codes'].numel()} sampled weights, this model {self.n}: "
                "the checkpoint was written for another model or sampling"
            )
        dev = next(iter(self.layers.values())).weight.device
        self.reset_codes = st["reset_codes"].to(dev)
        self.reset_w = st["reset_w"].to(dev)
        self.lr_since_reset = float(st["lr_since_reset"][0])
        self.ring = [st[f"ring.{i}"].to(dev) for i in range(sum(k.startswith("ring.") for k in st))]


DIAG_KEYS = ("flip_rate", "flips_since_reset", "oscillation", "boundary_margin", "travel", "lr_travel")


def summarize_metrics(records: list[dict]) -> dict:
    """What a run's metrics.jsonl says about its codes: the last diagnostics, the mean flip rate
    before and after the first reset, and every reset (step, trigger, travel, flip rate).
    Used by `winq inspect CHECKPOINT`; empty when the run logged no diagnostics."""
    steps = [r for r in records if "flip_rate" in r]
    if not steps:
        return {}
    resets = [r.get("reset_info", {"step": r["step"], "trigger": "fixed"}) for r in records if r.get("reset")]
    first = resets[0]["step"] if resets else None

    def mean(xs):
        return sum(xs) / len(xs) if xs else None

    return {
        "logged_steps": len(steps),
        "last": {"step": steps[-1]["step"], **{k: steps[-1][k] for k in DIAG_KEYS if k in steps[-1]}},
        "mean_flip_rate_before_first_reset": mean(
            [r["flip_rate"] for r in steps if first is None or r["step"] <= first]
        ),
        "mean_flip_rate_after_first_reset": mean(
            [r["flip_rate"] for r in steps if first is not None and r["step"] > first]
        ),
        "resets": resets,
    }
