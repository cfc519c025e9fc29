"""The K grids (two-level scales learned, winq.kquant): their step-0 error against llama.cpp's own quantizer, and
their training-step cost against the uniform grid they replace.

    python benchmarks/kquant.py                  # -> results/kquant.json
    python benchmarks/kquant.py --reps 5 --threads 2

init: on the default model's ffn_down matrices (the rows that are whole 256-weight super-blocks there), the
relative squared error sum (W - Q(W))^2 / sum W^2 of winq's step-0 search (no calibration: kquant.search with
h = 1, then the super-block rounding) against the tensors llama.cpp's quantizer wrote for the same float weights
(llama_model_quantize without an imatrix; the files of `python benchmarks/quality.py baselines`, read back with
gguf-py), per K type found there.

step: two measurements, every grid timed in the same run (interleaved rounds, the median of each), so the ratio to
lsq 4-bit group 32 (the default grid, trained through the fused autograd layer) is the figure that counts:

* layer: forward + backward of one QuantLinear of the default model's ffn_down shape (576 x 1536, the one shape
  whose rows are whole 256-weight super-blocks there), 512 tokens, WinQ noise on, as in training;
* model: forward + backward (student only, no teacher) of the default model prepared with `--recipe` against
  the default grid, batch 2 x 256 tokens: on this model rows of 576 take the recipe's fallback types, so this is
  the whole-step cost a user of `winq train --recipe q4_k_m` sees.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "kquant.json"
INIT_FILES = ("q4_k_m", "q3_k_m", "q2_k")  # llama.cpp files (benchmarks/quality.py baselines) with K tensors
LAYER_GRIDS = (("lsq", 4, 32), ("nl4", 4, 32), ("affine", 4, 32), ("q4_k", 4, 32), ("q5_k", 5, 32), ("q6_k", 6, 16),
               ("q3_k", 3, 16), ("q2_k", 2, 16))


def _noise(model, layers: dict, sigma: float = 1e-3):
    """WinQ's noise as training draws it (winq.noise.NoiseSource, filled before each forward)."""
    from winq.noise import NoiseSource

    for m in layers.values():
        m.noise_sigma = sigma
    return NoiseSource(model, 0, layers, background=False)


def layer_times(reps: int, tokens: int = 512) -> dict:
    from winq.qlinear import QuantLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(1536, 576, bias=False)
    layers = {}
    for g, b, gs in LAYER_GRIDS:
        q = QuantLinear.from_linear(base, g, b, gs)
        q.train()
        _noise(q, {"layer": q})
        layers[f"{g}{b}-g{gs}"] = q
    x = torch.randn(tokens, 1536, requires_grad=True)
    times = {k: [] for k in layers}
    for _ in range(reps + 1):  # round 0 warms up
        for k, q in layers.items():
            t0 = time.perf_counter()
            q(x).square().mean().backward()
            times[k].append(time.perf_counter() - t0)
            q.zero_grad(set_to_none=True)
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def model_times(reps: int, recipes: tuple[str, ...]) -> dict:
    import winq
    from winq.models import load_base_model

    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (2, 257))
    nets = {}
    for name, cfg in [("lsq4-g32 (default)", winq.QuantConfig(init="max"))] + [
            (f"recipe {r}", winq.QuantConfig(recipe=r, init="max")) for r in recipes]:
        net, _, _ = load_base_model(None)
        winq.prepare(net, cfg)
        net.train()
        _noise(net, winq.quant_layers(net))
        nets[name] = net
    times = {k: [] for k in nets}
    for _ in range(reps + 1):
        for k, net in nets.items():
            t0 = time.perf_counter()
            out = net(input_ids=ids[:, :-1], labels=ids[:, 1:])
            out.loss.backward()
            times[k].append(time.perf_counter() - t0)
            net.zero_grad(set_to_none=True)
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def init_errors(work: Path | None = None) -> dict:
    """{K type: {n, winq, llamacpp, ratio}}: mean relative squared error over the ffn_down tensors of that type."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from winq.benchmarks.quality import work_dir
    from winq.grids import KFORMATS, KGRID_SUB
    from winq.kquant import kq_weight, search
    from winq.models import load_base_model

    net, _, _ = load_base_model(None)
    gguf_dir = work_dir(work) / "gguf"
    acc: dict[str, dict] = {}
    for f in INIT_FILES:
        path = gguf_dir / f"{f}.gguf"
        if not path.is_file():
            print(f"skipping {path}: run `python benchmarks/quality.py baselines --only llamacpp` first")
            continue
        for t in GGUFReader(str(path)).tensors:
            grid = t.tensor_type.name.lower()
            if grid not in KFORMATS or not t.name.endswith("ffn_down.weight"):
                continue
            i = int(t.name.split(".")[1])
            w = net.get_submodule(f"model.layers.{i}.mlp.down_proj").weight.detach().float()
            ref = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(w.shape).copy()).float()
            fmt = KFORMATS[grid]
            g = w.reshape(w.shape[0], -1, KGRID_SUB[grid])
            a, mu = search(g, None, fmt)
            ours = kq_weight(g, a, mu, fmt, ste=False).reshape(w.shape)
            den = float((w * w).sum())
            r = acc.setdefault(grid, {"tensors": 0, "winq": 0.0, "llamacpp": 0.0, "files": set()})
            r["tensors"] += 1
            r["files"].add(path.name)
            r["winq"] += float(((w - ours) ** 2).sum()) / den
            r["llamacpp"] += float(((w - ref) ** 2).sum()) / den
    return {k: {"tensors": v["tensors"], "files": sorted(v["files"]),
                "rel_sq_err_winq": round(v["winq"] / v["tensors"], 7),
                "rel_sq_err_llamacpp": round(v["llamacpp"] / v["tensors"], 7),
                "ratio": round(v["winq"] / v["llamacpp"], 4)} for k, v in acc.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipes", nargs="*", default=["q4_k_m", "q4_k"])
    ap.add_argument("--no-model", action="store_true", help="the layer measurement only")
    ap.add_argument("--no-init", action="store_true", help="skip the step-0 error against llama.cpp's quantizer")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    lay = layer_times(a.reps)
    ref = lay["lsq4-g32"]
    rep = {"what": __doc__.split("\n")[0], "command": "python benchmarks/kquant.py", "threads": a.threads,
           "reps": a.reps, "torch": torch.__version__, "machine": platform.machine(),
           "layer_576x1536_512tok": {k: {"s": round(v, 5), "ratio_to_lsq4": round(v / ref, 3)} for k, v in lay.items()}}
    if not a.no_model:
        mod = model_times(a.reps, tuple(a.recipes))
        mref = mod["lsq4-g32 (default)"]
        rep["model_fwd_bwd_2x256"] = {k: {"s": round(v, 3), "ratio_to_default": round(v / mref, 3)}
                                      for k, v in mod.items()}
    if not a.no_init:
        rep["init_vs_llamacpp_ffn_down"] = init_errors()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rep, indent=2) + "\n")
    print(json.dumps(rep, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
