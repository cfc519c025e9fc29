"""Does training on llama.cpp's activation quantizers lower llama.cpp's perplexity?

For each bit width, the default model is trained twice with the same seed, data, steps and lr: once with float
activations (`--act-quant none`) and once with the activation quantizers llama.cpp's CPU backend will apply to the
export (straight-through gradient): `q8_0` at 4 bits (every layer is Q4_0), `llamacpp` at 2 bits (a per-layer
plan: q8_0 for the 576-wide rows in Q4_0 containers, q8_k for down_proj in Q2_K). Each checkpoint is exported to
GGUF (`--type auto --keep f16`) and evaluated on PTB test with

    winq eval --backend fakequant,llamacpp [--act llamacpp] --max-tokens 4096 --threads 1 --json

(plain fake-quant vs llama.cpp, then fake-quant emulating llama.cpp's activations vs llama.cpp).

    python benchmarks/actquant.py [--reuse] [--bits 4 2] [--workdir runs/actquant] [--out results/actquant.json]
    python -m winq.benchmarks.actquant ...

Every command runs as a subprocess, one at a time, under `nice -n 10` with one torch thread (`--threads 1`), and
logs to WORKDIR/logs/. `--reuse` keeps a finished checkpoint whose winq.json has this script's settings, an export
newer than its checkpoint and an eval result newer than its export (so an interrupted run continues where it
stopped; the record says what was reused). Writes results/actquant.json (settings, every command, perplexities,
relative gaps, KL, top-1 agreement, training losses, the exports' act-quant check) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Training budget: 30 steps of 1 x 256 PTB tokens for every run (`winq train`'s default). lr: the default 5e-5 at
# 4 bits (the README's measurements); at 2 bits the default lr leaves the model at loss 10.7 (ppl ~40,000), so the
# 2-bit pair uses lr 1e-3, the lr of the convergence study's default-model sweep (results/convergence.json).
BUDGET = {4: {"steps": 30, "lr": 5e-05}, 2: {"steps": 30, "lr": 1e-3}}
ACT = {4: "q8_0", 2: "llamacpp"}  # llama.cpp's activation quantizers for each width's GGUF export
SEED = 0


def winq_cmd() -> list[str]:
    exe = shutil.which("winq")
    return [exe] if exe else [sys.executable, "-m", "winq.cli.main"]


def show(cmd: list[str]) -> str:
    return " ".join(["winq", *cmd[1:]] if Path(cmd[0]).name == "winq" else cmd)


class Runner:
    def __init__(self, workdir: Path, nice: int, reuse: bool):
        self.workdir, self.nice, self.reuse = workdir, nice, reuse
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.commands: list[dict] = []

    def run(self, name: str, args: list[str], stdout: Path | None = None, skip: bool = False) -> dict:
        """Run `winq args` (unless `skip`: its output is reused); log to logs/NAME.log, stdout to `stdout`."""
        cmd = winq_cmd() + args
        full = (["nice", "-n", str(self.nice)] if self.nice else []) + cmd
        meta_file = self.logs / f"{name}.meta.json"
        rec = {"name": name, "command": ("nice -n %d " % self.nice if self.nice else "") + show(cmd)}
        if skip:
            old = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
            rec.update(reused=True, seconds=old.get("seconds"))
            print(f"[reuse] {rec['command']}", flush=True)
            self.commands.append(rec)
            return rec
        print(f"[run] {rec['command']}", flush=True)
        t0 = time.time()
        with open(self.logs / f"{name}.log", "w") as log:
            out = open(stdout, "w") if stdout else log
            try:
                p = subprocess.run(full, stdout=out, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            finally:
                if stdout:
                    out.close()
        rec.update(reused=False, seconds=round(time.time() - t0, 1), rc=p.returncode)
        meta_file.write_text(json.dumps(rec, indent=2) + "\n")
        self.commands.append(rec)
        if p.returncode != 0:
            tail = (self.logs / f"{name}.log").read_text()[-3000:]
            raise SystemExit(f"{name} failed (exit {p.returncode}); log tail:\n{tail}")
        return rec


def _newer(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and a.stat().st_mtime >= b.stat().st_mtime


def _trained_as_wanted(ck: Path, bits: int, act: str, budget: dict) -> bool:
    f = ck / "winq.json"
    if not f.is_file():
        return False
    info = json.loads(f.read_text())
    tr, q = info.get("train") or {}, info.get("quant") or {}
    stored = tr.get("act_quant")
    plan = stored.get("plan") if isinstance(stored, dict) else stored
    steps_done = info.get("step")
    return (q.get("bits") == bits and tr.get("steps") == budget["steps"] and tr.get("lr") == budget["lr"]
            and tr.get("seed") == SEED and plan == act and steps_done in (None, budget["steps"]))


def _losses(ck: Path) -> dict:
    rows = [json.loads(x) for x in (ck / "metrics.jsonl").read_text().splitlines() if x.strip()]
    loss = [r["loss"] for r in rows if "loss" in r]
    return {"final_loss": loss[-1], "mean_loss_last_10": sum(loss[-10:]) / len(loss[-10:]),
            "train_seconds_in_steps": round(sum(r.get("step_s", 0.0) for r in rows), 1), "steps": len(loss)}


def one_model(r: Runner, bits: int, act: str, args) -> dict:
    tag = f"b{bits}-{'none' if act == 'none' else 'act'}"
    ck = r.workdir / tag
    gdir = r.workdir / f"{tag}-gguf"
    gguf = gdir / "model.gguf"
    budget = BUDGET[bits]
    model = ["--model", args.model] if args.model else []
    train_args = ["train", *model, "--bits", str(bits), "--steps", str(budget["steps"]), "--lr", repr(budget["lr"]),
                  "--seed", str(SEED), "--threads", str(args.threads), "--act-quant", act, "--out", str(ck),
                  "--overwrite", "--no-progress"]
    skip = args.reuse and _trained_as_wanted(ck, bits, act, budget)
    tr = r.run(f"train-{tag}", train_args, skip=skip)
    info = json.loads((ck / "winq.json").read_text())
    stored = info["train"]["act_quant"]
    from winq.actplan import describe_act_quant

    out = {"checkpoint": str(ck), "train": {"command": tr["command"], "reused": tr["reused"], "seconds": tr["seconds"],
                                            "act_quant": describe_act_quant(stored), **_losses(ck)}}

    exp_args = ["export", "--format", "gguf", "--checkpoint", str(ck), "--out", str(gguf), "--overwrite"]
    skip = args.reuse and _newer(gdir / "winq-export.json", ck / "winq.json") and gguf.is_file()
    ex = r.run(f"export-{tag}", exp_args, skip=skip)
    man = json.loads((gdir / "winq-export.json").read_text())
    types: dict[str, int] = {}
    for t in man["tensors"]:
        k = str(t["container"]).split(":")[0].strip()
        types[k] = types.get(k, 0) + 1
    out["export"] = {"command": ex["command"], "reused": ex["reused"], "seconds": ex["seconds"], "gguf": str(gguf),
                     "bytes": gguf.stat().st_size, "types": types,
                     "bits_per_weight": man["summary"].get("bits_per_weight"),
                     "max_abs_err": man["summary"].get("max_abs_err"),
                     "act_quant_check": man["info"].get("act_quant")}

    out["eval"] = {}
    for mode in ("none", "llamacpp"):
        res_file = r.workdir / "evals" / f"{tag}-act-{mode}.json"
        res_file.parent.mkdir(parents=True, exist_ok=True)
        ev_args = ["eval", "--backend", "fakequant,llamacpp", "--checkpoint", str(ck), "--gguf", str(gguf),
                   "--data", "ptb", "--split", "test", "--max-tokens", str(args.max_tokens), "--threads",
                   str(args.threads), "--act", mode, "--json"]
        skip = args.reuse and _newer(res_file, gguf) and res_file.stat().st_size > 0
        ev = r.run(f"eval-{tag}-act-{mode}", ev_args, stdout=res_file, skip=skip)
        res = json.loads(res_file.read_text())
        fq, lc = res["results"]["fakequant"], res["results"]["llamacpp"]
        out["eval"][mode] = {"command": ev["command"], "reused": ev["reused"], "seconds": ev["seconds"],
                             "tokens": fq["tokens"], "windows": fq["windows"], "fakequant_ppl": fq["ppl"],
                             "llamacpp_ppl": lc["ppl"], "llamacpp_rel_diff": lc["ppl_rel_diff"], "kl": lc["kl"],
                             "top1_agreement": lc["top1_agreement"],
                             **({"act_plan": res["act"]["plan"], "act_schemes": res["act"]["schemes"]}
                                if "act" in res else {})}
    return out


def compare_pair(none: dict, act: dict) -> dict:
    """act-trained vs none-trained, on the same evaluation tokens."""
    def rel(a, b):
        return a / b - 1.0

    e0, e1 = none["eval"], act["eval"]
    return {
        "llamacpp_ppl_rel_change": rel(e1["none"]["llamacpp_ppl"], e0["none"]["llamacpp_ppl"]),
        "fakequant_ppl_rel_change": rel(e1["none"]["fakequant_ppl"], e0["none"]["fakequant_ppl"]),
        "fakequant_act_ppl_rel_change": rel(e1["llamacpp"]["fakequant_ppl"], e0["llamacpp"]["fakequant_ppl"]),
        "llamacpp_lower_with_act_training": e1["none"]["llamacpp_ppl"] < e0["none"]["llamacpp_ppl"],
    }


def table(results: dict) -> str:
    head = ("| bits | trained with | final loss (mean last 10) | fake-quant ppl | fake-quant `--act llamacpp` ppl | "
            "llama.cpp ppl | llama.cpp vs fake-quant (rel, KL, top-1) | llama.cpp vs `--act` (rel, KL, top-1) |")
    lines = [head, "|" + "---|" * 8]
    for bits, pair in results.items():
        for key in ("none", "act"):
            m = pair[key]
            e0, e1 = m["eval"]["none"], m["eval"]["llamacpp"]
            t = m["train"]
            lines.append(
                f"| {bits} | `{t['act_quant']}` | {t['final_loss']:.3f} ({t['mean_loss_last_10']:.3f}) | "
                f"{e0['fakequant_ppl']:.4f} | {e1['fakequant_ppl']:.4f} | {e0['llamacpp_ppl']:.4f} | "
                f"{e0['llamacpp_rel_diff']:+.2e}, {e0['kl']:.2e}, {e0['top1_agreement']:.4f} | "
                f"{e1['llamacpp_rel_diff']:+.2e}, {e1['kl']:.2e}, {e1['top1_agreement']:.4f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 2], choices=sorted(BUDGET))
    ap.add_argument("--workdir", type=Path, default=Path("runs/actquant"))
    ap.add_argument("--out", type=Path, default=Path("results/actquant.json"))
    ap.add_argument("--model", default=None, help="a local HF model folder instead of the built-in default model "
                    "(for a quick check of the script on a tiny model)")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--nice", type=int, default=10, help="niceness of every subprocess (0: none)")
    ap.add_argument("--reuse", action="store_true", help="keep finished steps whose outputs match (see above)")
    args = ap.parse_args(argv)
    t0 = time.time()
    r = Runner(args.workdir, args.nice, args.reuse)
    results = {}
    for bits in args.bits:
        pair = {"none": one_model(r, bits, "none", args), "act": one_model(r, bits, ACT[bits], args)}
        pair["compare"] = compare_pair(pair["none"], pair["act"])
        results[str(bits)] = pair
    import torch

    record = {
        "benchmark": "actquant",
        "question": "does training with llama.cpp's activation quantizers (--act-quant, straight-through) lower "
                    "llama.cpp's perplexity of the GGUF export?",
        "command": " ".join(["python", "benchmarks/actquant.py", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {"model": args.model or "built-in default (SmolLM2-135M-Instruct)", "seed": SEED,
                     "budget": {str(b): {**BUDGET[b], "seq_len": 256, "batch_size": 1} for b in args.bits},
                     "act_quant": {str(b): ACT[b] for b in args.bits}, "data": "ptb (train / test)",
                     "eval_max_tokens": args.max_tokens, "eval_seq_len": 512, "threads": args.threads,
                     "nice": args.nice, "export": "gguf --type auto --keep f16"},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "commands": r.commands,
        "results": results,
        "wall_seconds": round(time.time() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(table(results))
    for bits, pair in results.items():
        c = pair["compare"]
        print(f"{bits}-bit: llama.cpp ppl {c['llamacpp_ppl_rel_change']:+.2%} with act-quant training "
              f"(fake-quant {c['fakequant_ppl_rel_change']:+.2%}, "
              f"fake-quant --act {c['fakequant_act_ppl_rel_change']:+.2%})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
