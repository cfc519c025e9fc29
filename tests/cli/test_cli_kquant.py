"""`winq train --recipe q4_k_m` (llama.cpp's K-quant mix, sub-block scales trained) from the command line on a
256-aligned tiny Llama, its GGUF export (each tensor in the type it trained in, read-back error 0), and the one
clean error line of the refusals (an unknown recipe, a recipe against another grid, a K grid's group size)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_cli import assert_clean_error, flat, invoke, train_args


@pytest.fixture(scope="module")
def llama256(tmp_path_factory) -> Path:
    from tinymodels import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("m256") / "llama256", "llama", seed=0, hidden=256, inter=512)


@pytest.fixture(scope="module")
def ck_q4km(llama256, text_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli-kq") / "run"
    r = invoke(*train_args(llama256, text_file, out, "--recipe", "q4_k_m", "--calib-tokens", 512))
    assert r.exit_code == 0, (r.output, r.exception)
    return out


def test_train_help_lists_the_recipes():
    r = invoke("train", "--help")
    assert r.exit_code == 0 and "q4_k_m" in flat(r.stdout) and "q6_k" in flat(r.stdout)


def test_train_recipe_writes_it(ck_q4km):
    q = json.loads((ck_q4km / "winq.json").read_text())["quant"]
    assert (q["recipe"], q["grid"], q["bits"], q["group_size"]) == ("q4_k_m", "q4_k", 4, 32)


def test_export_recipe_to_gguf_writes_the_mix(ck_q4km, tmp_path):
    out = tmp_path / "model.gguf"
    r = invoke("export", "--format", "gguf", "--checkpoint", ck_q4km, "--out", out)
    assert r.exit_code == 0, (r.output, r.exception)
    assert "Q4_K" in r.stdout and "Q6_K" in r.stdout and "max error 0" in flat(r.stdout)
    m = json.loads((tmp_path / "winq-export.json").read_text())
    assert m["summary"]["max_abs_err"] == 0.0
    assert {t["container"].split(":")[0] for t in m["tensors"]} == {"Q4_K", "Q6_K"}


@pytest.mark.parametrize("extra,needles", [
    (("--recipe", "q4_k_l"), ("recipe='q4_k_l'", "q4_k_m")),
    (("--recipe", "q4_k_m", "--grid", "nl4"), ("recipe='q4_k_m' trains in q4_k", "drop grid='nl4'")),
    (("--grid", "q6_k", "--bits", "6"), ("grid 'q6_k'", "--group-size 16", "--recipe q6_k")),
])
def test_bad_recipes_are_refused(llama256, text_file, tmp_path, extra, needles):
    r = invoke(*train_args(llama256, text_file, tmp_path / "o", *extra))
    assert_clean_error(r, *needles)
    assert not (tmp_path / "o").exists()
