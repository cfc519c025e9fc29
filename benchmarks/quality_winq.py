"""winq's points on the quality chart (benchmarks/quality.py): train, export to GGUF, score in llama.cpp.

    python benchmarks/quality_winq.py --name winq-default-s0                      # the README's two commands
    python benchmarks/quality_winq.py --name winq-default-s1 --seed 1
    python benchmarks/quality_winq.py --name winq-30min-s0 --train-args "--steps 240"
    python benchmarks/quality_winq.py --name winq-step0-gptq --train-args "--steps 1 --lr 1e-12 --distill 0"

Each point runs `winq train` (today's defaults plus --train-args) into <work>/<name>, then
`winq export --format gguf` (defaults: Q4_0 layers, the Q8_0 table stored exactly), then
quality.measure_gguf (llama-perplexity: perplexity, KL divergence to the F16 file and top-1 agreement on
every held-out text) and quality.add_point, keeping the commands, the wall time of each command (the
10-minute goal is for the two commands together), the training's peak RSS and its held-out KL curve
(metrics.jsonl). Existing runs are reused unless --force.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

from winq.benchmarks import quality as Q


def _run(cmd: list[str], log: Path) -> float:
    """Run one command, its output appended to `log`; returns its wall time (s); raises on failure."""
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        raise SystemExit(f"{cmd[0]} {cmd[1]} failed with exit code {rc}: see {log}")
    return time.perf_counter() - t0


def point(name: str, seed: int, train_args: list[str], work: Path, force: bool = False) -> dict:
    run = work / name
    gguf = work / f"{name}-gguf" / "model.gguf"
    log = work / f"{name}.log"
    train_cmd = ["winq", "train", "--seed", str(seed), "--out", str(run), "--overwrite", "--no-progress",
                 *train_args]
    export_cmd = ["winq", "export", "--format", "gguf", "--checkpoint", str(run), "--out", str(gguf),
                  "--overwrite"]
    times = {}
    if force or not (run / "winq.json").is_file():
        times["train_s"] = round(_run(train_cmd, log), 1)
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
        times["train_peak_rss_mb"] = round(rss / 1024)
    if force or "train_s" in times or not gguf.is_file():
        times["export_s"] = round(_run(export_cmd, log), 1)
    m = Q.measure_gguf(gguf)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    info = json.loads((run / "winq.json").read_text())
    meta = {"family": "winq", "seed": seed, "commands": [shlex.join(train_cmd), shlex.join(export_cmd)], **times,
            "heldout_kl": [(r["step"], r["eval_kl"]) for r in recs if "eval_kl" in r],
            "init": info.get("init"), "kept": info.get("kept"), "train": info.get("train"), "quant": info.get("quant")}
    Q.add_point(name, m, meta)
    return {"name": name, **times, "texts": m["texts"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", required=True, help="the point's name in results/quality.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-args", default="", help="extra `winq train` options, one string")
    ap.add_argument("--work", default=None, help="run folder (default $WINQ_CACHE/quality/winq)")
    ap.add_argument("--force", action="store_true", help="train and export again even if the run exists")
    a = ap.parse_args(argv)
    work = Path(a.work) if a.work else Q.work_dir() / "winq"
    work.mkdir(parents=True, exist_ok=True)
    res = point(a.name, a.seed, shlex.split(a.train_args), work, a.force)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
