"""WinQ vs plain QAT (ParetoQ) convergence on the default model, side by side.

For each setting (2-bit seq, 4-bit lsq, per-row by default) the two methods run with the
same seed, data, schedule and step budget; WinQ resets W <- 0.2 W + 0.8 Q(W) every
quarter of the budget (as the reference scales its period) and adds sigma = 1e-3 noise.
Held-out loss (fixed PTB-valid blocks) is logged every --eval-every steps.

Both methods of a setting run at the same time, in two processes with --threads each, so
their per-step times are measured under the same load (the ratio is the figure to trust on
a shared 2-core machine). Writes results/convergence.json and results/convergence.png.

    python benchmarks/convergence.py                      # the CPU budget used for the README
    python benchmarks/convergence.py --steps 20000 --seq-len 1024 --batch-size 8 --threads 0   # GPU scale
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {"seq2": ("2", "seq"), "lsq4": ("4", "lsq"), "lsq3": ("3", "lsq"), "ternary2": ("2", "ternary")}


def run_pair(args, name: str, workdir: Path) -> dict:
    bits, grid = SETTINGS[name]
    procs = {}
    for method in ("qat", "winq"):
        out = workdir / f"{name}-{method}"
        cmd = [
            sys.executable, "-m", "winq.cli.main", "train", "--bits", bits, "--grid", grid, "--method", method,
            "--steps", str(args.steps), "--lr", str(args.lr), "--seq-len", str(args.seq_len),
            "--batch-size", str(args.batch_size), "--data", args.data, "--eval-every", str(args.eval_every),
            "--eval-batches", str(args.eval_batches), "--seed", str(args.seed), "--out", str(out), "--overwrite",
            "--no-progress", "--group-size", str(args.group_size),
        ]
        if args.model:
            cmd += ["--model", args.model]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        log = open(workdir / f"{name}-{method}.log", "w")
        procs[method] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), out, log)
        print(f"[{time.strftime('%H:%M:%S')}] started {name}/{method}: {' '.join(cmd[3:])}", flush=True)
    runs = {}
    for method, (p, out, log) in procs.items():
        rc = p.wait()
        log.close()
        if rc != 0:
            raise SystemExit(f"{name}/{method} failed (exit {rc}); see {workdir}/{name}-{method}.log")
        recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
        runs[method] = {"records": recs, "checkpoint": str(out)}
        print(f"[{time.strftime('%H:%M:%S')}] finished {name}/{method}", flush=True)
    return runs


def summarise(runs: dict) -> dict:
    def curve(method):
        return [(r["step"], r["eval_loss"]) for r in runs[method]["records"] if "eval_loss" in r]

    def train_curve(method):
        return [(r["step"], r["loss"]) for r in runs[method]["records"] if "loss" in r]

    def step_time(method):
        ts = [r["step_s"] for r in runs[method]["records"] if "step_s" in r][1:]  # the first step warms up
        return sum(ts) / len(ts)

    qat, winq = curve("qat"), curve("winq")
    qat_final = qat[-1][1]
    reach = next((s for s, l in winq if l <= qat_final), None)
    final_step = qat[-1][0]
    return {
        "qat": {"eval_curve": qat, "train_curve": train_curve("qat"), "final_eval_loss": qat_final,
                "final_ppl": math.exp(qat_final), "mean_step_s": step_time("qat")},
        "winq": {"eval_curve": winq, "train_curve": train_curve("winq"), "final_eval_loss": winq[-1][1],
                 "final_ppl": math.exp(winq[-1][1]), "mean_step_s": step_time("winq"),
                 "reset_steps": [r["step"] for r in runs["winq"]["records"] if r.get("reset")]},
        "winq_step_reaching_qat_final_loss": reach,
        "steps_ratio_qat_over_winq": (final_step / reach) if reach else None,
        "per_step_time_ratio_winq_over_qat": step_time("winq") / step_time("qat"),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["settings"])
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        s = result["settings"][name]
        for method, color in (("qat", "tab:blue"), ("winq", "tab:red")):
            tc = s[method]["train_curve"]
            ax.plot([x for x, _ in tc], [y for _, y in tc], color=color, alpha=0.2, lw=0.8)
            ec = s[method]["eval_curve"]
            ax.plot([x for x, _ in ec], [y for _, y in ec], "o-", color=color, ms=3,
                    label=f"{method} held-out (final ppl {s[method]['final_ppl']:.1f})")
        for r in s["winq"]["reset_steps"]:
            ax.axvline(r, color="tab:red", ls=":", lw=0.8)
        ax.set_title(f"{name}: train (faint) and held-out loss; dotted = WinQ reset")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder (default: built-in SmolLM2-135M)")
    ap.add_argument("--data", default="ptb")
    ap.add_argument("--settings", default="seq2,lsq4", help=f"comma-separated from {', '.join(SETTINGS)}")
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--group-size", type=int, default=-1)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (0: torch default)")
    ap.add_argument("--workdir", default="runs/convergence")
    ap.add_argument("--out", default="results/convergence.json")
    args = ap.parse_args()

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    settings = {}
    for name in args.settings.split(","):
        settings[name] = summarise(run_pair(args, name, workdir))
        s = settings[name]
        print(f"{name}: qat final ppl {s['qat']['final_ppl']:.2f}, winq final ppl {s['winq']['final_ppl']:.2f}, "
              f"winq reaches qat's final loss at step {s['winq_step_reaching_qat_final_loss']}, "
              f"time/step ratio {s['per_step_time_ratio_winq_over_qat']:.3f}", flush=True)
    result = {
        "benchmark": "convergence",
        "command": "python " + " ".join(sys.argv),
        "budget": {k: getattr(args, k) for k in ("steps", "lr", "seq_len", "batch_size", "group_size", "eval_every", "eval_batches", "seed", "threads", "data")},
        "tokens_per_run": args.steps * args.seq_len * args.batch_size,
        "held_out": f"first {args.eval_batches * args.batch_size} blocks of {args.seq_len} tokens of {args.data}/valid",
        "model": args.model or "smollm2-135m (built-in, Q4_1 weights)",
        "machine": f"{os.cpu_count()} CPU cores, torch threads per process {args.threads or 'default'}, QAT and WinQ run concurrently",
        "wall_seconds": round(time.time() - t0, 1),
        "settings": settings,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
