"""Configuration dataclasses: what to quantize (QuantConfig) and how to train (TrainConfig).

Both are frozen, validated in __post_init__, and saved as JSON into every artifact
(`winq.json`), so an export or an eval always knows how its weights were made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import ConfigError
from .grids import DEFAULT_GRID, GRID_BITS, check_grid, check_group

METHODS = ("winq", "qat")
PRECISIONS = ("fp32", "bf16")
EMBEDS = ("q8_0", "float")
INITS = ("max", "search", "gptq")  # the step-0 quantizers of winq.calibrate
MIN_CALIB_TOKENS = 512


def check_init(init: str) -> None:
    if init not in INITS:
        raise ConfigError(f"init={init!r}: choose one of {', '.join(INITS)}")


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 4  # weight bits: 1 (binary), 2 (seq/ternary/affine), 3, 4, 8
    grid: str | None = None  # lsq | seq | ternary | binary | affine | nl4; None -> the default for `bits`
    group_size: int = 32  # weights per scale along the input dim: 32 is the block of GGUF's Q4_0 / IQ4_NL / Q8_0
    #                       containers (and a GPTQ / MatMulNBits group); -1: one scale per output row
    quantize_lm_head: bool = False  # the output projection stays full precision unless asked
    skip: tuple[str, ...] = ()  # module-name substrings that stay full precision
    init: str = "gptq"  # step-0 quantizer (winq.calibrate): max (the WinQ reference) | search | gptq
    calib_tokens: int = 8192  # calibration tokens (at most) for init search / gptq, from the training data
    recipe: str | None = None  # per-tensor K-quant mix (winq.recipes: q2_k .. q6_k, q4_k_m, q5_k_m): sets grid,
    #                            bits and group size per layer; None: every layer in `grid`
    embed: str = "q8_0"  # token embeddings (and a float lm_head): q8_0 (snapped to Q8_0's lattice, frozen: the
    #                      GGUF export stores them as Q8_0 exactly, as llama.cpp's Q4_0 files do) | float (trained)

    def __post_init__(self):
        if self.recipe is not None:
            from .recipes import base_grid

            base = base_grid(self.recipe)
            if self.grid is not None and self.grid != base.grid:
                raise ConfigError(f"recipe={self.recipe!r} trains in {base.grid} (and its mix): drop grid="
                                  f"{self.grid!r}, or drop the recipe")
            for field, v in (("grid", base.grid), ("bits", base.bits), ("group_size", base.group_size)):
                object.__setattr__(self, field, v)
        if self.grid is None:
            if self.bits not in DEFAULT_GRID:
                valid = sorted({b for bs in GRID_BITS.values() for b in bs})
                takers = [g for g, bs in GRID_BITS.items() if self.bits in bs]
                if takers:
                    raise ConfigError(f"bits={self.bits} has no default grid: choose grid {' or '.join(takers)} "
                                      f"(--grid), or a recipe")
                raise ConfigError(f"bits={self.bits} is not supported: choose one of {valid}")
            object.__setattr__(self, "grid", DEFAULT_GRID[self.bits])
        check_grid(self.grid, self.bits)
        if self.group_size != -1 and self.group_size < 1:
            raise ConfigError(f"group_size={self.group_size}: use -1 (per row) or a positive divisor of in_features")
        check_group(self.grid, self.group_size)
        check_init(self.init)
        if self.init != "max" and self.calib_tokens < MIN_CALIB_TOKENS:
            raise ConfigError(f"calib_tokens={self.calib_tokens}: init {self.init!r} needs at least "
                              f"{MIN_CALIB_TOKENS} calibration tokens (or use init='max')")
        if self.embed not in EMBEDS:
            raise ConfigError(f"embed={self.embed!r}: choose one of {', '.join(EMBEDS)}")
        object.__setattr__(self, "skip", tuple(self.skip))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        # checkpoints written before these fields existed: the reference init, float embeddings
        d = {"init": "max", "embed": "float", **d}
        return cls(**{k: (tuple(v) if k == "skip" else v) for k, v in d.items() if k in names})


@dataclass(frozen=True)
class TrainConfig:
    method: str = "winq"  # winq (reset + noise) | qat (the ParetoQ baseline: neither)
    steps: int = 40  # optimizer steps
    lr: float = 1e-4  # peak learning rate (AdamW) for the latent weights (and the scales unless scale_lr)
    scale_lr: float | None = None  # learning rate for the learned scales/zeros (None: same as lr)
    weight_decay: float = 0.0
    warmup_steps: int = -1  # -1: 5% of steps
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    batch_size: int = 2  # sequences per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256  # tokens per sequence
    # WinQ reset: "auto" (adaptive, winq.schedule; the default: benchmarks/convergence.py found that fixed periods
    # at short budgets freeze the codes and cost loss), a period in optimizer steps, or -1 for a quarter of `steps`
    # (the reference's ratio)
    reinit_every: int | str = "auto"
    reinit_trigger: str = "travel"  # with reinit_every="auto": travel | plateau (winq.schedule)
    reinit_travel: float = 1.0  # travel trigger: reset when mean |W - W_reset| reaches this many median steps
    reinit_flip: float = 0.1  # plateau trigger: reset when the smoothed flip rate falls to this share of its peak
    reinit_min_steps: int = 10  # adaptive triggers: never sooner than this many steps after the last reset
    reinit_alpha: float = 0.2  # W <- a W + (1 - a) Q(W)
    noise_sigma: float = 1e-3  # std of the Gaussian noise on W and on the scale in training forwards
    precision: str = "fp32"  # fp32 | bf16 (autocast; master weights stay fp32)
    max_grad_norm: float = 1.0  # 0 disables clipping
    seed: int = 0
    log_every: int = 1
    save_every: int = 0  # 0: save only at the end
    eval_every: int = 10  # held-out eval every N steps (and at steps 0 and the last); 0: none (keep_best needs it)
    eval_batches: int = 4  # held-out batches per periodic eval
    diag_every: int = 1  # code-flip diagnostics (winq.diagnostics) every N steps; 0: off (adaptive resets need them)
    diag_sample: int = 1_000_000  # latent weights sampled for the diagnostics (all of them in smaller models)
    distill: float = 1.0  # weight of the KL divergence to the float teacher in the loss, the rest next-token
    #                       cross-entropy: 1 pure distillation, 0 off (no teacher is loaded)
    keep_best: bool = True  # with eval_every: the checkpoint holds the evaluated state with the lowest held-out
    #                         score (KL to the teacher when distilling, else loss), the step-0 state included
    act_quant: str | dict = "none"  # runtime activation quantizer on the quantized layers' inputs (straight-through):
    #                          none | q8_0 | q8_k | ort_int8[:block] (winq.actplan.parse_act_quant), or llamacpp:
    #                          per layer, stored resolved as {"plan": "llamacpp", "layers": {...}} (actplan.plan_record)

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
        if self.reinit_every != "auto" and (
            isinstance(self.reinit_every, str) or self.reinit_every == 0 or self.reinit_every < -1
        ):
            raise ConfigError(
                f"reinit_every={self.reinit_every!r}: use -1 (a quarter of steps), a positive period "
                "or 'auto' (adaptive)"
            )
        from .reset_schedule import TRIGGERS

        if self.reinit_trigger not in TRIGGERS:
            raise ConfigError(f"reinit_trigger={self.reinit_trigger!r}: choose one of {', '.join(TRIGGERS)}")
        if not self.reinit_travel > 0 or not 0 < self.reinit_flip < 1 or self.reinit_min_steps < 1:
            raise ConfigError(
                f"reinit_travel={self.reinit_travel} must be > 0, reinit_flip={self.reinit_flip} in (0, 1), "
                f"reinit_min_steps={self.reinit_min_steps} >= 1"
            )
        if self.diag_every < 0 or self.diag_sample < 1:
            raise ConfigError(f"diag_every={self.diag_every} must be >= 0 and diag_sample={self.diag_sample} >= 1")
        if self.reinit_every == "auto" and self.method == "winq" and self.diag_every != 1:
            raise ConfigError("reinit_every='auto' reads the diagnostics every step: leave diag_every at 1")
        if self.eval_every < 0 or (self.eval_every and self.eval_batches < 1):
            raise ConfigError(f"eval_every={self.eval_every} must be >= 0 (0: no evaluation) and eval_batches="
                              f"{self.eval_batches} >= 1 when evaluating")
        if not 0.0 <= self.distill <= 1.0:
            raise ConfigError(f"distill={self.distill} must be in [0, 1] (1: pure distillation, 0: off)")
        from .actplan import check_act_quant

        check_act_quant(self.act_quant)

    @property
    def effective_reinit_every(self) -> int:
        """Fixed reset period in optimizer steps (0 = none: plain QAT, or the adaptive schedule)."""
        if self.method == "qat" or self.reinit_every == "auto":
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
