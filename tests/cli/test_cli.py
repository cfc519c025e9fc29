"""The `winq` command line: train and eval on a tiny model, and one clean error line for every refusal."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from winq.cli.main import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "400", "NO_COLOR": "1"})


def flat(s: str) -> str:
    return " ".join(s.split())


def assert_clean_error(r, *needles: str, one_line: bool = True) -> str:
    """exit code 1, one `error:` line on stderr naming `needles` (and nothing else when one_line), no traceback."""
    assert r.exit_code == 1, (r.exit_code, r.output, r.exception)
    assert isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    errors = [l for l in lines if l.startswith("error:")]
    assert len(errors) == 1, r.stderr
    if one_line:
        assert lines == errors, r.stderr
    err = flat(errors[0])
    for n in needles:
        assert n in err, (n, err)
    return err


def train_args(model, data, out, *extra):
    return ["train", "--model", model, "--data", data, "--steps", 3, "--seq-len", 16, "--out", out, "--no-progress",
            *extra]


@pytest.fixture(scope="module")
def ckpt(tiny_llama, text_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    r = invoke(*train_args(tiny_llama, text_file, out, "--bits", 2))
    assert r.exit_code == 0, (r.output, r.exception)
    assert "checkpoint:" in r.stdout and str(out) in flat(r.stdout)
    return out


# ---- happy paths ---------------------------------------------------------------------------------


def test_help_lists_commands():
    r = invoke("--help")
    assert r.exit_code == 0
    assert "train" in r.stdout and "eval" in r.stdout


def test_train_writes_a_checkpoint(ckpt, tiny_llama, text_file):
    for f in ("winq.json", "model.safetensors", "config.json", "metrics.jsonl"):
        assert (ckpt / f).is_file(), f
    assert (ckpt / "trainer_state" / "state.json").is_file()
    recs = [json.loads(l) for l in (ckpt / "metrics.jsonl").read_text().splitlines() if l.strip()]
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in steps)
    info = json.loads((ckpt / "winq.json").read_text())
    assert info["format"] == "winq-checkpoint"
    assert info["quant"]["bits"] == 2 and info["quant"]["grid"] == "seq"
    assert info["train"]["steps"] == 3 and info["train"]["seq_len"] == 16
    assert info["step"] == 3 and info["data"] == str(text_file)
    assert info["quantized_modules"] and all("lm_head" not in m for m in info["quantized_modules"])
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_eval_json(ckpt, text_file):
    r = invoke("eval", "--checkpoint", ckpt, "--data", text_file, "--seq-len", 32, "--json")
    assert r.exit_code == 0, (r.output, r.exception)
    out = json.loads(r.stdout)
    res = out["results"]["fakequant"]
    assert math.isfinite(res["ppl"]) and res["ppl"] > 1
    assert res["nll"] == pytest.approx(math.log(res["ppl"]), rel=1e-6)
    assert res["tokens"] > 0 and res["windows"] >= 1
    assert out["seq_len"] == 32 and out["stride"] == 31 and out["split"] == "test"


def test_eval_fakequant_and_fp_on_the_same_tokens(ckpt, tiny_llama, text_file):
    r = invoke("eval", "--backend", "fakequant,fp", "--checkpoint", ckpt, "--model", tiny_llama, "--data", text_file,
               "--seq-len", 32, "--max-tokens", 300, "--json")
    assert r.exit_code == 0, (r.output, r.exception)
    res = json.loads(r.stdout)["results"]
    assert list(res) == ["fakequant", "fp"]
    fq, fp = res["fakequant"], res["fp"]
    assert fq["tokens"] == fp["tokens"] > 0 and fq["windows"] == fp["windows"]
    assert all(math.isfinite(x["ppl"]) and x["ppl"] > 1 for x in (fq, fp))
    assert fq["ppl"] != fp["ppl"]  # the 2-bit trained checkpoint is not the base model


def test_eval_fp_alone_needs_no_checkpoint(tiny_llama, text_file):
    r = invoke("eval", "--backend", "fp", "--model", tiny_llama, "--data", text_file, "--seq-len", 32, "--max-tokens",
               100, "--json")
    assert r.exit_code == 0, (r.output, r.exception)
    res = json.loads(r.stdout)["results"]
    assert list(res) == ["fp"] and res["fp"]["tokens"] == 99


def test_eval_table(ckpt, text_file):
    r = invoke("eval", "--checkpoint", ckpt, "--data", text_file, "--seq-len", 32, "--max-tokens", 100)
    assert r.exit_code == 0, (r.output, r.exception)
    assert "fakequant" in r.stdout and "ppl" in r.stdout


def test_resume_a_finished_run_keeps_it(ckpt, tmp_path, tiny_llama, text_file):
    out = tmp_path / "again"
    shutil.copytree(ckpt, out)
    r = invoke(*train_args(tiny_llama, text_file, out, "--resume"))
    assert r.exit_code == 0, (r.output, r.exception)
    assert "resuming" in r.stderr
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs if "loss" in x] == [1, 2, 3]


# ---- refusals: exit 1, one line, no traceback ------------------------------------------------------


def test_bits_7(tiny_llama, text_file, tmp_path):
    out = tmp_path / "o"
    assert_clean_error(invoke(*train_args(tiny_llama, text_file, out, "--bits", 7)), "bits=7", "1, 2, 3, 4, 5, 6, 8")
    assert not out.exists()


def test_lsq_with_2_bits(tiny_llama, text_file, tmp_path):
    out = tmp_path / "o"
    assert_clean_error(invoke(*train_args(tiny_llama, text_file, out, "--bits", 2, "--grid", "lsq")), "lsq", "bits=2")
    assert not out.exists()


def test_unknown_grid(tiny_llama, text_file, tmp_path):
    assert_clean_error(invoke(*train_args(tiny_llama, text_file, tmp_path / "o", "--grid", "nf4")), "nf4", "seq", "lsq")


def test_unknown_method(tiny_llama, text_file, tmp_path):
    out = tmp_path / "o"
    assert_clean_error(invoke(*train_args(tiny_llama, text_file, out, "--method", "gptq")), "gptq", "winq", "qat")
    assert not out.exists()


def test_missing_model_folder(text_file, tmp_path):
    out = tmp_path / "o"
    assert_clean_error(invoke(*train_args(tmp_path / "no-model", text_file, out)), "no-model", "not found")
    assert not out.exists()


def test_eval_missing_checkpoint(tmp_path, text_file):
    assert_clean_error(invoke("eval", "--checkpoint", tmp_path / "gone", "--data", text_file), "gone", "not found")


def test_eval_folder_that_is_not_a_checkpoint(tiny_llama, text_file):
    assert_clean_error(invoke("eval", "--checkpoint", tiny_llama, "--data", text_file), "not a winq checkpoint")


def test_eval_without_checkpoint(text_file):
    assert_clean_error(invoke("eval", "--data", text_file), "--checkpoint")


def test_eval_unknown_backend(ckpt, text_file):
    assert_clean_error(invoke("eval", "--backend", "fakequant,tensorrt", "--checkpoint", ckpt, "--data", text_file),
                       "tensorrt", "choose from fakequant, packed, fp, gptq")


def test_eval_missing_data_file(ckpt, tmp_path):
    assert_clean_error(invoke("eval", "--checkpoint", ckpt, "--data", tmp_path / "nope.txt"), "nope.txt", "ptb", "sotu")


def test_eval_on_generated_data_is_refused_naming_train(ckpt):
    assert_clean_error(invoke("eval", "--checkpoint", ckpt, "--data", "generated"), "sampled from the model",
                       "winq train")


def test_train_on_a_mixture_with_generated_text(tiny_llama, text_file, tmp_path):
    out = tmp_path / "mix"
    r = invoke(*train_args(tiny_llama, f"{text_file}+generated:600", out, "--eval-every", 3))
    assert r.exit_code == 0, (r.output, r.exception)
    assert json.loads((out / "winq.json").read_text())["data"] == f"{text_file}+generated:600"


@pytest.mark.parametrize("spec", ["generated:12", "generated:lots"])
def test_train_on_a_bad_generated_count_is_refused(tiny_llama, tmp_path, spec):
    r = invoke(*train_args(tiny_llama, spec, tmp_path / "o"))
    assert_clean_error(r, f"data {spec!r}", "generated:N")
    assert not (tmp_path / "o").exists()


def test_train_with_too_little_held_out_text_to_evaluate_is_refused(tiny_llama, tmp_path):
    f = tmp_path / "small.txt"
    docs = [f"document number {i} says the market rose {i} points" for i in range(19)] + ["the end of it all"]
    f.write_text("\n\n".join(docs))  # the held-out 5%: the last document, a few tokens
    r = invoke(*train_args(tiny_llama, f, tmp_path / "o", "--eval-every", 2))
    assert_clean_error(r, "held-out data", "fewer than one evaluation block", "--eval-every 0")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags,what", [(["--eval-every", -1], "eval_every=-1"), (["--eval-batches", 0],
                                                                                  "eval_batches=0")])
def test_train_with_a_bad_evaluation_budget_is_refused(tiny_llama, text_file, tmp_path, flags, what):
    r = invoke(*train_args(tiny_llama, text_file, tmp_path / "o", *flags))
    assert_clean_error(r, what)
    assert not (tmp_path / "o").exists()


def test_eval_checkpoint_with_incomplete_winq_json(ckpt, tmp_path, text_file):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    (bad / "winq.json").write_text('{"format": "winq-checkpoint", "version": 1}')
    assert_clean_error(invoke("eval", "--checkpoint", bad, "--data", text_file), "winq.json")


def test_eval_bad_split(ckpt, text_file):
    assert_clean_error(invoke("eval", "--checkpoint", ckpt, "--data", text_file, "--split", "dev"), "dev", "valid")


def test_eval_bad_stride(ckpt, text_file):
    assert_clean_error(invoke("eval", "--checkpoint", ckpt, "--data", text_file, "--seq-len", 16, "--stride", 32),
                       "stride=32")


def test_train_into_an_existing_checkpoint_suggests_resume(ckpt, tmp_path, tiny_llama, text_file):
    out = tmp_path / "existing"
    shutil.copytree(ckpt, out)
    before = sorted(p.name for p in out.rglob("*"))
    assert_clean_error(invoke(*train_args(tiny_llama, text_file, out)), "--resume", "--overwrite")
    assert sorted(p.name for p in out.rglob("*")) == before


def test_resume_on_an_empty_folder(tmp_path, tiny_llama, text_file):
    out = tmp_path / "empty"
    out.mkdir()
    assert_clean_error(invoke(*train_args(tiny_llama, text_file, out, "--resume")), "--resume", "no winq checkpoint")
    assert list(out.iterdir()) == []


def test_failed_resume_prints_only_the_error(tmp_path, tiny_llama, text_file):
    out = tmp_path / "empty"
    out.mkdir()
    assert_clean_error(invoke(*train_args(tiny_llama, text_file, out, "--resume")), "no winq checkpoint")


def test_resume_on_a_missing_folder(tmp_path, tiny_llama, text_file):
    out = tmp_path / "missing"
    assert_clean_error(invoke(*train_args(tiny_llama, text_file, out, "--resume")), "no winq checkpoint")
    assert not out.exists()


def test_overwrite_refuses_a_folder_that_is_not_a_checkpoint(tmp_path, tiny_llama, text_file):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    assert_clean_error(invoke(*train_args(tiny_llama, text_file, out, "--overwrite")), "not a winq checkpoint")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me\n"


def test_failed_train_leaves_no_output_folder(tmp_path, tiny_llama):
    out = tmp_path / "never"
    assert_clean_error(invoke(*train_args(tiny_llama, tmp_path / "missing.txt", out)), "missing.txt", "ptb")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temp folders either


def test_train_on_too_little_data_leaves_no_output_folder(tmp_path, tiny_llama):
    data = tmp_path / "short.txt"
    data.write_text("the market rose\n\nthe market fell\n")
    out = tmp_path / "never"
    assert_clean_error(invoke(*train_args(tiny_llama, data, out)), "seq_len")
    assert not out.exists()


# ---- the real console script ---------------------------------------------------------------------


def test_console_script_error_exit_code_and_stderr(tmp_path, text_file):
    cmd = [sys.executable, "-m", "winq.cli.main"]
    env = {**os.environ, "COLUMNS": "400", "NO_COLOR": "1"}
    p = subprocess.run([*cmd, "eval", "--checkpoint", str(tmp_path / "gone"), "--data", str(text_file)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout
    assert p.stderr.startswith("error:") and "not found" in p.stderr and "gone" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert p.stdout == ""


def test_console_script_long_error_is_one_line_when_piped(tmp_path, text_file):
    cmd = [sys.executable, "-m", "winq.cli.main"]
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    gone = tmp_path / ("long-folder-name-" * 6) / "gone"
    p = subprocess.run([*cmd, "eval", "--checkpoint", str(gone), "--data", str(text_file)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [f"error: checkpoint {gone} not found"]


def test_a_diverged_run_does_not_block_a_rerun(tmp_path, tiny_llama, text_file):
    out = tmp_path / "run"
    assert_clean_error(invoke(*train_args(tiny_llama, text_file, out, "--bits", 2, "--lr", "1e12")), "loss became")
    r = invoke(*train_args(tiny_llama, text_file, out, "--bits", 2))
    assert r.exit_code == 0, r.stderr
