"""Training loop: WinQ resets and noise, qat baseline, exact resume after a kill, DDP on gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from winq import QuantConfig, TrainConfig
from winq.errors import CheckpointError, ConfigError
from winq.train import lr_factor, train

REPO = Path(__file__).resolve().parents[2]


# the loop's mechanics, in the plain regime these tests were written for: cross-entropy (no teacher), the reference
# init, no periodic eval (the quality recipe's defaults are tested in tests/winq/test_calibrate.py)
PLAIN = dict(distill=0.0, keep_best=False, eval_every=0)


def _run(tiny, text, out, method="winq", steps=8, **kw):
    tcfg = TrainConfig(
        method=method, steps=steps, lr=kw.pop("lr", 2e-3), seq_len=16, batch_size=2, seed=kw.pop("seed", 0),
        **{**PLAIN, **kw}
    )
    qcfg = QuantConfig(bits=2, group_size=-1, embed="float", init="max")
    return train(str(tiny), str(text), qcfg, tcfg, out, progress=False)


def test_lr_schedule_warmup_then_cosine():
    t = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    f = [lr_factor(s, t) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone decay after warm-up
    assert f[-1] == pytest.approx(0.1, abs=1e-3)


def test_winq_run_resets_on_schedule_and_learns(tiny_llama, text_file, tmp_path):
    res = _run(tiny_llama, text_file, tmp_path / "w", steps=12, reinit_every=4)
    steps = [r for r in res.records if "loss" in r]
    assert [r["step"] for r in steps if r["reset"]] == [4, 8]  # not at the final step 12
    assert steps[-1]["loss"] < steps[0]["loss"]
    info = json.loads((tmp_path / "w" / "winq.json").read_text())
    assert info["train"]["method"] == "winq" and info["step"] == 12 and len(info["quantized_modules"]) == 14
    lines = (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == list(range(1, 13))


def test_qat_baseline_has_no_reset_and_no_noise(tiny_llama, text_file, tmp_path):
    res = _run(tiny_llama, text_file, tmp_path / "q", method="qat", steps=8, reinit_every=2)
    assert not any(r.get("reset") for r in res.records)
    cfg = TrainConfig(method="qat", reinit_every=2, noise_sigma=0.5)
    assert cfg.effective_reinit_every == 0 and cfg.effective_noise == 0.0
    # same seed and data: WinQ (noise + resets) ends somewhere else than QAT
    _run(tiny_llama, text_file, tmp_path / "w", method="winq", steps=8, reinit_every=2)
    a = load_file(str(tmp_path / "q" / "model.safetensors"))
    b = load_file(str(tmp_path / "w" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_result(tiny_llama, text_file, tmp_path):
    _run(tiny_llama, text_file, tmp_path / "a", steps=4, reinit_every=2)
    _run(tiny_llama, text_file, tmp_path / "b", steps=4, reinit_every=2)
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_grad_accumulation_matches_bigger_batch(tiny_llama, text_file, tmp_path):
    base = dict(method="qat", steps=3, lr=1e-3, seq_len=16, seed=3)
    train(
        str(tiny_llama),
        str(text_file),
        QuantConfig(bits=4, group_size=-1, embed="float"),
        TrainConfig(batch_size=2, grad_accum=1, **base),
        tmp_path / "b2",
        progress=False,
    )
    train(
        str(tiny_llama),
        str(text_file),
        QuantConfig(bits=4, group_size=-1, embed="float"),
        TrainConfig(batch_size=1, grad_accum=2, **base),
        tmp_path / "a2",
        progress=False,
    )
    a = load_file(str(tmp_path / "b2" / "model.safetensors"))
    b = load_file(str(tmp_path / "a2" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)


def test_bf16_precision_runs(tiny_llama, text_file, tmp_path):
    res = _run(tiny_llama, text_file, tmp_path / "bf", steps=3, precision="bf16")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in res.records if "loss" in r)


def test_periodic_eval_logs_heldout_loss(tiny_llama, text_file, tmp_path):
    res = _run(tiny_llama, text_file, tmp_path / "e", steps=4, eval_every=2, eval_batches=2)
    evals = [(r["step"], r["eval_loss"]) for r in res.records if "eval_loss" in r]
    assert [s for s, _ in evals] == [0, 2, 4]


def test_refuses_existing_output_and_bad_resume(tiny_llama, text_file, tmp_path):
    _run(tiny_llama, text_file, tmp_path / "x", steps=2)
    with pytest.raises(CheckpointError, match="--resume"):
        _run(tiny_llama, text_file, tmp_path / "x", steps=2)
    with pytest.raises(CheckpointError, match="no winq checkpoint"):
        train(
            str(tiny_llama),
            str(text_file),
            QuantConfig(group_size=-1, embed="float"),
            TrainConfig(),
            tmp_path / "empty",
            resume=True,
            progress=False,
        )
    with pytest.raises(ConfigError, match="method"):
        TrainConfig(method="sgd")


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from winq import QuantConfig, TrainConfig
    from winq.train import train
    model, data, out, kill_at, resume = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
    schedule = dict(reinit_every=3) if sys.argv[6] == "fixed" else dict(
        reinit_every="auto", reinit_trigger=sys.argv[6], reinit_travel=0.02, reinit_flip=0.5, reinit_min_steps=2)
    torch_threads = 1
    import torch; torch.set_num_threads(1)
    def cb(rec):
        if rec["step"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a real crash: no cleanup, no final save
    tcfg = TrainConfig(method="winq", steps=8, lr=2e-3, seq_len=16, batch_size=2, save_every=2, seed=5, **schedule)
    qc = QuantConfig(bits=2, group_size=16, embed="float")
    train(model, data, qc, tcfg, out, resume=resume, callbacks=[cb], progress=False)
    """
)


def _script(tmp_path, *args):
    p = tmp_path / "kill.py"
    p.write_text(KILL_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, str(p), *map(str, args)], env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("schedule", ["fixed", "travel"])
def test_exact_resume_after_kill(tiny_llama, text_file, tmp_path, schedule):
    """A run killed mid-way and resumed ends bit for bit where an uninterrupted one does: weights, losses,
    WinQ noise stream, and (adaptive schedule) the diagnostics and the reset decisions."""
    # uninterrupted reference run
    r = _script(tmp_path, tiny_llama, text_file, tmp_path / "full", -1, 0, schedule)
    assert r.returncode == 0, r.stderr
    # killed after step 5 (last checkpoint: step 4), then resumed to the end
    r = _script(tmp_path, tiny_llama, text_file, tmp_path / "cut", 5, 0, schedule)
    assert r.returncode == -9, r.stderr
    assert json.loads((tmp_path / "cut" / "trainer_state" / "state.json").read_text())["step"] == 4
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name or ".old" in p.name]  # no half-written folders
    r = _script(tmp_path, tiny_llama, text_file, tmp_path / "cut", -1, 1, schedule)
    assert r.returncode == 0, r.stderr
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: max diff {(a[k] - b[k]).abs().max()}"
    la_all = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    lb_all = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    evals = ("eval_loss", "eval_kl")  # the step-0 and final held-out evaluations (keep_best compares them)
    assert [{k: x.get(k) for k in evals} for x in la_all] == [{k: x.get(k) for k in evals} for x in lb_all]
    la, lb = [x for x in la_all if "loss" in x], [x for x in lb_all if "loss" in x]
    assert [x["loss"] for x in la] == [x["loss"] for x in lb]
    assert [x["step"] for x in lb] == list(range(1, 9))
    diag = ("flip_rate", "flips_since_reset", "oscillation", "boundary_margin", "travel", "lr_travel", "reset_info")
    assert [{k: x.get(k) for k in diag} for x in la] == [{k: x.get(k) for k in diag} for x in lb]
    resets = [x["reset_info"] for x in la if x["reset"]]
    assert resets, "the schedule never fired: the test would not show that its state resumes"
    if schedule == "travel":
        assert all(r["trigger"] == "travel" and r["travel"] >= 0.02 for r in resets)


def _launch(tmp_path, name, extra_env, nproc, common, batch):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra_env)
    launcher = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(29531 + nproc + len(extra_env)),
        ]
        if nproc > 1
        else [sys.executable]
    )
    cmd = [
        *launcher,
        "-m",
        "winq.cli.main",
        "train",
        *common,
        "--batch-size",
        str(batch),
        "--out",
        str(tmp_path / name),
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    info = json.loads((tmp_path / name / "winq.json").read_text())
    recs = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return info, recs, load_file(str(tmp_path / name / "model.safetensors"))


FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_USE_ORIG_PARAMS": "true", "FSDP_AUTO_WRAP_POLICY": "NO_WRAP"}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp", "ddp-auto"])
def test_two_processes_gloo_match_one_process(engine, tiny_llama, text_file, tmp_path):
    """torchrun with 2 CPU processes (gloo; DDP or FSDP through accelerate) = one process with twice the
    batch, WinQ noise and resets included (every rank draws the same noise), up to reduction order.
    ddp-auto: the adaptive (travel) schedule makes the same reset decisions on both ranks and as one process."""
    steps = "8" if engine == "ddp-auto" else "4"
    schedule = (
        ["--reinit-every", "auto", "--reinit-travel", "0.02", "--reinit-min-steps", "2"]
        if engine == "ddp-auto"
        else ["--reinit-every", "2"]
    )
    common = [
        "--model",
        str(tiny_llama),
        "--data",
        str(text_file),
        "--steps",
        steps,
        "--seq-len",
        "16",
        "--method",
        "winq",
        *schedule,
        "--bits",
        "2",
        "--lr",
        "1e-3",
        "--no-progress",
        "--seed",
        "2",
        # the loop's mechanics, as written: no teacher, the reference init, per-row scales, float tables, no evals
        "--distill", "0", "--keep-last", "--init", "max", "--group-size", "-1", "--embed", "float", "--eval-every", "0",
    ]
    info, recs, a = _launch(tmp_path, engine, FSDP_ENV if engine == "fsdp" else {}, 2, common, 1)
    assert info["world_size"] == 2
    resets = [r["step"] for r in recs if r.get("reset")]
    if engine == "ddp-auto":
        assert resets and all(r["reset_info"]["trigger"] == "travel" for r in recs if r.get("reset"))
    else:
        assert resets == [2]
    _, recs1, b = _launch(tmp_path, "one", {}, 1, common, 2)
    assert [r["step"] for r in recs1 if r.get("reset")] == resets
    for k in b:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)
    for x, y in zip(recs, recs1):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
