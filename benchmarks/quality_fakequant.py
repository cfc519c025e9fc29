"""A cheap first look at a recipe: KL(float || fake-quant) and perplexity of winq checkpoints in PyTorch, on the
quality benchmark's held-out texts, without exporting or running llama.cpp.

    python benchmarks/quality_fakequant.py NAME=runs/winq [NAME2=runs/other ...]

Each checkpoint's fake-quant model (winq.checkpoint.load_checkpoint) and the float model it came from (the
default model unless --model) read the first --windows windows of 512 tokens of every text written by
`python benchmarks/quality.py texts` (no BOS; the second half of each window is scored, as llama-perplexity
does). Results go to results/quality_fakequant.json under NAME, with the checkpoint's recipe (data, init,
grid, steps). It ranks recipes in a minute each; the figures that count are llama.cpp's
(benchmarks/quality.py measure), which add llama.cpp's 8-bit activation rounding.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from winq.benchmarks import quality as Q

OUT = Q.ROOT / "results" / "quality_fakequant.json"
N_CTX = Q.N_CTX


def windows(tok, work, n_windows: int) -> dict[str, torch.Tensor]:
    out = {}
    for name in Q.TEXTS:
        path = Q.work_dir(work) / "texts" / f"{name}.txt"
        if not path.is_file():
            raise SystemExit(f"{path} missing: write the texts with `{Q.SCRIPT} texts`")
        ids = tok(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"][: n_windows * N_CTX]
        out[name] = torch.tensor(ids).view(-1, N_CTX)
    return out


@torch.no_grad()
def score(model, ref, texts: dict[str, torch.Tensor], ref_cache: dict) -> dict:
    model.eval()
    res = {}
    half = N_CTX // 2
    for name, x in texts.items():
        kl = nll = 0.0
        n = 0
        for i in range(0, x.shape[0], 2):
            b = x[i : i + 2]
            key = (name, i)
            if key not in ref_cache:
                ref_cache[key] = F.log_softmax(ref(input_ids=b).logits.float(), -1)[:, half:-1]
            rp = ref_cache[key]
            lp = F.log_softmax(model(input_ids=b).logits.float(), -1)[:, half:-1]
            kl += float((rp.exp() * (rp - lp)).sum())
            nll += float(-lp.gather(-1, b[:, half + 1 :, None]).sum())
            n += lp.shape[0] * lp.shape[1]
        res[name] = {"kl": round(kl / n, 5), "ppl": round(float(torch.exp(torch.tensor(nll / n))), 4), "n_scored": n}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="NAME=CHECKPOINT_DIR (NAME=float scores the float model itself)")
    ap.add_argument("--model", default=None, help="the float model (default: the built-in one)")
    ap.add_argument("--windows", type=int, default=4, help="windows of 512 tokens a text (default 4)")
    ap.add_argument("--work", default=None, help="the quality benchmark's work folder (its texts)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from winq.checkpoint import load_checkpoint
    from winq.models import load_base_model

    pairs = []
    for r in a.runs:
        name, sep, path = r.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{r!r}: write NAME=CHECKPOINT_DIR")
        pairs.append((name, path))
    ref, tok, _ = load_base_model(a.model)
    ref.eval()
    texts = windows(tok, a.work, a.windows)
    out = Path(a.out)
    report = json.loads(out.read_text()) if out.is_file() else {
        "benchmark": "quality_fakequant", "description": __doc__.strip().split("\n\n")[0], "points": {}}
    cache: dict = {}
    for name, path in pairs:
        t0 = time.perf_counter()
        if path == "float":
            model, info = ref, {}
        else:
            model, _, info = load_checkpoint(path)
        res = score(model, ref, texts, cache)
        train, quant = info.get("train", {}), info.get("quant", {})
        report["points"][name] = {
            "checkpoint": path, "texts": res, "seconds": round(time.perf_counter() - t0, 1),
            "recipe": {"data": info.get("data"), "calib_data": info.get("calib_data"), "grid": quant.get("grid"),
                       "bits": quant.get("bits"), "group_size": quant.get("group_size"), "init": quant.get("init"),
                       "steps": info.get("step"), "lr": train.get("lr"), "distill": train.get("distill"),
                       "seed": train.get("seed")},
            "windows": a.windows, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        print(name, json.dumps({t: (v["kl"], v["ppl"]) for t, v in res.items()}), flush=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
