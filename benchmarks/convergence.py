"""Does WinQ converge faster than plain QAT (ParetoQ)? The study, with the evidence for its answer.

A WinQ reset W <- 0.2 W + 0.8 Q(W) keeps every code and parks each weight >= 0.4 step from a
rounding boundary; codes move again only once the weights have travelled that far. The
reference resets every 60k steps at lr 2e-5 (about one step s of travel per interval, after
QAT has plateaued); a short run that resets every quarter of its budget copies the ratio, not
the travel. So every run logs winq.diagnostics (flip_rate, oscillation, boundary_margin,
travel, lr_travel) and the study compares, with the same seed, data order, schedule and budget:

  phase 1  cost: seconds per step and peak RSS of plain fp32 fine-tuning, QAT and WinQ, with the
           fused quantizer and the old composite one (autograd over W + noise, W / alpha, ...)
           and with/without the diagnostics; default model, one process at a time
           today's regime on the default model (lr 1e-4, reset every quarter): qat vs winq
           pretraining of the small model (benchmarks/small_model.py) for phases 2-3
  phase 2  lr sweep, qat vs winq (fixed reset every quarter), 2-bit seq, on the small model: a
           travel-rich regime (hundreds of cheap steps), though 2-bit weights cost that weak model
           almost nothing, so there is little for QAT to recover
  phase 3  on the default model, where 2-bit quantization is what QAT must recover: qat, winq,
           reset-only (noise 0), noise-only (no reset), winq-travel and winq-plateau
           (--reinit-every auto), 2-bit seq x 2 seeds and 4-bit lsq, at lr 1e-3 (where QAT did best
           among 1e-4 / 1e-3 in earlier probe runs), plus qat vs winq at the other swept lrs

Runs go through `winq train` as subprocesses, `--workers` at a time with `--threads` torch
threads each (QAT and WinQ of a setting side by side, so their step times see the same load).
Writes results/convergence.json (+ .png). The figure that counts: the step at which each method
first reaches QAT's final held-out loss, and QAT steps / that step.

    python benchmarks/convergence.py                     # the CPU study (about 2 hours on 2 cores)
    python benchmarks/convergence.py --preset gpu        # the same study sized for one H100 (unmeasured)
    python benchmarks/convergence.py --preset smoke      # a few steps of everything (checks the script)
    python benchmarks/convergence.py --cost-only         # phase 1's step cost alone, one process at a time
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"seq2": ("2", "seq"), "lsq4": ("4", "lsq"), "lsq3": ("3", "lsq"), "ternary2": ("2", "ternary")}
# method -> extra `winq train` arguments (besides --method); "{steps}" is the run's budget
METHODS = {
    "qat": ["--method", "qat"],
    # fixed period: a reset every quarter of the budget (`winq train` itself defaults to auto)
    "winq": ["--method", "winq", "--reinit-every", "-1"],
    "reset-only": ["--method", "winq", "--reinit-every", "-1", "--noise-sigma", "0"],
    "noise-only": ["--method", "winq", "--reinit-every", "{steps}"],  # a reset at the final step never happens
    "winq-travel": ["--method", "winq", "--reinit-every", "auto", "--reinit-trigger", "travel"],
    "winq-plateau": ["--method", "winq", "--reinit-every", "auto", "--reinit-trigger", "plateau"],
}
# one column per preset (gpu: sized for one H100, several small-model runs sharing it; not yet run on one)
# fmt: off
_PRESET_ROWS = {  # setting: (cpu, gpu, smoke)
    "steps": (400, 2000, 12),
    "seq_len": (128, 256, 32),
    "batch_size": (2, 16, 2),
    "eval_every": (25, 100, 4),
    "eval_batches": (16, 32, 2),
    "lrs": ([0.0003, 0.001, 0.003, 0.01], [0.0003, 0.001, 0.003], [0.001, 0.003]),
    "default_steps": (60, 1000, 3),
    "default_seq": (128, 512, 32),
    "default_eval_every": (20, 100, 3),
    "pretrain_steps": (600, 4000, 20),
    "cost_steps": (6, 20, 3),
    "abl_steps": ({'seq2': 100, 'lsq4': 50}, {'seq2': 2000, 'lsq4': 2000}, {'seq2': 4, 'lsq4': 4}),
    "abl_seq": (64, 256, 16),
    "abl_lr": (0.001, 0.001, 0.001),
    "abl_lrs_extra": ([], [0.0003, 0.003], [0.003]),
    "abl_eval_every": (20, 100, 2),
    "abl_eval_batches": (8, 32, 2),
    "travel": (0.5, 0.5, 0.01),
    "plateau_flip": (0.1, 0.1, 0.5),
    "min_steps": (20, 50, 2),
    "scratch_steps": (2000, 8000, 8),
    "scratch_batch": (4, 32, 2),
    "scratch_lr": (0.003, 0.003, 0.003),
    "scratch_eval_every": (100, 400, 4),
    "scratch_travel": (1.0, 1.0, 0.01),
    "threads": (1, 0, 1),
    "workers": (2, 4, 2),
}
# fmt: on
PRESETS = {name: {k: v[i] for k, v in _PRESET_ROWS.items()} for i, name in enumerate(("cpu", "gpu", "smoke"))}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- running `winq train` jobs ---------------------------------------------------------------
def train_cmd(job: dict, a: argparse.Namespace) -> list[str]:
    bits, grid = SETTINGS[job["setting"]]
    extra = [x.replace("{steps}", str(job["steps"])) for x in METHODS[job["method"]]]
    cmd = [
        sys.executable,
        "-m",
        "winq.cli.main",
        "train",
        "--bits",
        bits,
        "--grid",
        grid,
        *extra,
        "--steps",
        str(job["steps"]),
        "--lr",
        str(job["lr"]),
        "--seq-len",
        str(job["seq_len"]),
        "--batch-size",
        str(job["batch_size"]),
        "--data",
        "ptb",
        "--eval-every",
        str(job["eval_every"]),
        "--eval-batches",
        str(job["eval_batches"]),
        "--seed",
        str(job["seed"]),
        "--out",
        str(job["out"]),
        "--overwrite",
        "--no-progress",
        "--reinit-travel",
        str(job.get("travel", a.p["travel"])),
        "--reinit-flip",
        str(a.p["plateau_flip"]),
        "--reinit-min-steps",
        str(a.p["min_steps"]),
    ]
    if job["model"]:
        cmd += ["--model", job["model"]]
    if a.p["threads"]:
        cmd += ["--threads", str(a.p["threads"])]
    return cmd


def run_jobs(jobs: list[dict], a: argparse.Namespace) -> None:
    """Run the jobs `a.p['workers']` at a time (in order); each job's records land in job['records']."""
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < a.p["workers"]:
            job = pending.pop(0)
            metrics = Path(job["out"]) / "metrics.jsonl"
            same_as = job.get("same_as")  # winq-travel: identical to noise-only when the trigger cannot fire
            if same_as is not None and same_as.get("records"):
                top = max((r.get("travel", 0.0) for r in same_as["records"]), default=0.0)
                if top < a.p["travel"]:
                    job["records"] = same_as["records"]
                    job["implied"] = (
                        f"not run: identical to {same_as['name']}, whose travel never reached "
                        f"{a.p['travel']} (max {top:.4f}), so the travel trigger cannot fire"
                    )
                    log(f"{job['name']}: {job['implied']}")
                    continue
            if a.summarize_only:
                finished = (Path(job["out"]) / "winq.json").exists() and metrics.exists()
                job["records"] = (
                    [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if finished else None
                )
                if job.get("kind") == "pretrain-metrics" or "cost" in job.get("kind", ""):
                    job["records"] = []
                log(f"{'loaded' if finished else 'not run'}: {job['name']}")
                continue
            if a.reuse and job.get("kind") == "pretrain-metrics" and (Path(job["out"]) / "pretrain.json").exists():
                log(f"reused {job['name']}")
                continue
            if a.reuse and (Path(job["out"]) / "winq.json").exists() and metrics.exists():
                job["records"] = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
                log(f"reused {job['name']}")
                continue
            job["cmd"] = job.get("cmd") or train_cmd(job, a)
            logf = open(Path(a.workdir) / f"{job['name']}.log", "w")
            job["t0"] = time.time()
            running.append((subprocess.Popen(job["cmd"], stdout=logf, stderr=subprocess.STDOUT, env=a.env), job, logf))
            log(f"started {job['name']}")
        time.sleep(2)
        for p, job, logf in list(running):
            if p.poll() is None:
                continue
            running.remove((p, job, logf))
            logf.close()
            if p.returncode != 0:
                raise SystemExit(f"{job['name']} failed (exit {p.returncode}); see {a.workdir}/{job['name']}.log")
            job["wall_s"] = round(time.time() - job["t0"], 1)
            if "metrics" not in job.get("kind", "train"):
                metrics = Path(job["out"]) / "metrics.jsonl"
                if metrics.exists():
                    job["records"] = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
            log(f"finished {job['name']} in {job['wall_s']} s")


# ---- summaries ------------------------------------------------------------------------------
def summarise_run(recs: list[dict]) -> dict:
    ev = [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r]
    steps = [r for r in recs if "loss" in r]
    ts = [r["step_s"] for r in steps][1:] or [r["step_s"] for r in steps]
    resets = [r.get("reset_info", {"step": r["step"]}) for r in steps if r.get("reset")]
    # travel at the end of each interval between resets (and the last stretch)
    travel_per_interval, lr_travel_per_interval = [], []
    for i, r in enumerate(steps):
        nxt = steps[i + 1] if i + 1 < len(steps) else None
        if "travel" in r and (r.get("reset") or nxt is None):
            if r.get("reset"):
                travel_per_interval.append(r["reset_info"].get("travel", r["travel"]))
                lr_travel_per_interval.append(r["reset_info"].get("lr_travel", r["lr_travel"]))
            else:
                travel_per_interval.append(r["travel"])
                lr_travel_per_interval.append(r["lr_travel"])
    keys = ("flip_rate", "flips_since_reset", "oscillation", "boundary_margin", "travel", "lr_travel")
    stride = max(1, -(-len(steps) // 500))
    kept = [r for i, r in enumerate(steps) if i % stride == 0 or r.get("reset") or i == len(steps) - 1]
    return {
        "eval_curve": ev,
        "final_eval_loss": ev[-1][1] if ev else None,
        "final_ppl": math.exp(ev[-1][1]) if ev else None,
        # the stored per-step curves: at most ~500 points a run (every step up to 500 steps); the summaries above and
        # below use every step
        "train_curve": [(r["step"], r["loss"]) for r in kept],
        "diagnostics": {k: [(r["step"], r[k]) for r in kept if k in r] for k in keys},
        "mean_flip_rate_after_first_reset": (
            statistics.mean(
                [r["flip_rate"] for r in steps if "flip_rate" in r and resets and r["step"] > resets[0]["step"]]
            )
            if resets and any(r["step"] > resets[0]["step"] for r in steps)
            else None
        ),
        "mean_flip_rate": statistics.mean([r["flip_rate"] for r in steps if "flip_rate" in r])
        if steps and "flip_rate" in steps[0]
        else None,
        "resets": resets,
        "travel_per_interval": travel_per_interval,
        "lr_travel_per_interval": lr_travel_per_interval,
        "median_step_s": statistics.median(ts) if ts else None,
    }


def reach_step(curve: list, target: float) -> int | None:
    return next((s for s, l in curve if s > 0 and l <= target + 1e-9), None)


def reach_step_interp(curve: list, target: float) -> float | None:
    """The first step at which the held-out curve reaches `target`, linearly interpolated between evaluations."""
    prev = None
    for s, l in curve:
        if s > 0 and l <= target + 1e-9:
            if prev is None or prev[1] <= l:
                return float(s)
            return prev[0] + (s - prev[0]) * (prev[1] - target) / (prev[1] - l)
        prev = (s, l)
    return None


def steps_ratio_by_target(ref_curve: list, curve: list) -> list:
    """For each evaluation (step s, loss L) of the reference after its first: s over the (interpolated) step at
    which `curve` first reaches L. Above 1: the method got there in fewer steps."""
    out = []
    for s, l in ref_curve:
        if s <= 0:
            continue
        st = reach_step_interp(curve, l)
        out.append((s, round(s / st, 4) if st else None))
    return out


def compare(runs: dict[str, dict], ref: str = "qat") -> dict:
    """Steps to reach the reference's final held-out loss (and each of its earlier evaluations), and the step-time
    ratio, per method."""
    q = runs[ref]
    final_step, target = q["eval_curve"][-1][0], q["final_eval_loss"]
    out = {}
    for name, r in runs.items():
        st = reach_step(r["eval_curve"], target)
        by_target = steps_ratio_by_target(q["eval_curve"], r["eval_curve"])
        reached = [x for _, x in by_target if x is not None]
        out[name] = {
            "final_eval_loss": r["final_eval_loss"],
            "step_reaching_qat_final": st,
            "steps_ratio_qat_over_method": (final_step / st) if st else None,
            "steps_ratio_by_qat_eval": by_target,
            "median_steps_ratio_over_qat_evals": statistics.median(reached) if reached else None,
            "step_time_ratio_vs_qat": (r["median_step_s"] / q["median_step_s"])
            if r["median_step_s"] and q["median_step_s"]
            else None,
        }
    return out


# ---- phase 1: the cost of a step ------------------------------------------------------------
COST_CONFIGS = ("fp32", "qat-composite", "winq-composite", "qat-nodiag", "qat", "winq-sync", "winq")


def cost_worker(config: str, steps: int, seq_len: int, threads: int, out: str) -> None:
    """One process: `steps` optimizer steps of `config` on the default model; writes step times and peak RSS."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from winq import QuantConfig, TrainConfig

    times = []
    if config == "fp32":
        from winq.data import PackedBlocks, batch_indices, token_ids
        from winq.evaluate import lm_loss
        from winq.models import load_base_model

        model, tok, _ = load_base_model(None)
        model.train()
        blocks = PackedBlocks(token_ids("ptb", "train", tok), seq_len)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95))
        for s in range(steps):
            t0 = time.perf_counter()
            lm_loss(model, blocks.batch(batch_indices(len(blocks), 0, s, 1))).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
    else:
        import winq.train as wt
        from winq.qlinear import QuantLinear

        method = config.split("-")[0]
        if config.endswith("composite"):
            # the quantizer before the fused one: autograd over the composite expression, noise drawn per layer
            gen = torch.Generator().manual_seed(1)

            def composite_forward(self, x):
                import torch.nn.functional as F

                if self.training and self.noise_sigma > 0:
                    self.eps_w = torch.randn(self.weight.shape, generator=gen)
                    self.eps_a = torch.randn(self.alpha.shape, generator=gen)
                return F.linear(x, self.fake_weight(noise=self.training), self.bias)

            class NoNoiseSource:
                def __init__(self, *a, **k):
                    pass

                def state_dict(self):
                    return {}

                def remove(self):
                    pass

            QuantLinear.forward = composite_forward
            wt.NoiseSource = NoNoiseSource
        elif config == "winq-sync":  # the noise drawn before the forward, not beside it (as before the side thread)
            import functools

            wt.NoiseSource = functools.partial(wt.NoiseSource, background=False)
        tcfg = TrainConfig(
            method=method,
            steps=steps,
            lr=1e-4,
            seq_len=seq_len,
            batch_size=1,
            reinit_every=10**6,
            diag_every=0 if ("nodiag" in config or "composite" in config) else 1,
        )
        res = wt.train(
            None, "ptb", QuantConfig(bits=2), tcfg, Path(out) / f"ck-{config}", overwrite=True, progress=False
        )
        times = [r["step_s"] for r in res.records if "step_s" in r]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB (Linux: kB)
    Path(out, cost_file(config, threads)).write_text(
        json.dumps({"config": config, "threads": threads, "step_s": times, "peak_rss_mb": rss})
    )


def cost_file(config: str, threads: int) -> str:
    return f"cost-{config}.json" if threads in (0, 1) else f"cost-{config}-t{threads}.json"


def cost_jobs(a, configs=COST_CONFIGS, threads: int | None = None) -> list[dict]:
    threads = a.p["threads"] or 0 if threads is None else threads
    jobs = []
    for c in configs:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--cost-worker",
            c,
            "--steps",
            str(a.p["cost_steps"]),
            "--seq-len",
            "256",
            "--threads",
            str(threads),
            "--workdir",
            str(a.workdir),
        ]
        jobs.append({"name": cost_file(c, threads)[:-5], "kind": "cost-metrics", "cmd": cmd, "out": str(a.workdir)})
    return jobs


def cost_summary(a, threads: int = 1) -> dict:
    """The measured configs at `threads` torch threads (those without a file are left out), and their ratios."""
    res = {}
    for c in COST_CONFIGS:
        f = Path(a.workdir, cost_file(c, threads))
        if not f.exists():
            continue
        d = json.loads(f.read_text())
        ts = d["step_s"][1:] or d["step_s"]
        # the fastest step: the other core runs other jobs, and the minimum is the least disturbed figure
        res[c] = {
            "min_step_s": min(ts),
            "step_s": [round(t, 3) for t in d["step_s"]],
            "peak_rss_mb": round(d["peak_rss_mb"]),
            "measured_at": time.strftime("%Y-%m-%d %H:%M", time.gmtime(f.stat().st_mtime)),
        }

    def ratio(key, x, y):
        return round(res[x][key] / res[y][key], 3) if x in res and y in res else None

    pairs = {
        "winq_over_qat_step_time": ("min_step_s", "winq", "qat"),
        "winq_sync_over_qat_step_time": ("min_step_s", "winq-sync", "qat"),
        "winq_over_qat_step_time_composite": ("min_step_s", "winq-composite", "qat-composite"),
        "diagnostics_overhead": ("min_step_s", "qat", "qat-nodiag"),
        "fused_over_composite_step_time_qat": ("min_step_s", "qat", "qat-composite"),
        "peak_rss_winq_over_fp32": ("peak_rss_mb", "winq", "fp32"),
        "peak_rss_qat_over_fp32": ("peak_rss_mb", "qat", "fp32"),
        "peak_rss_winq_composite_over_fp32": ("peak_rss_mb", "winq-composite", "fp32"),
    }
    res["ratios"] = {k: v for k, (key, x, y) in pairs.items() if (v := ratio(key, x, y)) is not None}
    return res


# ---- the study ----------------------------------------------------------------------------------
def job(a, name, setting, method, lr, seed, model, steps, seq, eval_every, eval_batches=None) -> dict:
    return {
        "name": name,
        "setting": setting,
        "method": method,
        "lr": lr,
        "seed": seed,
        "model": model,
        "steps": steps,
        "seq_len": seq,
        "batch_size": a.p["batch_size"] if model != a.default_model else 1,
        "eval_every": eval_every,
        "eval_batches": eval_batches or a.p["eval_batches"],
        "out": str(Path(a.workdir) / name),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, v) for k, v in result["studies"].items()]
    ncol = min(4, len(panels))
    nrow = -(-len(panels) // ncol)  # each study: loss on top, flip rate below
    fig, axes = plt.subplots(2 * nrow, ncol, figsize=(5.5 * ncol, 7.0 * nrow), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    colors = {
        "qat": "tab:blue",
        "winq": "tab:red",
        "reset-only": "tab:orange",
        "noise-only": "tab:green",
        "winq-travel": "tab:purple",
        "winq-plateau": "tab:brown",
    }
    for i, (title, study) in enumerate(panels):
        ax, ax2 = axes[2 * (i // ncol)][i % ncol], axes[2 * (i // ncol) + 1][i % ncol]
        ax.set_visible(True)
        ax2.set_visible(True)
        for name, r in study["runs"].items():
            if r.get("implied"):
                continue  # identical to its noise-only twin
            c = colors.get(name, "gray")
            ec = r["eval_curve"]
            ax.plot(
                [x for x, _ in ec],
                [y for _, y in ec],
                "-",
                color=c,
                marker="o",
                ms=2,
                lw=1,
                label=f"{name} ({r['final_eval_loss']:.3f})",
            )
            fr = r["diagnostics"]["flip_rate"]
            ax2.semilogy([x for x, _ in fr], [max(y, 1e-7) for _, y in fr], "-", color=c, lw=0.7, alpha=0.8)
            for rs in r["resets"]:
                ax.axvline(rs["step"], color=c, ls=":", lw=0.6, alpha=0.6)
                ax2.axvline(rs["step"], color=c, ls=":", lw=0.6, alpha=0.6)
        ax.set_title(title, fontsize=9)
        if title.startswith("from scratch"):  # the loss falls from 9.3: show the last three quarters, where they differ
            last = max(s for r in study["runs"].values() for s, _ in r["eval_curve"])
            ys = [y for r in study["runs"].values() for s, y in r["eval_curve"] if s >= last / 4]
            ax.set_ylim(min(ys) - 0.01, max(ys) + 0.01)
            ax.set_xlim(last / 4, last * 1.01)
            short = title.replace(" (small model's architecture)", "").replace(", lr 0.003, 2000 steps", "")
            ax.set_title(f"{short}, steps {int(last / 4)}-{last}", fontsize=9)
        ax.set_ylabel("held-out loss (nats)")
        ax.legend(fontsize=6)
        ax2.set_xlabel("optimizer step")
        ax2.set_ylabel("flip rate per step (floor 1e-7); dotted: resets")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--workdir", default="runs/convergence")
    ap.add_argument("--out", default="results/convergence.json")
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs found in --workdir")
    ap.add_argument("--skip", default="", help="comma-separated phases to skip: cost, default, small, scratch")
    ap.add_argument(
        "--cost-configs", default="", help=f"with --cost-only: which of {', '.join(COST_CONFIGS)} (default all)"
    )
    ap.add_argument(
        "--cost-threads", default="1", help="with --cost-only: comma-separated torch thread counts (default 1)"
    )
    ap.add_argument("--tables", action="store_true", help="print the README's markdown tables from the --out JSON")
    ap.add_argument(
        "--summarize-only",
        action="store_true",
        help="launch nothing: summarise the finished runs in --workdir (unfinished ones are listed as not run)",
    )
    ap.add_argument(
        "--cost-only",
        action="store_true",
        help="measure only the step cost, one process at a time, and put it into the existing --out JSON",
    )
    ap.add_argument("--cost-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=6, help=argparse.SUPPRESS)
    ap.add_argument("--seq-len", type=int, default=256, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> None:
    a = parse_args()
    if a.cost_worker:
        return cost_worker(a.cost_worker, a.steps, a.seq_len, a.threads, a.workdir)
    if a.tables:
        return print_tables(json.loads(Path(a.out).read_text()))
    a.p = dict(PRESETS[a.preset])
    p = a.p
    if a.cost_only:
        return cost_only(a)
    skip = set(filter(None, a.skip.split(",")))
    a.workdir = Path(a.workdir)
    a.workdir.mkdir(parents=True, exist_ok=True)
    a.env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    a.default_model = None
    small = str(a.workdir / "ptb-small")
    t0 = time.time()
    result = {
        "benchmark": "convergence",
        "command": "python " + " ".join(sys.argv),
        "preset": a.preset,
        "settings": p,
        "machine": f"{os.cpu_count()} CPU cores; {p['workers']} runs at a time, "
        f"{p['threads'] or 'default'} torch threads each",
        "studies": {},
    }
    default_phase(a, result, skip, small)
    if "small" in skip:
        return finish(result, a, t0)
    pre = json.loads(Path(small, "pretrain.json").read_text())
    result["small_model"] = {"path": "benchmarks/small_model.py", **pre}
    sweep_phase(a, result, small)
    ablation_phase(a, result)
    if "scratch" not in skip:
        result["scratch"] = scratch_phase(a, result)
    finish(result, a, t0)


def _done(j: dict) -> bool:
    """Has the job's run finished (with --summarize-only, unfinished runs are left out)?"""
    return j.get("records") is not None


def default_phase(a, result: dict, skip: set, small: str) -> None:
    """Phase 1: step cost and today's regime on the default model, beside the small model's pretraining."""
    p = a.p
    jobs1 = []
    if "small" not in skip:
        jobs1.append(
            {
                "name": "pretrain-ptb-small",
                "kind": "pretrain-metrics",
                "out": small,
                "cmd": [
                    sys.executable,
                    str(REPO / "benchmarks" / "small_model.py"),
                    "--steps",
                    str(p["pretrain_steps"]),
                    "--threads",
                    str(p["threads"] or 0 or 2),
                    "--out",
                    small,
                ],
            }
        )
    default_runs = {}
    if "default" not in skip:
        for method in ("qat", "winq"):
            j = job(
                a,
                f"default-seq2-{method}-lr1e-4",
                "seq2",
                method,
                1e-4,
                0,
                None,
                p["default_steps"],
                p["default_seq"],
                p["default_eval_every"],
            )
            default_runs[method] = j
            jobs1.append(j)
    if "cost" not in skip:
        jobs1 += cost_jobs(a)
    run_jobs(jobs1, a)
    if "cost" not in skip:
        result["cost"] = cost_summary(a)
        result["cost"]["setup"] = (
            f"default model, 2-bit seq, 1 x 256 tokens per step, {p['cost_steps']} steps, fastest after the first, "
            "one process per config"
        )
        log(f"cost: {result['cost']['ratios']}")
    if default_runs:
        runs = {m: summarise_run(j["records"]) for m, j in default_runs.items()}
        result["studies"]["default model, 2-bit seq, lr 1e-4, reset every quarter (today's regime)"] = {
            "model": "smollm2-135m (built-in, Q4_1 weights)",
            "runs": runs,
            "compare": compare(runs),
        }


def sweep_phase(a, result: dict, small: str) -> None:
    """Phase 2: lr sweep, qat vs winq, 2-bit seq, small model."""
    p = a.p
    sweep = {}
    jobs2 = []
    for lr in p["lrs"]:
        for method in ("qat", "winq"):
            j = job(
                a,
                f"small-seq2-{method}-lr{lr:g}-s0",
                "seq2",
                method,
                lr,
                0,
                small,
                p["steps"],
                p["seq_len"],
                p["eval_every"],
            )
            sweep[(lr, method)] = j
            jobs2.append(j)
    run_jobs(jobs2, a)
    sweep_res = {}
    for lr in p["lrs"]:
        runs = {m: summarise_run(sweep[(lr, m)]["records"]) for m in ("qat", "winq")}
        sweep_res[f"{lr:g}"] = {"runs": runs, "compare": compare(runs)}
    best = min(p["lrs"], key=lambda lr: sweep_res[f"{lr:g}"]["runs"]["qat"]["final_eval_loss"] or 1e9)
    result["lr_sweep"] = {
        "setting": "seq2",
        "best_qat_lr": best,
        "final_eval_loss": {k: {m: v["runs"][m]["final_eval_loss"] for m in v["runs"]} for k, v in sweep_res.items()},
        "compare": {k: v["compare"] for k, v in sweep_res.items()},
    }
    for lr in p["lrs"]:
        result["studies"][f"small model, 2-bit seq, lr {lr:g} (sweep)"] = {"model": "ptb-small", **sweep_res[f"{lr:g}"]}
    log(f"best QAT lr: {best}")


ABLATION_ORDER = (("seq2", 0), ("lsq4", 0), ("seq2", 1))  # (setting, seed) of phase 3's ablation


def ablation_phase(a, result: dict) -> None:
    """Phase 3: the ablation on the default model (its quantization error is what QAT must recover; the small
    model loses almost nothing to 2-bit weights), 2-bit x 2 seeds and 4-bit x 1 seed, plus qat vs winq at the
    other lrs of the default-model sweep."""
    p = a.p
    lr3 = p["abl_lr"]
    abl, dsweep, jobs3 = ablation_jobs(a)
    run_jobs(jobs3, a)
    default_lr_sweep(a, result, abl, dsweep)
    ablation, missing = {}, [j["name"] for j in jobs3 if not _done(j)]
    for setting in ("seq2", "lsq4"):
        ablation[setting] = ablation_summary(a, result, abl, setting)
    result["ablation"] = {
        "model": "smollm2-135m (built-in)",
        "lr": lr3,
        "steps": p["abl_steps"],
        "seq_len": p["abl_seq"],
        "batch_size": 1,
        **ablation,
        "not_run": missing,
    }


def ablation_jobs(a) -> tuple[dict, dict, list]:
    """Phase 3's jobs: ({(setting, method, seed): job}, {(lr, method): job} of the extra lrs, every job in the order
    they run)."""
    p = a.p
    lr3 = p["abl_lr"]
    jobs3, abl = [], {}

    def ajob(setting, method, lr, seed):
        name = f"default-{setting}-{method}-lr{lr:g}-s{seed}-abl"
        steps = p["abl_steps"][setting]
        return job(
            a, name, setting, method, lr, seed, None, steps, p["abl_seq"], p["abl_eval_every"], p["abl_eval_batches"]
        )

    order = ABLATION_ORDER
    for setting, seed in order:
        for method in METHODS:
            abl[(setting, method, seed)] = ajob(setting, method, lr3, seed)
    # the headline first (2-bit seed 0, then seed 1's qat / noise-only / winq), then 4-bit, then the rest;
    # winq-travel last, after its noise-only twin: identical to it (and not run) when the travel never reaches T
    first = [("seq2", m, 0) for m in METHODS if m != "winq-travel"]
    first += [("seq2", m, 1) for m in ("qat", "noise-only", "winq")]
    first += [("lsq4", m, 0) for m in METHODS if m != "winq-travel"]
    first += [("seq2", m, 1) for m in ("reset-only", "winq-plateau")]
    first += [(st, "winq-travel", sd) for st, sd in order]
    for key in first:
        if key[1] == "winq-travel":
            abl[key]["same_as"] = abl[(key[0], "noise-only", key[2])]
        jobs3.append(abl[key])
    dsweep = {}
    for lr in p["abl_lrs_extra"]:
        for method in ("qat", "winq"):
            dsweep[(lr, method)] = j = ajob("seq2", method, lr, 0)
            jobs3.append(j)
    return abl, dsweep, jobs3


def default_lr_sweep(a, result: dict, abl: dict, dsweep: dict) -> None:
    """qat vs winq on the default model at the ablation's lr and the extra lrs: result["lr_sweep_default_model"]
    and a study per extra lr."""
    p = a.p
    lr3 = p["abl_lr"]
    dres = {f"{lr3:g}": {m: summarise_run(abl[("seq2", m, 0)]["records"]) for m in ("qat", "winq")}}
    for lr in p["abl_lrs_extra"]:
        if all(_done(dsweep[(lr, m)]) for m in ("qat", "winq")):
            dres[f"{lr:g}"] = {m: summarise_run(dsweep[(lr, m)]["records"]) for m in ("qat", "winq")}
    result["lr_sweep_default_model"] = {
        "setting": "seq2",
        "steps": p["abl_steps"]["seq2"],
        "seq_len": p["abl_seq"],
        "final_eval_loss": {k: {m: v[m]["final_eval_loss"] for m in v} for k, v in dres.items()},
        "compare": {k: compare(v) for k, v in dres.items()},
    }
    for lr in p["abl_lrs_extra"]:
        if f"{lr:g}" in dres:
            runs = dres[f"{lr:g}"]
            result["studies"][f"default model, 2-bit seq, lr {lr:g} (sweep)"] = {"runs": runs, "compare": compare(runs)}


def ablation_summary(a, result: dict, abl: dict, setting: str) -> dict:
    """One setting's ablation: a study per seed in result["studies"], and per method its figures over the seeds."""
    p = a.p
    lr3 = p["abl_lr"]
    seeds = [sd for st, sd in ABLATION_ORDER if st == setting]
    per_seed = {}
    for seed in seeds:
        runs = {
            m: summarise_run(abl[(setting, m, seed)]["records"]) for m in METHODS if _done(abl[(setting, m, seed)])
        }
        if "qat" not in runs:
            continue
        for m in runs:
            if abl[(setting, m, seed)].get("implied"):
                runs[m]["implied"] = abl[(setting, m, seed)]["implied"]
        per_seed[seed] = {"runs": runs, "compare": compare(runs)}
        title = f"default model, {setting}, lr {lr3:g}, {p['abl_steps'][setting]} steps, seed {seed} (ablation)"
        result["studies"][title] = per_seed[seed]
    summary = {}
    for m in METHODS:
        ss = [sd for sd in per_seed if m in per_seed[sd]["runs"]]

        def cmp(sd, m=m):
            return per_seed[sd]["compare"][m]

        def run(sd, m=m):
            return per_seed[sd]["runs"][m]

        summary[m] = {
            "seeds": ss,
            "steps_ratio_per_seed": [cmp(sd)["steps_ratio_qat_over_method"] for sd in ss],
            "step_reaching_qat_final_per_seed": [cmp(sd)["step_reaching_qat_final"] for sd in ss],
            "final_eval_loss_per_seed": [cmp(sd)["final_eval_loss"] for sd in ss],
            "step_time_ratio_per_seed": [cmp(sd)["step_time_ratio_vs_qat"] for sd in ss],
            "travel_per_interval_per_seed": [run(sd)["travel_per_interval"] for sd in ss],
            "lr_travel_per_interval_per_seed": [run(sd)["lr_travel_per_interval"] for sd in ss],
            "resets_per_seed": [[r["step"] for r in run(sd)["resets"]] for sd in ss],
            "mean_flip_rate_after_first_reset_per_seed": [run(sd)["mean_flip_rate_after_first_reset"] for sd in ss],
            "mean_flip_rate_per_seed": [run(sd)["mean_flip_rate"] for sd in ss],
        }
    return summary


def scratch_phase(a, result: dict) -> dict:
    """Phase 4: 2-bit QAT from random initialisation (the small model's architecture and tokenizer), where the
    weights travel many quantization steps between resets and the held-out loss falls for the whole run, so
    "the step at which a method first reaches QAT's final loss" measures a convergence speed. Same seed, data
    order, cosine schedule and budget for every method; `winq` resets every quarter, `winq-travel` whenever the
    measured travel since the last reset reaches `scratch_travel` median steps."""
    p = a.p
    init = str(Path(a.workdir) / "ptb-small-init")
    run_jobs(
        [
            {
                "name": "init-ptb-small",
                "kind": "pretrain-metrics",
                "out": init,
                "cmd": [
                    sys.executable,
                    str(REPO / "benchmarks" / "small_model.py"),
                    "--steps",
                    "0",
                    "--out",
                    init,
                ],
            }
        ],
        a,
    )
    steps, lr = p["scratch_steps"], p["scratch_lr"]
    order, jobs = scratch_jobs(a, init)
    run_jobs([jobs[k] for k in order], a)
    out = {
        "model": "ptb-small architecture (benchmarks/small_model.py), random init, PTB word tokenizer",
        "lr": lr,
        "steps": steps,
        "seq_len": p["seq_len"],
        "batch_size": p["scratch_batch"],
        "travel_trigger": p["scratch_travel"],
        "not_run": [j["name"] for j in jobs.values() if not _done(j)],
    }
    for setting in ("seq2", "lsq4"):
        out[setting] = scratch_summary(a, result, order, jobs, setting)
    return out


def scratch_jobs(a, init: str) -> tuple[list, dict]:
    """Phase 4's jobs: ([(setting, method, seed) in the order they run], {key: job})."""
    p = a.p
    steps, lr = p["scratch_steps"], p["scratch_lr"]

    def sjob(setting, method, seed):
        j = job(
            a,
            f"scratch-{setting}-{method}-lr{lr:g}-{steps}-s{seed}",
            setting,
            method,
            lr,
            seed,
            init,
            steps,
            p["seq_len"],
            p["scratch_eval_every"],
        )
        j["batch_size"] = p["scratch_batch"]
        j["travel"] = p["scratch_travel"]
        return j

    # the 2-bit headline on 2 seeds, 4-bit on seed 0, then the rest of the 2-bit ablation and 4-bit's travel trigger
    headline = ("qat", "winq", "winq-travel")
    order = [("seq2", m, sd) for sd in (0, 1) for m in headline]
    order += [("lsq4", "qat", 0), ("lsq4", "winq", 0), ("seq2", "reset-only", 0), ("seq2", "noise-only", 0)]
    order += [("lsq4", "winq-travel", 0)]
    return order, {key: sjob(*key) for key in order}


def scratch_summary(a, result: dict, order: list, jobs: dict, setting: str) -> dict:
    """One setting of phase 4: a study per seed in result["studies"], and per method its figures over the seeds."""
    p = a.p
    steps, lr = p["scratch_steps"], p["scratch_lr"]
    per_seed = {}
    for seed in (0, 1):
        runs = {
            k[1]: summarise_run(jobs[k]["records"])
            for k in order
            if k[0] == setting and k[2] == seed and _done(jobs[k])
        }
        if "qat" not in runs:
            continue
        per_seed[seed] = {"runs": runs, "compare": compare(runs)}
        title = f"from scratch (small model's architecture), {setting}, lr {lr:g}, {steps} steps, seed {seed}"
        result["studies"][title] = {"model": "ptb-small architecture, random init", **per_seed[seed]}
    summary = {}
    for m in METHODS:
        ss = [sd for sd in per_seed if m in per_seed[sd]["runs"]]
        if not ss:
            continue
        cmp = [per_seed[sd]["compare"][m] for sd in ss]
        run = [per_seed[sd]["runs"][m] for sd in ss]
        summary[m] = {
            "seeds": ss,
            "final_eval_loss_per_seed": [c["final_eval_loss"] for c in cmp],
            "step_reaching_qat_final_per_seed": [c["step_reaching_qat_final"] for c in cmp],
            "steps_ratio_per_seed": [c["steps_ratio_qat_over_method"] for c in cmp],
            "median_steps_ratio_over_qat_evals_per_seed": [c["median_steps_ratio_over_qat_evals"] for c in cmp],
            "step_time_ratio_per_seed": [c["step_time_ratio_vs_qat"] for c in cmp],
            "travel_per_interval_per_seed": [r["travel_per_interval"] for r in run],
            "resets_per_seed": [[x["step"] for x in r["resets"]] for r in run],
            "mean_flip_rate_after_first_reset_per_seed": [r["mean_flip_rate_after_first_reset"] for r in run],
        }
    return summary


def _f(x, fmt="{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def print_tables(r: dict) -> None:
    """Markdown tables of a result file (the README's figures come from here, not from hand copies). Step times
    come only from the cost phase: the runs themselves shared the cores with different neighbours."""
    for title, st in r["studies"].items():
        runs = st["runs"]
        print(f"\n**{title}**\n")
        print(
            "| method | final held-out loss | step reaching QAT's final | QAT steps / that step "
            "| median over QAT's evaluations | resets (step: travel, lr bound) | mean flip rate after 1st reset |"
        )
        print("|---|---|---|---|---|---|---|")
        for m, run in runs.items():
            c = st["compare"][m]
            rs = (
                "; ".join(f"{x['step']}: {x.get('travel', 0):.3f}, {x.get('lr_travel', 0):.2f}" for x in run["resets"])
                or "none"
            )
            note = " (identical to noise-only, not run)" if run.get("implied") else ""
            print(
                f"| {m}{note} | {_f(run['final_eval_loss'])} | {_f(c['step_reaching_qat_final'], '{}')} | "
                f"{_f(c['steps_ratio_qat_over_method'], '{:.2f}')} | "
                f"{_f(c.get('median_steps_ratio_over_qat_evals'), '{:.2f}')} | {rs} | "
                f"{_f(run['mean_flip_rate_after_first_reset'], '{:.1e}')} |"
            )
    for setting in ("seq2", "lsq4"):
        ab = r.get("ablation", {}).get(setting)
        if not ab:
            continue
        print(f"\n**ablation summary, {setting}** (per seed)\n")
        print("| method | seeds | final held-out loss | QAT steps / method steps |")
        print("|---|---|---|---|")
        for m, v in ab.items():
            print(
                f"| {m} | {v['seeds']} | {', '.join(_f(x) for x in v['final_eval_loss_per_seed'])} | "
                f"{', '.join(_f(x, '{:.2f}') for x in v['steps_ratio_per_seed'])} |"
            )
    for setting in ("seq2", "lsq4"):
        sc = r.get("scratch", {}).get(setting)
        if not sc:
            continue
        print(f"\n**from scratch, {setting}** (per seed)\n")
        print(
            "| method | seeds | final held-out loss | step reaching QAT's final | QAT steps / method steps "
            "| median of QAT steps / method steps over QAT's evaluations | resets | travel per interval |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for m, v in sc.items():
            tr = " / ".join(", ".join(f"{x:.2f}" for x in t) for t in v["travel_per_interval_per_seed"])
            rs = " / ".join(", ".join(str(x) for x in t) or "none" for t in v["resets_per_seed"])
            med = ", ".join(_f(x, "{:.2f}") for x in v["median_steps_ratio_over_qat_evals_per_seed"])
            print(
                f"| {m} | {v['seeds']} | {', '.join(_f(x) for x in v['final_eval_loss_per_seed'])} | "
                f"{', '.join(_f(x, '{}') for x in v['step_reaching_qat_final_per_seed'])} | "
                f"{', '.join(_f(x, '{:.2f}') for x in v['steps_ratio_per_seed'])} | {med} | {rs} | {tr} |"
            )
    costs = {"1": r["cost"]} if "cost" in r else {}
    costs.update(r.get("cost_threads", {}))
    for n, cost in costs.items():
        print(f"\n**cost, {n} torch thread(s)**\n")
        print("| config | fastest step (s) | peak RSS (MB) |")
        print("|---|---|---|")
        for k, v in cost.items():
            if isinstance(v, dict) and "min_step_s" in v:
                print(f"| {k} | {v['min_step_s']:.2f} | {v['peak_rss_mb']} |")
        print(json.dumps(cost.get("ratios")))


def cost_only(a) -> None:
    """Re-measure phase 1's step cost alone (no other job on the machine) into the existing result file: at 1 torch
    thread into "cost", at each other count of --cost-threads into "cost_threads"[n]."""
    a.p["workers"] = 1
    a.workdir = Path(a.workdir)
    a.workdir.mkdir(parents=True, exist_ok=True)
    a.env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    configs = a.cost_configs.split(",") if a.cost_configs else COST_CONFIGS
    bad = sorted(set(configs) - set(COST_CONFIGS))
    if bad:
        raise SystemExit(f"--cost-configs: unknown {', '.join(bad)}; choose from {', '.join(COST_CONFIGS)}")
    out = Path(a.out)
    result = json.loads(out.read_text()) if out.exists() else {"benchmark": "convergence", "studies": {}}
    for n in [int(x) for x in a.cost_threads.split(",")]:
        run_jobs(cost_jobs(a, configs, threads=n), a)
        cost = cost_summary(a, threads=n)
        cost["setup"] = (
            f"default model, 2-bit seq, 1 x 256 tokens per step, {a.p['cost_steps']} steps, fastest after the first, "
            f"{n} torch thread(s), one process per config, one at a time"
        )
        cost["command"] = "python " + " ".join(sys.argv)
        if n == 1:
            result["cost"] = cost
        else:
            result.setdefault("cost_threads", {})[str(n)] = cost
        log(f"cost at {n} thread(s): {cost['ratios']}")
    out.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {out}")


def finish(result: dict, a, t0: float) -> None:
    result["wall_seconds"] = round(time.time() - t0, 1)
    out = Path(a.out)
    if out.exists():  # keep what this invocation did not measure (the cost phase of --cost-only, the run history)
        old = json.loads(out.read_text())
        for key in ("cost", "cost_threads", "run_history"):
            if key in old and key not in result:
                result[key] = old[key]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    if result["studies"]:
        plot(result, out.with_suffix(".png"))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
