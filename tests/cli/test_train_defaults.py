"""One source of training defaults: `winq train`'s options are generated from QuantConfig / TrainConfig's fields
(winq.config.option, cli/common.config_options): same names, defaults and help."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from typer.testing import CliRunner

from winq.cli import main as cli_main
from winq.cli.main import app, train
from winq.config import QuantConfig, TrainConfig

# options of `winq train` that are not a config field: where the text comes from, where the run goes
NOT_FIELDS = {"model", "data", "calib_data", "teacher", "out", "resume", "overwrite", "threads", "progress",
              "hessian_every"}
LIBRARY_ONLY = {"skip", "log_every", "diag_every", "diag_sample"}  # settings of the Python API only


def _fields():
    return [f for c in (QuantConfig, TrainConfig) for f in dataclasses.fields(c)]


def test_every_config_field_has_help_and_is_an_option_unless_library_only():
    params = inspect.signature(train).parameters
    for f in _fields():
        assert f.metadata.get("help"), f"{f.name}: a config field without help (use winq.config.option)"
        assert (f.name in params) == (f.name not in LIBRARY_ONLY), f.name
    assert set(params) - {f.name for f in _fields()} == NOT_FIELDS


def test_every_option_default_is_the_dataclass_default():
    params = inspect.signature(train).parameters
    checked = 0
    for f in _fields():
        if f.name in LIBRARY_ONLY:
            continue
        got = params[f.name].default
        want = str(f.default) if f.metadata["parse"] else f.default
        assert got == want, f"--{f.name.replace('_', '-')}: CLI default {got!r}, dataclass {f.default!r}"
        checked += 1
    assert checked == len(_fields()) - len(LIBRARY_ONLY) >= 30


def _help() -> str:
    res = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "250", "NO_COLOR": "1"})
    assert res.exit_code == 0, res.output
    return " ".join(res.output.split())


def test_help_shows_each_fields_help_and_default():
    text = _help()
    for f in _fields():
        if f.name in LIBRARY_ONLY:
            continue
        flag = (f.metadata["flag"] or "--" + f.name.replace("_", "-")).split("/")[0]
        assert flag in text, flag
        assert " ".join(f.metadata["help"].split())[:40] in text, f.name
        if f.default is not None and not isinstance(f.default, bool):
            assert f"[default: {f.default}]" in text, (flag, f.default)


def _capture(monkeypatch) -> dict:
    """Replace the library's train with one that records the configs the command built and stops."""
    seen = {}

    def fake_train(model, data, qcfg, tcfg, out, **kw):
        seen.update(q=qcfg, t=tcfg)
        raise SystemExit(0)

    monkeypatch.setattr("winq.train.train", fake_train)
    return seen


def test_options_reach_the_configs(monkeypatch, tmp_path):
    """Every option lands in its dataclass field: non-default values on the command line, configs compared."""
    seen = _capture(monkeypatch)
    args = ["train", "--bits", "3", "--group-size", "-1", "--init", "search", "--calib-tokens", "1024",
            "--embed", "float", "--quantize-lm-head", "--method", "qat", "--steps", "7", "--lr", "3e-4",
            "--scale-lr", "1e-3", "--weight-decay", "0.01", "--warmup-steps", "2", "--min-lr-ratio", "0.1",
            "--batch-size", "3", "--grad-accum", "2", "--seq-len", "64", "--reinit-every", "5",
            "--reinit-alpha", "0.5", "--noise-sigma", "0", "--max-grad-norm", "0", "--seed", "4",
            "--eval-every", "3", "--keep-last", "--distill", "0.5", "--out", str(tmp_path / "r")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert seen["q"] == QuantConfig(bits=3, group_size=-1, init="search", calib_tokens=1024, embed="float",
                                    quantize_lm_head=True)
    assert seen["t"] == TrainConfig(method="qat", steps=7, lr=3e-4, scale_lr=1e-3, weight_decay=0.01,
                                    warmup_steps=2, min_lr_ratio=0.1, batch_size=3, grad_accum=2, seq_len=64,
                                    reinit_every=5, reinit_alpha=0.5, noise_sigma=0.0, max_grad_norm=0.0, seed=4,
                                    eval_every=3, keep_best=False, distill=0.5)


def test_no_flags_give_the_dataclass_defaults(monkeypatch, tmp_path):
    seen = _capture(monkeypatch)
    res = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert seen["q"] == QuantConfig() and seen["t"] == TrainConfig()


@pytest.mark.parametrize("bad", ["sometimes", "1.5"])
def test_reinit_every_text_is_parsed_with_one_clear_error(bad, tmp_path):
    res = CliRunner().invoke(app, ["train", "--reinit-every", bad, "--out", str(tmp_path / "r")])
    assert res.exit_code == 1
    assert "--reinit-every" in res.output and "auto" in res.output
    assert not (tmp_path / "r").exists()


def test_config_options_refuses_a_clash():
    def cmd(bits: int = 1, **config):
        pass

    with pytest.raises(TypeError, match="clashing"):
        cli_main.config_options(QuantConfig, after="bits")(cmd)
