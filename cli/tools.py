"""`winq bench` and `winq inspect`, registered on winq.cli.common.app (cli/main.py imports this module, so
`winq.cli.main:app` has them).

Both are thin: the work is in winq.runtime.bench and winq.runtime.inspection.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from .common import DataOpt, JsonOpt, ModelOpt, _run, app, backend_help, err, out

KERNELS_MODULE = "winq.benchmarks.unpack_gemm"  # benchmarks/unpack_gemm.py, installed with winq (package-dir)
EDGE_MODULE = "winq.benchmarks.edge"  # benchmarks/edge.py: `winq bench --shape`


def _mb(b) -> str:
    return "" if b is None else f"{b / 2**20:.1f}"


def _num(x, fmt="{:.1f}") -> str:
    return "" if x is None else fmt.format(x)


def _rate(x) -> str:
    """tokens/s with three significant figures below 100 (a CPU decode can be 0.4 tok/s)."""
    return "" if x is None else f"{x:.1f}" if x >= 100 else f"{x:.3g}"


def run_kernels(args: str) -> int:
    """Run benchmarks/unpack_gemm.py (installed as winq.benchmarks.unpack_gemm) with the same Python, its own output
    passing through; its exit code."""
    import importlib.util

    from winq.errors import ConfigError

    try:
        argv = shlex.split(args)
    except ValueError as e:
        raise ConfigError(f"--kernel-args {args!r}: {e}") from None
    if importlib.util.find_spec(KERNELS_MODULE) is None:
        raise ConfigError(f"{KERNELS_MODULE} (benchmarks/unpack_gemm.py) is not installed: reinstall winq "
                          f"(pip install -e .) or run benchmarks/unpack_gemm.py from the winq source tree")
    return subprocess.run([sys.executable, "-m", KERNELS_MODULE, *argv]).returncode


def run_shape(shape: str, types: str, threads: Optional[int], prefill: str, gen_tokens: int, repeats: int,
              out_json: Path) -> int:
    """`winq bench --shape`: benchmarks/edge.py (installed as winq.benchmarks.edge) in this process."""
    import importlib.util

    from winq.errors import ConfigError

    if importlib.util.find_spec(EDGE_MODULE) is None:
        raise ConfigError(f"{EDGE_MODULE} (benchmarks/edge.py) is not installed: reinstall winq (pip install -e .)")
    import importlib

    edge = importlib.import_module(EDGE_MODULE)
    try:
        lengths = [int(x) for x in prefill.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--prefill {prefill!r}: give prompt lengths such as 128,512") from None
    edge.run_edge(shape, types, [threads] if threads else [1, 2], prefill=lengths, gen_tokens=gen_tokens,
                  repeats=repeats, out=out_json, say=lambda m: err.print(m, highlight=False, markup=False))
    return 0


@app.command("bench")
def bench_cmd(
    backend: Annotated[str, typer.Option(help=backend_help())] = "fakequant,packed",
    checkpoint: Annotated[Optional[Path], typer.Option(
        help="winq checkpoint folder (fakequant; packed's default; the source of the baselines)")] = None,
    packed: Annotated[Optional[Path], typer.Option(
        help="packed backend: a winq checkpoint or a GPTQ export folder (default: --checkpoint)")] = None,
    gptq: Annotated[Optional[Path], typer.Option("--gptq", help="GPTQ export folder (gptq backend)")] = None,
    gguf: Annotated[Optional[Path], typer.Option("--gguf", help="GGUF file (llamacpp backend)")] = None,
    onnx: Annotated[Optional[Path], typer.Option(
        "--onnx", help="ONNX export folder or model.onnx (ort backend)")] = None,
    model: ModelOpt = None,
    data: DataOpt = "ptb",
    prompt_tokens: Annotated[int, typer.Option(
        "--prompt-tokens", help="prefill length: the first N token ids of the data's test split")] = 128,
    gen_tokens: Annotated[int, typer.Option(
        "--gen-tokens", help="greedy decode steps, one token each with the KV cache")] = 32,
    threads: Annotated[Optional[int], typer.Option(
        "--threads", help="CPU threads of every backend (default: each library's choice)")] = None,
    repeats: Annotated[int, typer.Option(help="timed runs after one warm-up; the medians are reported")] = 3,
    baseline: Annotated[bool, typer.Option(
        "--baseline/--no-baseline", help="also run the float baselines: fp (torch backends), an F16 GGUF (llamacpp), "
                                         "an fp32 ONNX (ort)")] = True,
    out_json: Annotated[Optional[Path], typer.Option(
        "--out", help="JSON to write; the chart goes beside it (.png). Default results/bench.json "
                      "(results/edge.json with --shape, which merges into it)")] = None,
    shape: Annotated[Optional[str], typer.Option(
        "--shape", help="edge latency at a real model shape (random seeded weights): a shipped shape (llama-3.2-1b, "
                        "qwen3-0.6b, llama-100m) or a Hugging Face config.json; builds and exports the model, "
                        "then times every --types against its float baseline (benchmarks/edge.py)")] = None,
    types: Annotated[str, typer.Option(
        "--types", help="with --shape: comma-separated GGUF/ONNX rows (f16, q2_k, tq2_0, tq1_0, q3_k, q4_0, q8_0, "
                        "q4_0-head, ort-fp32, ort-2bit, ort-4bit, ort-8bit) or all")] = "all",
    prefill: Annotated[str, typer.Option(
        "--prefill", help="with --shape: prefill lengths, comma-separated; decode follows the first")] = "128,512",
    kernels: Annotated[bool, typer.Option(
        "--kernels", help="run benchmarks/unpack_gemm.py (Triton unpack-GEMM vs float16, needs CUDA) instead")] = False,
    kernel_args: Annotated[str, typer.Option(
        "--kernel-args", help="arguments passed to benchmarks/unpack_gemm.py, e.g. \"--quick\"")] = "",
    as_json: JsonOpt = False,
):
    """Prefill and decode tokens/s, load time, memory and size of each backend, each in a fresh process
    (one warm-up run, then the median of --repeats); writes --out and a bar chart beside it."""
    if kernels:
        raise typer.Exit(_run(run_kernels, kernel_args))
    if shape is not None:
        raise typer.Exit(_run(run_shape, shape, types, threads, prefill, gen_tokens, repeats,
                              out_json or Path("results/edge.json")))
    out_json = out_json or Path("results/bench.json")

    from winq.exporters import write_float
    from winq.runtime.bench import BenchSpec, run_bench
    from winq.runtime.bench.report import write_report

    names = tuple(b.strip() for b in backend.split(",") if b.strip())

    def go():
        spec = BenchSpec(
            backends=names, checkpoint=_s(checkpoint), packed=_s(packed), gptq=_s(gptq), gguf=_s(gguf), onnx=_s(onnx),
            model=model, data=data, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, threads=threads,
            repeats=repeats, baseline=baseline,
        )
        report = run_bench(spec, say=lambda m: err.print(m, highlight=False, markup=False), write_float=write_float)
        return report, *write_report(report, out_json)

    report, jpath, png = _run(go)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    _print_bench(report, jpath, png)


def _print_bench(report: dict, jpath: Path, png: Path) -> None:
    """`winq bench`'s table: one row per backend (size, load, memory, tokens/s, speed-up over its baseline)."""
    s = report["settings"]
    t = Table(title=f"prompt {report['prompt']['tokens']} tokens ({s['data']}/{s['split']}), decode {s['gen_tokens']}, "
                    f"threads {s['threads'] or 'default'}, median of {s['repeats']}", box=box.SIMPLE_HEAD)
    rows = []
    for name, r in report["results"].items():
        sp = r.get("speedup")
        xb = f"{sp['prefill']:.3g} / {sp['decode']:.3g}" if sp else ("baseline" if r.get("baseline_of") else "")
        rows.append((name, _short(r["artifact"]), _mb(r["size_bytes"]), _num(r.get("load_s"), "{:.2f}"),
                     _num(r.get("rss_load_mb"), "{:.0f}"), _num(r.get("peak_rss_mb"),
                                                                "{:.0f}"), _rate(r["prefill_tok_s"]),
                     _rate(r["decode_tok_s"]), xb))
    heads = ("backend", "artifact", "size\nMB", "load\ns", "RSS\nMB", "peak\nMB", "prefill\ntok/s", "decode\ntok/s",
             "x baseline\npre / dec")
    _fill(t, heads, rows, flexible="artifact", left=("backend", "artifact"))
    out.print(t)
    bases = sorted({r["baseline"] for r in report["results"].values() if r.get("baseline")})
    out.print(f"x baseline: tokens/s over the baseline's ({', '.join(bases) or 'none run'}); RSS: right after loading; "
              "peak: the worker process's maximum; full paths and every figure in "
              f"{jpath}", highlight=False, markup=False)
    out.print(f"wrote {jpath} and {png}", highlight=False, markup=False)


def _fill(t: Table, heads, rows, flexible: str, left=()) -> None:
    """Add columns and rows; every column but `flexible` is as wide as its widest cell, so figures are never cut."""
    for i, c in enumerate(heads):
        if c == flexible:
            t.add_column(c, no_wrap=True, overflow="ellipsis", min_width=8)
            continue
        widest = max([len(x) for x in c.split("\n")] + [len(row[i]) for row in rows])
        t.add_column(c, justify="left" if c in left else "right", no_wrap=True, min_width=widest)
    for row in rows:
        t.add_row(*row)


def _short(p: str) -> str:
    """The artifact's name (the table stays narrow; the JSON has the full path)."""
    return Path(p).name or p


def _s(p: Optional[Path]) -> Optional[str]:
    return None if p is None else str(p)


@app.command("inspect")
def inspect_cmd(
    artifact: Annotated[Path, typer.Argument(help="a GGUF file, an ONNX folder or model.onnx, a GPTQ folder, or a "
                                                  "winq checkpoint")],
    tensors: Annotated[bool, typer.Option(
        "--tensors/--no-tensors", help="list every tensor (name, type, bits, shape, bits/weight)")] = True,
    as_json: JsonOpt = False,
):
    """What an artifact holds: format, tensors and their bits, totals, the winq settings it was made
    with, and whether its verification record (winq-export.json) is present and clean."""
    from winq.runtime.inspection import inspect_artifact

    rep = _run(inspect_artifact, artifact)
    if not tensors:
        rep = {k: v for k, v in rep.items() if k != "tensors"}
    if as_json:
        print(json.dumps(rep, indent=2, default=str))
        return
    tot = rep["totals"]
    if tensors:
        t = Table(title=f"{rep['format']}: {artifact}", box=box.SIMPLE_HEAD)
        rows = [(r["name"], str(r["type"]) + (f" bs{r['block_size']}" if r.get("block_size") else ""),
                 "" if r["bits"] is None else f"{r['bits']:g}", "x".join(map(str,
                                                                             r["shape"])), _num(r["bits_per_weight"],
                                                                                                "{:.3f}"))
                for r in rep["tensors"]]
        _fill(t, ("tensor", "type", "bits", "shape", "bits/w"), rows, flexible="tensor", left=("tensor",))
        out.print(t)
    bpw = tot["bits_per_weight"]
    extra = ""
    if rep["format"] == "onnx":
        extra = f", {tot['matmulnbits']} MatMulNBits (bits {tot['bits']}, block sizes {tot['block_sizes']})"
    elif rep["format"] == "gguf":
        extra = f", types {tot['types']}"
    out.print(f"{rep['format']} {artifact}: {tot['file_bytes'] / 2**20:.1f} MB, {tot['tensors']} tensors, "
              f"{tot['quantized_tensors']} quantized, {_num(bpw, '{:.3f}') or '-'} bits/weight over the quantized ones"
              f"{' (nominal)' if rep['format'] == 'checkpoint' else ''}{extra}", highlight=False)
    w = rep.get("winq")
    out.print("winq settings: "
              f"{json.dumps(_settings(rep), default=str) if w else 'none stored'}", highlight=False, markup=False)
    runs = rep.get("backends")
    out.print(f"runs with: {', '.join(f'--backend {b}' for b in runs) if runs else 'no winq backend'}", highlight=False,
              markup=False)
    diag = rep.get("diagnostics")
    if diag:
        last = diag["last"]
        resets = ", ".join(f"{r['step']} ({r.get('trigger', 'fixed')})" for r in diag["resets"]) or "none"
        out.print(f"codes at step {last['step']}: flip rate {last['flip_rate']:.2e} per step, "
                  f"{last['flips_since_reset']:.2e} changed since the last reset, "
                  f"oscillation {last['oscillation']:.2e}, "
                  f"boundary margin {last['boundary_margin']:.3f} steps, travel {last['travel']:.3f} steps "
                  f"(lr bound {last['lr_travel']:.3f}); resets at {resets}", highlight=False, markup=False)
    rec = rep["record"]
    if rec is None:
        out.print("verification record: none (a checkpoint; `winq export` writes one)", highlight=False)
    elif rec["clean"]:
        out.print(f"verification record: {rec['path']} present and clean ({rec['tensors']} tensors, max error "
                  "0)", highlight=False)
    else:
        state = "present but NOT clean" if rec["present"] else "missing"
        out.print(f"[yellow]verification record: {escape(rec['path'])} {state}: "
                  f"{escape('; '.join(rec['problems']))}[/]",
                  highlight=False)


def _settings(rep: dict) -> dict:
    """The short form of the winq settings for the one-line summary (--json has all of it)."""
    w = rep["winq"]
    if rep["format"] == "checkpoint":
        return {"quant": w.get("quant"), "step": w.get("step"), "method": (w.get("train") or {}).get("method")}
    if rep["format"] == "gptq":
        qc = w.get("quantization_config", {})
        src = (w.get("source") or {}).get("winq") or {}
        return {k: qc.get(k) for k in ("bits", "group_size", "sym",
                                       "checkpoint_format")} | ({"quant": src.get("quant")} if src else {})
    # GGUF / ONNX metadata: the checkpoint's quant + export options
    if isinstance(w, dict) and ("options" in w or "winq" in w):
        inner = w.get("winq") if isinstance(w.get("winq"), dict) else {}
        quant = w.get("quant") or inner.get("quant")
        short = {"quant": quant, "options": w.get("options"), "containers": w.get("containers"),
                 "checkpoint": w.get("checkpoint")}
        return {k: v for k, v in short.items() if v is not None}
    return w
