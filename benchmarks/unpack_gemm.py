"""Triton unpack-GEMM vs torch float16 matmul on real LLM layer shapes (needs a CUDA GPU).

For every layer shape N x K (out x in), M (tokens: 1 and 16 = decode, 128 and 2048 = prefill),
bits (2, 3, 4, 8) and grouping (per-row, group 128) it
  1. checks the kernel against the float32 torch reference (max |y - ref| / max |ref|, recorded;
     a float16 result is expected near 2^-11),
  2. times the kernel (autotuned: first call tunes, then timed) and F.linear(x, W16) with W16
     (N, K) float16 using triton.testing.do_bench (median, L2 flushed between runs),
  3. reports ms, GB/s, TFLOP/s, speedup over float16 and the fraction of the bandwidth ideal.

Bytes moved (the minimum any kernel must read/write once): packed weights K_pad*bits/8*N +
scales 2*G*N + zeros (2 or 4)*G*N + activations 2*M*K + output 2*M*N; for float16: 2*N*K +
2*M*K + 2*M*N. Ideal time = bytes / peak HBM bandwidth (--peak-gbs, default 3350 GB/s = H100
SXM; H200 4800, H100 PCIe 2000, A100 80GB 2039); `bw_fraction` = ideal / measured. FLOPs = 2*M*N*K.

Writes results/kernels.json (device name, versions, every row) and results/kernels.png
(speedup vs M, one panel per shape, one line per bits x grouping; needs matplotlib, else it
says so and `--plot-only` draws it later from the JSON).

Runs from a checkout with only torch and triton installed (winq need not be pip-installed), or from
an installed winq as `python -m winq.benchmarks.unpack_gemm` (what `winq bench --kernels` runs; results
then go to ./results unless --out / --png say otherwise):

    pip install triton && python benchmarks/unpack_gemm.py            # full grid, ~10 min on an H100
    python benchmarks/unpack_gemm.py --quick                          # one shape, M 1/16/2048, 4-bit and 3-bit
    python benchmarks/unpack_gemm.py --plot-only                      # redraw the PNG from the JSON
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" if (ROOT / "pyproject.toml").is_file() else Path("results")  # a checkout's, else ./results

SHAPES = [(2048, 2048), (2048, 8192), (8192, 2048), (4096, 4096)]  # (N, K): out x in
MS = [1, 16, 128, 2048]
BITS = [2, 3, 4, 8]
GROUPS = ["row", 128]


def import_kernels():
    """winq.runtime.kernels from the install, or straight from this checkout (core winq needs only torch)."""
    try:
        import winq.runtime.kernels as kernels
    except ImportError:
        sys.path.insert(0, str(ROOT))
        import winq

        spec = importlib.util.spec_from_file_location(
            "winq.runtime", ROOT / "runtime" / "__init__.py", submodule_search_locations=[str(ROOT / "runtime")]
        )
        runtime = importlib.util.module_from_spec(spec)
        sys.modules["winq.runtime"] = runtime
        spec.loader.exec_module(runtime)
        winq.runtime = runtime
        import winq.runtime.kernels as kernels
    return kernels


def make_weights(N: int, K: int, bits: int, group_size: int, device, seed: int = 0):
    """Random GPTQ weight: qweight (K_pad*bits/32, N) int32, scales (G, N) fp16, zeros (G, N) fp16."""
    from winq.packing import pack, pad_to_period

    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randint(0, 2**bits, (K, N), generator=g, device=device, dtype=torch.int32).to(torch.uint8)  # (K, N)
    qweight = pack(pad_to_period(q, bits, dim=0), bits, dim=0)  # (K_pad * bits / 32, N)
    del q
    G = K // group_size
    # scale ~ max|W| / 2^(b-1) for unit-variance-ish weights, so y has a sane magnitude
    scales = (torch.rand(G, N, generator=g, device=device) * 0.01 + 0.01 / 2 ** (bits - 1)).half()
    zeros = torch.full((G, N), 2.0 ** (bits - 1), device=device, dtype=torch.float16)
    return qweight, scales, zeros


def bench_ms(fn, warmup_ms: int, rep_ms: int) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def best_config(mod, M: int) -> str | None:
    k = (mod._decode_kernel if M <= mod.DECODE_MAX_M else mod._medium_kernel if M <= mod.MEDIUM_MAX_M
         else mod._large_kernel)
    c = getattr(k, "best_config", None)
    return None if c is None else f"{c.kwargs} warps={c.num_warps} stages={c.num_stages}"


def run(args) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit(
            "benchmarks/unpack_gemm.py needs a CUDA GPU: torch.cuda.is_available() is False "
            f"(torch {torch.__version__}). Run it on a GPU machine: pip install triton && python "
            "benchmarks/unpack_gemm.py"
        )
    try:
        import triton
    except ImportError:
        raise SystemExit("benchmarks/unpack_gemm.py needs triton: pip install triton (or pip install 'winq[kernels]')")
    kernels = import_kernels()
    from winq.runtime.kernels import unpack_gemm_kernel as mod

    if mod.INTERPRETED:
        raise SystemExit("TRITON_INTERPRET=1 is set: unset it to time the compiled kernels")
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference stays float32
    dev = torch.device("cuda")
    name = torch.cuda.get_device_properties(dev).name
    print(f"device: {name}, peak HBM {args.peak_gbs} GB/s (--peak-gbs), torch {torch.__version__}, triton "
          f"{triton.__version__}", flush=True)
    rows = sweep(args, mod, kernels, dev, lambda fn: bench_ms(fn, args.warmup, args.rep))
    return dict(
        device=name, peak_gbs=args.peak_gbs, torch=torch.__version__, triton=triton.__version__,
        python=platform.python_version(), quick=args.quick, warmup_ms=args.warmup, rep_ms=args.rep,
        bytes_note="triton: packed weights + fp16 scales + fp16 zeros + fp16 x + fp16 y; fp16: W + x + y",
        rows=rows,
    )


def sweep(args, mod, kernels, dev, bench) -> list[dict]:
    """Check and time every case; `bench(fn) -> ms`."""
    rows = []
    for N, K in args.shapes:
        xs = {M: torch.randn(M, K, device=dev, dtype=torch.float16) for M in args.m}
        w16 = torch.randn(N, K, device=dev, dtype=torch.float16) * 0.02  # (N, K) like nn.Linear
        fp16_ms = {}
        for M in args.m:
            fp16_ms[M] = bench(functools.partial(torch.nn.functional.linear, xs[M], w16))
            nbytes = 2 * N * K + 2 * M * K + 2 * M * N
            rows.append(dict(kind="fp16", N=N, K=K, M=M, bits=16, group="-", ms=fp16_ms[M], bytes=nbytes,
                             gbs=nbytes / fp16_ms[M] / 1e6, tflops=2 * M * N * K / fp16_ms[M] / 1e9,
                             speedup=1.0, bw_fraction=nbytes / (args.peak_gbs * 1e9) * 1e3 / fp16_ms[M]))
        del w16
        for bits in args.bits:
            for group in args.groups:
                gs = K if group == "row" else int(group)
                qweight, scales, zeros = make_weights(N, K, bits, gs, dev, seed=bits)
                wbytes = qweight.numel() * 4 + scales.numel() * 2 + zeros.numel() * zeros.element_size()
                for M in args.m:
                    x = xs[M]
                    t0 = time.time()
                    y = mod.unpack_gemm(x, qweight, scales, zeros, bits, gs)  # autotunes on first call per key
                    tune_s = time.time() - t0
                    ref = kernels.unpack_gemm_torch(x.float(), qweight, scales, zeros, bits, gs)  # (M, N) fp32
                    rel = ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
                    del ref, y
                    ms = bench(functools.partial(mod.unpack_gemm, x, qweight, scales, zeros, bits, gs))
                    nbytes = wbytes + 2 * M * K + 2 * M * N
                    row = dict(kind="triton", N=N, K=K, M=M, bits=bits, group=group, ms=ms, bytes=nbytes,
                               gbs=nbytes / ms / 1e6, tflops=2 * M * N * K / ms / 1e9, speedup=fp16_ms[M] / ms,
                               bw_fraction=nbytes / (args.peak_gbs * 1e9) * 1e3 / ms, max_rel_err=rel,
                               fp16_ms=fp16_ms[M], tune_s=round(tune_s, 2), config=best_config(mod, M))
                    rows.append(row)
                    flag = "" if rel < 4e-3 else "  <-- LARGE ERROR"
                    print(f"N={N:5d} K={K:5d} M={M:5d} {bits}-bit g={str(group):>3}: {ms:8.4f} ms  {row['gbs']:7.1f} "
                          "GB/s "
                          f"{row['tflops']:7.2f} TFLOP/s  x{row['speedup']:5.2f} vs fp16 ({fp16_ms[M]:.4f} ms)  "
                          f"bw {row['bw_fraction']:.2f}  err {rel:.1e}{flag}", flush=True)
                del qweight, scales, zeros
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def plot(result: dict, png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipped {png} (pip install matplotlib; python benchmarks/unpack_gemm.py "
              "--plot-only)")
        return
    rows = [r for r in result["rows"] if r["kind"] == "triton"]
    shapes = sorted({(r["N"], r["K"]) for r in rows}, key=lambda s: (s[0] * s[1], s))
    cols = min(2, len(shapes))
    nrows = (len(shapes) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 4 * nrows), squeeze=False)
    colors = {2: "tab:red", 3: "tab:orange", 4: "tab:blue", 8: "tab:green"}
    for ax, (N, K) in zip(axes.flat, shapes):
        for bits in sorted({r["bits"] for r in rows}):
            for group in sorted({str(r["group"]) for r in rows}):
                pts = sorted((r["M"], r["speedup"]) for r in rows if (r["N"], r["K"], r["bits"],
                                                                      str(r["group"])) == (N, K, bits, group))
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=colors.get(bits), linestyle="-" if group != "row" else "--",
                            label=f"{bits}-bit {'per-row' if group == 'row' else 'g' + group}")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"N={N} x K={K}")
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("speedup over fp16 F.linear")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    fig.suptitle(f"winq unpack-GEMM (Triton) on {result['device']}")
    fig.tight_layout()
    from winq.fsutil import atomic_file

    with atomic_file(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    print(f"wrote {png}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one shape (4096x4096), M 1/16/2048, bits 3 and 4")
    p.add_argument("--peak-gbs", type=float, default=3350.0, help="peak HBM bandwidth in GB/s (H100 SXM: 3350)")
    p.add_argument("--shapes", type=str, default=None, help="comma list of NxK, e.g. 4096x4096,2048x8192")
    p.add_argument("--m", type=str, default=None, help="comma list of M")
    p.add_argument("--bits", type=str, default=None, help="comma list of bits")
    p.add_argument("--groups", type=str, default=None, help="comma list of group sizes or 'row'")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition budget (ms)")
    p.add_argument("--out", type=Path, default=RESULTS / "kernels.json")
    p.add_argument("--png", type=Path, default=RESULTS / "kernels.png")
    p.add_argument("--plot-only", action="store_true", help="draw the PNG from an existing --out JSON")
    a = p.parse_args(argv)
    a.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes.split(",")] if a.shapes else (
        [(4096, 4096)] if a.quick else SHAPES)
    a.m = [int(v) for v in a.m.split(",")] if a.m else ([1, 16, 2048] if a.quick else MS)
    a.bits = [int(v) for v in a.bits.split(",")] if a.bits else ([3, 4] if a.quick else BITS)
    a.groups = [g if g == "row" else int(g) for g in a.groups.split(",")] if a.groups else GROUPS
    return a


def main(argv=None):
    args = parse_args(argv)
    if args.plot_only:
        plot(json.loads(args.out.read_text()), args.png)
        return
    result = run(args)
    from winq.fsutil import atomic_file

    with atomic_file(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    plot(result, args.png)


if __name__ == "__main__":
    main()
