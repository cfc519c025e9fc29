"""Hessian spectrum of the default model: full precision, 2 and 4 bits, before and after a WinQ reset, along plain QAT.

For each bit width (2-bit seq, 4-bit lsq, per-row scales):
1. a short plain-QAT run (`winq.train.train(method="qat", hessian_every=K)`) logs the spectrum
   summary every K steps (lambda_max, lambda_min, trace, near-zero / positive / negative mass);
2. its final checkpoint is measured ("before reset"), then one WinQ reset
   W <- 0.2 W + 0.8 Q(W) is applied to every quantized layer and it is measured again ("after reset").
The full-precision model is measured on the same decoder Linear weights for reference.
Every spectrum uses the same fixed PTB-train batches and the same probe seed.

Writes results/hessian.json (summaries with densities, and the QAT trajectories) and
results/hessian.png (densities; lambda_max and near-zero share along the QAT runs).

Cost on the 2-core CPU machine: one spectrum = probes x steps HVPs at ~7.3 s each for one
1 x 128-token batch (1 thread), so the defaults (2 x 8 = 16 HVPs, 9 spectra, 2 x 20 QAT
steps) take roughly 30-40 minutes. Smoke test on a tiny model folder:

    python benchmarks/hessian.py --model tests/tiny --data some.txt --seq-len 16 --qat-steps 4 --hessian-every 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from winq import QuantConfig, TrainConfig
from winq.hessian import HessianOperator, fixed_batches, model_spectrum, plot_density, spectrum, write_json
from winq.checkpoint import load_checkpoint
from winq.data import token_ids
from winq.models import load_base_model
from winq.prepare import target_linears
from winq.evaluate import lm_loss
from winq.train import train, winq_reinit

SETTINGS = {2: "seq", 4: "lsq"}


def fp_spectrum(model, batches, **kw):
    """The same spectrum for the full-precision model, w.r.t. the Linear weights prepare() would quantize."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model.eval()
    params = [model.get_submodule(n).weight for n in target_linears(model, QuantConfig(bits=4))]

    def loss_of(b):
        with sdpa_kernel(SDPBackend.MATH):
            return lm_loss(model, b)

    op = HessianOperator([lambda b=b: loss_of(b) for b in batches], params)
    s = spectrum(op, params="all", **kw)
    s.loss = op.loss()
    return s


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="local HF model folder (default: the built-in default model)")
    ap.add_argument("--data", default="ptb")
    ap.add_argument("--bits", default="2,4")
    ap.add_argument("--batches", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--probes", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="Lanczos steps per probe")
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--qat-steps", type=int, default=20)
    ap.add_argument("--hessian-every", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/hessian.json")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kw = dict(top_k=args.top_k, probes=args.probes, steps=args.steps, seed=args.seed)
    t0 = time.time()

    base, tok, _ = load_base_model(args.model)
    base.config.use_cache = False
    batches = fixed_batches(token_ids(args.data, "train", tok), args.batches, 1, args.seq_len)
    summaries = {"fp32": fp_spectrum(base, batches, **kw)}
    print(f"fp32: {summaries['fp32'].brief()}", flush=True)
    del base
    trajectories = {}
    with tempfile.TemporaryDirectory() as tmp:
        for bits in [int(b) for b in args.bits.split(",")]:
            name = f"{SETTINGS[bits]}{bits}"
            trajectories[name] = qat_spectra(args, bits, Path(tmp) / name, batches, kw, summaries)

    outp = Path(args.out)
    write_json(
        {
            "settings": vars(args),
            "threads": torch.get_num_threads(),
            "seconds": round(time.time() - t0, 1),
            "summaries": {k: s.to_dict() for k, s in summaries.items()},
            "qat_trajectories": trajectories,
        },
        outp,
    )
    plot_density(summaries, outp.with_suffix(".png"), title="Hessian density: fp32, QAT, after one WinQ reset")
    if trajectories:
        plot_trajectories(trajectories, outp.with_name(outp.stem + "-trajectory.png"))
    print(f"wrote {outp} ({time.time() - t0:.0f} s)")
    return 0


def qat_spectra(args, bits: int, out: Path, batches, kw: dict, summaries: dict) -> list[dict]:
    """QAT at `bits` into `out` with a Hessian summary every --hessian-every steps (the trajectory, returned); the
    spectra of the trained model before and after one WinQ reset go into `summaries`."""
    name = f"{SETTINGS[bits]}{bits}"
    tcfg = TrainConfig(
        method="qat", steps=args.qat_steps, lr=args.lr, seq_len=args.seq_len, batch_size=1, seed=args.seed
    )
    res = train(
        args.model,
        args.data,
        QuantConfig(bits=bits, grid=SETTINGS[bits]),
        tcfg,
        out,
        progress=False,
        threads=args.threads,
        hessian_every=args.hessian_every,
        hessian_options={**kw, "batches": args.batches, "batch_size": 1, "seq_len": args.seq_len},
    )
    trajectory = [{"step": r["step"], "loss": r["loss"], **r["hessian"]} for r in res.records if "hessian" in r]
    model, _, _ = load_checkpoint(out)
    model.config.use_cache = False
    summaries[f"{name} qat (before reset)"] = model_spectrum(model, batches, **kw)
    winq_reinit(model, 0.2)
    summaries[f"{name} after reset"] = model_spectrum(model, batches, **kw)
    for k in (f"{name} qat (before reset)", f"{name} after reset"):
        print(f"{k}: {summaries[k].brief()}", flush=True)
    return trajectory


def plot_trajectories(trajectories: dict, png: Path) -> None:
    """Train loss, lambda_max and the near-zero share along each QAT run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for name, tr in trajectories.items():
        steps = [r["step"] for r in tr]
        axes[0].plot(steps, [r["loss"] for r in tr], "o-", label=name)
        axes[1].plot(steps, [r["lambda_max"] for r in tr], "o-", label=name)
        axes[2].plot(steps, [r["near_zero"] for r in tr], "o-", label=name)
    for ax, t in zip(axes, ("train loss", "lambda_max", "near-zero share")):
        ax.set_title(t)
        ax.set_xlabel("QAT step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
