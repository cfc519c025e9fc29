"""`winq train`: the adaptive reset options, and plain progress lines when stdout is not a terminal."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from winq.cli.main import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "400", "NO_COLOR": "1"})


def _train(model, data, out, *extra):
    return invoke(
        "train", "--model", model, "--data", data, "--seq-len", 16, "--out", out, "--bits", 2, "--lr", 3e-3, *extra
    )


def test_auto_reset_with_plain_progress_lines(tiny_llama, text_file, tmp_path):
    """CliRunner's stdout is not a terminal: a plain line per logged step (every 10th, the first and the last,
    and every reset) with the loss and the diagnostics, instead of a progress bar that prints nothing."""
    out = tmp_path / "auto"
    r = _train(
        tiny_llama,
        text_file,
        out,
        "--steps",
        12,
        "--reinit-every",
        "auto",
        "--reinit-trigger",
        "travel",
        "--reinit-travel",
        0.03,
        "--reinit-min-steps",
        2,
    )
    assert r.exit_code == 0, (r.output, r.exception)
    lines = [line for line in r.stdout.splitlines() if " step " in line]
    steps = [int(line.split(" step ")[1].split("/")[0]) for line in lines]
    assert steps[0] == 1 and steps[-1] == 12 and 10 in steps
    assert all("flip" in line and "travel" in line and "loss" in line for line in lines)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    resets = [rec["step"] for rec in recs if rec.get("reset")]
    assert resets and all(any(f"step {s}/12" in line and "[reset: travel]" in line for line in lines) for s in resets)
    info = json.loads((out / "winq.json").read_text())["train"]
    assert (info["reinit_every"], info["reinit_trigger"], info["reinit_travel"], info["reinit_min_steps"]) == (
        "auto",
        "travel",
        0.03,
        2,
    )


def test_bad_schedule_options_are_one_clean_error(tiny_llama, text_file, tmp_path):
    for extra, needles in (
        (("--reinit-every", "sometimes"), ("sometimes", "auto")),
        (("--reinit-every", "auto", "--reinit-trigger", "loss"), ("loss", "travel, plateau")),
        (("--reinit-every", "auto", "--reinit-flip", 1.5), ("reinit_flip=1.5",)),
    ):
        r = _train(tiny_llama, text_file, tmp_path / "bad", "--steps", 2, *extra)
        assert r.exit_code == 1, (extra, r.output)
        err = " ".join(r.stderr.split())
        assert "Traceback" not in r.output and all(n in err for n in needles), (extra, err)
        assert not (tmp_path / "bad").exists()


def test_inspect_checkpoint_shows_the_code_diagnostics(tiny_llama, text_file, tmp_path):
    out = tmp_path / "fixed"
    r = _train(tiny_llama, text_file, out, "--steps", 6, "--reinit-every", 2, "--no-progress")
    assert r.exit_code == 0, (r.output, r.exception)
    r = invoke("inspect", out, "--no-tensors")
    assert r.exit_code == 0, (r.output, r.exception)
    line = next(x for x in r.stdout.splitlines() if x.startswith("codes at step"))
    assert "codes at step 6:" in line and "boundary margin" in line and "resets at 2 (fixed), 4 (fixed)" in line
    rep = json.loads(invoke("inspect", out, "--no-tensors", "--json").stdout)
    d = rep["diagnostics"]
    assert d["logged_steps"] == 6 and [x["step"] for x in d["resets"]] == [2, 4]
    assert d["mean_flip_rate_after_first_reset"] is not None
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert d["last"]["flip_rate"] == recs[-1]["flip_rate"]
