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


def option(default, help: str, *, flag: str | None = None, cli: bool = True, cli_type=None, parse: str | None = None):
    """A config field that carries its own help: `winq train`'s options are generated from these fields
    (cli/common.config_options), so the CLI and the library share one default and one description.
    flag: the option's spelling (default --field-name); cli=False: a library-only setting; cli_type: the type the
    command line reads when the field's own type is a union; parse: the name of a PARSERS entry turning that
    string into the field's value."""
    meta = {"help": help, "flag": flag, "cli": cli, "cli_type": cli_type, "parse": parse}
    return dataclasses.field(default=default, metadata=meta)


def parse_reinit_every(text: str) -> int | str:
    """--reinit-every's text: auto, or an int."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--reinit-every {text!r}: use -1 (a quarter of --steps), a positive number of steps or "
                          "auto") from None


PARSERS = {"reinit_every": parse_reinit_every}


def check_init(init: str) -> None:
    if init not in INITS:
        raise ConfigError(f"init={init!r}: choose one of {', '.join(INITS)}")


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize. Each field's help is the help of its `winq train` option (cli/common.config_options)."""

    bits: int = option(4, "weight bits: 1, 2, 3, 4, 5, 6 (q6_k) or 8")
    grid: str | None = option(
        None, "lsq | seq | ternary | binary | affine | nl4 | q2_k | q3_k | q4_k | q5_k | q6_k (default: seq for 2 "
        "bits, lsq for 3/4/5/8, binary for 1; nl4: llama.cpp's IQ4_NL levels, group 32; q*_k: llama.cpp's K-quants "
        "with their sub-block scales trained, exported exactly; see --recipe)")
    recipe: str | None = option(
        None, "per-tensor K-quant mix, as llama.cpp's: q4_k_m | q5_k_m (attn_v and ffn_down in Q6_K on some layers) "
        "| q2_k | q3_k | q4_k | q5_k | q6_k; sets --grid, --bits and --group-size per layer (rows not a multiple of "
        "256 take llama.cpp's fallback type; winq.recipes)")
    group_size: int = option(
        32, "weights per scale along the input dim: 32 is GGUF's Q4_0/IQ4_NL/Q8_0 block (and a GPTQ and MatMulNBits "
        "group); -1: one scale per row; else a divisor of every in_features")
    init: str = option(
        "gptq", "step-0 quantizer (winq.calibrate): gptq (calibrated scale search + GPTQ error compensation) | search "
        "(calibrated scale search) | max (the WinQ reference: max|W| per group)")
    calib_tokens: int = option(8192, "calibration tokens (at most) of --init gptq/search, from the calibration text")
    embed: str = option(
        "q8_0", "token embeddings (and a float lm_head): q8_0 (on Q8_0's lattice and frozen: exported as Q8_0 "
        "exactly, the size of llama.cpp's Q4_0 files) | float (trained, F16 in GGUF)")
    quantize_lm_head: bool = option(False, "quantize the output projection too (it stays full precision unless "
                                    "asked)", flag="--quantize-lm-head")
    skip: tuple[str, ...] = option((), "module-name substrings that stay full precision", cli=False)

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
    """How to train. Each field's help is the help of its `winq train` option (cli/common.config_options)."""

    method: str = option("winq", "winq (reset + noise) or qat (the ParetoQ baseline: neither)")
    steps: int = option(40, "optimizer steps")
    lr: float = option(1e-4, "peak AdamW learning rate of the latent weights (cosine schedule, 5% warm-up)")
    scale_lr: float | None = option(None, "peak learning rate of the scales and zeros, in units of a level step "
                                    "(default: --lr)")
    weight_decay: float = option(0.0, "AdamW weight decay of the latent weights")
    warmup_steps: int = option(-1, "linear warm-up steps (-1: 5% of --steps)")
    min_lr_ratio: float = option(0.0, "the cosine schedule decays to lr * this")
    batch_size: int = option(2, "sequences per micro-batch (per process)")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    seq_len: int = option(256, "tokens per training sequence")
    # benchmarks/convergence.py found that fixed periods at short budgets freeze the codes and cost loss: auto
    reinit_every: int | str = option(
        "auto", "when to reset: auto (when --reinit-trigger fires; the default), a period in steps, or -1 (a quarter "
        "of --steps, the reference's ratio)", cli_type=str, parse="reinit_every")
    reinit_trigger: str = option("travel", "with --reinit-every auto: travel (weights moved --reinit-travel steps) or "
                                 "plateau (flip rate fell to --reinit-flip of its peak); winq.reset_schedule")
    reinit_travel: float = option(1.0, "travel trigger: reset when mean |W - W_at_reset| reaches this many median "
                                  "steps")
    reinit_flip: float = option(0.1, "plateau trigger: reset when the smoothed flip rate falls to this share of its "
                                "peak since the last reset")
    reinit_min_steps: int = option(10, "adaptive triggers: at least this many steps between resets")
    reinit_alpha: float = option(0.2, "reset W <- a W + (1 - a) Q(W)")
    noise_sigma: float = option(1e-3, "std of the Gaussian noise added to W in training forwards (the scales get the "
                                "same std in units of a level step)")
    precision: str = option("fp32", "fp32 | bf16 (autocast; master weights stay fp32)")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0: no clipping)")
    seed: int = option(0, "random seed (data order, noise, calibration sample)")
    log_every: int = option(1, "metrics.jsonl line every N steps", cli=False)
    save_every: int = option(0, "save a resumable checkpoint every N steps (0: only at the end)")
    eval_every: int = option(10, "held-out loss (and KL to the teacher) every N steps, and at step 0 and the last "
                             "(0: never; --keep-best needs it)")
    eval_batches: int = option(4, "held-out batches per periodic eval")
    diag_every: int = option(1, "code-flip diagnostics (winq.diagnostics) every N steps; 0: off (adaptive resets "
                             "need them)", cli=False)
    diag_sample: int = option(1_000_000, "latent weights sampled for the diagnostics", cli=False)
    distill: float = option(1.0, "weight of the KL divergence to the float teacher in the loss (the rest is "
                            "next-token cross-entropy): 1 pure distillation, 0 off (no teacher is loaded)")
    keep_best: bool = option(True, "write the evaluated state with the lowest held-out score (KL to the teacher "
                             "when distilling, else loss), step 0 included", flag="--keep-best/--keep-last")
    act_quant: str | dict = option(
        "none", "train on a runtime's 8-bit activations (straight-through gradient): none | q8_0 (llama.cpp "
        "Q4_0/Q8_0) | q8_k (llama.cpp K/TQ types) | ort_int8[:block] (onnxruntime accuracy level 4, block 32 by "
        "default) | llamacpp (per layer, the scheme of the GGUF type `winq export --format gguf` picks for it); "
        "recorded in winq.json, checked by the exporters (stored resolved: winq.actplan.plan_record)", cli_type=str)

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
