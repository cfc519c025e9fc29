"""One source of training defaults: `winq train`'s options take their defaults from QuantConfig / TrainConfig."""

from __future__ import annotations

import dataclasses
import inspect

from typer.testing import CliRunner

from winq.cli.main import app, train
from winq.config import QuantConfig, TrainConfig

# options of `winq train` that are not a config field, or whose CLI form differs
NOT_FIELDS = {"model", "data", "calib_data", "teacher", "out", "resume", "overwrite", "threads", "progress",
              "hessian_every"}


def test_every_train_option_default_is_the_dataclass_default():
    params = inspect.signature(train).parameters
    q, t = QuantConfig(), TrainConfig()
    checked = 0
    for name, p in params.items():
        if name in NOT_FIELDS:
            continue
        cfg = q if name in {f.name for f in dataclasses.fields(QuantConfig)} else t
        want = getattr(cfg, name) if name != "grid" else None  # grid: None means "the default for --bits"
        got = p.default
        if name == "reinit_every":
            got = got if got == "auto" else int(got)
        assert got == want, f"--{name.replace('_', '-')}: CLI default {got!r}, {type(cfg).__name__}.{name} {want!r}"
        checked += 1
    assert checked >= 25
    fields = {f.name for f in dataclasses.fields(QuantConfig)} | {f.name for f in dataclasses.fields(TrainConfig)}
    internal = {"skip", "warmup_steps", "weight_decay", "min_lr_ratio", "max_grad_norm", "log_every", "diag_every",
                "diag_sample"}  # library-only settings
    assert fields - set(params) <= internal, sorted(fields - set(params) - internal)


def test_help_shows_the_dataclass_defaults():
    res = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    for flag, value in (("--steps", TrainConfig.steps), ("--lr", TrainConfig.lr), ("--bits", QuantConfig.bits),
                        ("--group-size", QuantConfig.group_size), ("--init", QuantConfig.init),
                        ("--batch-size", TrainConfig.batch_size), ("--distill", TrainConfig.distill)):
        assert flag in text and f"[default: {value}]" in text, (flag, value)
