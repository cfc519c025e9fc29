"""Configuration dataclasses: what to quantize (QuantConfig) and how to train (TrainConfig).

Both are frozen, validated in __post_init__, and saved as JSON into every artifact
(`winq.json`), so an export or an eval always knows how its weights were made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import ConfigError
from .grids import DEFAULT_GRID, GRID_BITS, check_grid

METHODS = ("winq", "qat")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 2  # weight bits: 1 (binary), 2 (seq/ternary/affine), 3, 4, 8
    grid: str | None = None  # lsq | seq | ternary | binary | affine; None -> the default for `bits`
    group_size: int = -1  # -1: one scale per output row; else a divisor of every in_features
    quantize_lm_head: bool = False  # the output projection stays full precision unless asked
    skip: tuple[str, ...] = ()  # module-name substrings that stay full precision

    def __post_init__(self):
        if self.grid is None:
            if self.bits not in DEFAULT_GRID:
                valid = sorted({b for bs in GRID_BITS.values() for b in bs})
                raise ConfigError(f"bits={self.bits} is not supported: choose one of {valid}")
            object.__setattr__(self, "grid", DEFAULT_GRID[self.bits])
        check_grid(self.grid, self.bits)
        if self.group_size != -1 and self.group_size < 1:
            raise ConfigError(f"group_size={self.group_size}: use -1 (per row) or a positive divisor of in_features")
        object.__setattr__(self, "skip", tuple(self.skip))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "skip" else v) for k, v in d.items() if k in names})


@dataclass(frozen=True)
class TrainConfig:
    method: str = "winq"  # winq (reset + noise) | qat (the ParetoQ baseline: neither)
    steps: int = 60  # optimizer steps
    lr: float = 2e-5  # peak learning rate (AdamW) for the latent weights
    scale_lr: float | None = None  # learning rate for the learned scales/zeros (None: same as lr)
    weight_decay: float = 0.0
    warmup_steps: int = -1  # -1: 5% of steps
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    batch_size: int = 2  # sequences per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256  # tokens per sequence
    reinit_every: int = -1  # WinQ reset period in optimizer steps; -1: a quarter of `steps` (as the reference)
    reinit_alpha: float = 0.2  # W <- a W + (1 - a) Q(W)
    noise_sigma: float = 1e-3  # std of the Gaussian noise on W and on the scale in training forwards
    precision: str = "fp32"  # fp32 | bf16 (autocast; master weights stay fp32)
    max_grad_norm: float = 1.0  # 0 disables clipping
    seed: int = 0
    log_every: int = 1
    save_every: int = 0  # 0: save only at the end
    eval_every: int = 0  # 0: no periodic held-out eval
    eval_batches: int = 8  # held-out batches per periodic eval

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r}: choose one of {', '.join(METHODS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        for name in ("steps", "batch_size", "grad_accum", "seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr} must be > 0")
        if not 0.0 <= self.reinit_alpha <= 1.0:
            raise ConfigError(f"reinit_alpha={self.reinit_alpha} must be in [0, 1]")
        if self.noise_sigma < 0:
            raise ConfigError(f"noise_sigma={self.noise_sigma} must be >= 0")
        if self.reinit_every == 0 or self.reinit_every < -1:
            raise ConfigError(f"reinit_every={self.reinit_every}: use -1 (a quarter of steps) or a positive period")

    @property
    def effective_reinit_every(self) -> int:
        """Reset period in optimizer steps (0 = never: plain QAT)."""
        if self.method == "qat":
            return 0
        return max(1, self.steps // 4) if self.reinit_every == -1 else self.reinit_every

    @property
    def effective_noise(self) -> float:
        return 0.0 if self.method == "qat" else self.noise_sigma

    @property
    def effective_warmup(self) -> int:
        return max(0, round(0.05 * self.steps)) if self.warmup_steps == -1 else self.warmup_steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
