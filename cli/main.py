"""The `winq` command line: thin typer commands over library functions.

Every command turns a winq.WinqError into one red line on stderr and exit code 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="winq",
    help="WinQ quantization-aware training for Hugging Face causal LMs, exported bit-exactly.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True)  # one error, one line, also in logs
out = Console(soft_wrap=True)

# options shared by several commands
ModelOpt = Annotated[Optional[str], typer.Option("--model", help="local Hugging Face model folder; default: the built-in SmolLM2-135M-Instruct (Q4_1 weights)")]
DataOpt = Annotated[str, typer.Option("--data", help="ptb | sotu | a .txt/.jsonl file or folder")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="torch CPU threads (default: torch's choice)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON instead of a table")]


def _fail(e: Exception) -> None:
    err.print(f"[bold red]error:[/] {e}", highlight=False, markup=True)
    raise typer.Exit(1)


def _run(fn, *a, **kw):
    from winq.errors import WinqError

    import logging

    # optional packages pulled in by extras (torchao via gptqmodel) log import-time noise on every model load
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:  # transformers' own progress bars and warnings would bury ours
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass

    try:
        return fn(*a, **kw)
    except WinqError as e:
        _fail(e)


@app.command()
def train(
    model: ModelOpt = None,
    data: DataOpt = "ptb",
    bits: Annotated[int, typer.Option(help="weight bits: 1, 2, 3, 4 or 8")] = 4,
    grid: Annotated[Optional[str], typer.Option(help="lsq | seq | ternary | binary | affine (default: seq for 2 bits, lsq for 3/4/8, binary for 1)")] = None,
    group_size: Annotated[int, typer.Option("--group-size", help="-1: one scale per row; else a divisor of every in_features")] = -1,
    method: Annotated[str, typer.Option(help="winq (reset + noise) or qat (the ParetoQ baseline)")] = "winq",
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 30,
    lr: Annotated[float, typer.Option(help="peak AdamW learning rate (cosine schedule, 5% warm-up)")] = 5e-5,
    reinit_every: Annotated[int, typer.Option("--reinit-every", help="WinQ reset period in steps; -1: a quarter of --steps")] = -1,
    reinit_alpha: Annotated[float, typer.Option("--reinit-alpha", help="reset W <- a W + (1 - a) Q(W)")] = 0.2,
    noise_sigma: Annotated[float, typer.Option("--noise-sigma", help="std of the training noise on weights and scales")] = 1e-3,
    seq_len: Annotated[int, typer.Option("--seq-len", help="tokens per training sequence")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", help="sequences per micro-batch (per process)")] = 1,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="micro-batches per optimizer step")] = 1,
    precision: Annotated[str, typer.Option(help="fp32 | bf16")] = "fp32",
    seed: Annotated[int, typer.Option(help="random seed (data order, noise)")] = 0,
    save_every: Annotated[int, typer.Option("--save-every", help="save a resumable checkpoint every N steps (0: only at the end)")] = 0,
    eval_every: Annotated[int, typer.Option("--eval-every", help="held-out loss every N steps (0: never)")] = 0,
    eval_batches: Annotated[int, typer.Option("--eval-batches", help="held-out batches per periodic eval")] = 8,
    quantize_lm_head: Annotated[bool, typer.Option("--quantize-lm-head", help="quantize the output projection too")] = False,
    out: Annotated[Path, typer.Option(help="checkpoint folder to write")] = Path("runs/winq"),
    resume: Annotated[bool, typer.Option(help="continue the run saved in --out (its saved settings are used)")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing checkpoint in --out")] = False,
    threads: ThreadsOpt = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    hessian_every: Annotated[int, typer.Option("--hessian-every", help="log a Hessian spectrum summary into metrics.jsonl every N steps (0: never; costs probes x steps HVPs, see `winq hessian`)")] = 0,
):
    """Quantization-aware training (WinQ or plain QAT); writes a checkpoint folder to --out."""
    from winq.config import QuantConfig, TrainConfig
    from winq.train import train as run_train

    def go():
        qcfg = QuantConfig(bits=bits, grid=grid, group_size=group_size, quantize_lm_head=quantize_lm_head)
        tcfg = TrainConfig(
            method=method, steps=steps, lr=lr, reinit_every=reinit_every, reinit_alpha=reinit_alpha,
            noise_sigma=noise_sigma, seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum,
            precision=precision, seed=seed, save_every=save_every, eval_every=eval_every, eval_batches=eval_batches,
        )
        from winq.checkpoint import is_checkpoint

        if resume and is_checkpoint(out):
            err.print(f"resuming {out}: the run's saved settings are used")
        return run_train(model, data, qcfg, tcfg, out, resume=resume, overwrite=overwrite, progress=progress, threads=threads,
                         hessian_every=hessian_every)

    res = _run(go)
    loss = f"final loss {res.final_loss:.4f}" if res.final_loss is not None else "already complete: no steps run"
    out_msg = f"checkpoint: {res.out}  (step {res.step}, {loss}, {res.seconds:.0f} s)"
    Console().print(out_msg, highlight=False)


BACKENDS = ("fakequant", "packed", "fp", "gptq", "llamacpp", "ort")


def _tokenizer_for_gguf(path: Path):
    """The tokenizer of the checkpoint a GGUF was exported from (named in the winq-export.json beside it)."""
    from transformers import AutoTokenizer

    from winq.errors import ConfigError

    rec = Path(path).parent / "winq-export.json"
    try:
        src = json.loads(rec.read_text())["source"]["checkpoint"]
        return AutoTokenizer.from_pretrained(src)
    except (OSError, KeyError, ValueError):
        raise ConfigError(
            f"cannot find the tokenizer for {path}: pass --checkpoint DIR (the checkpoint it was exported from) "
            f"or keep its winq-export.json beside it"
        ) from None


@app.command("eval")
def eval_cmd(
    backend: Annotated[str, typer.Option(help="comma-separated: fakequant (a winq checkpoint) | packed (winq's packed runtime: --packed, default --checkpoint) | fp (a full-precision HF model) | gptq (--gptq FOLDER) | llamacpp (--gguf FILE) | ort (--onnx FOLDER)")] = "fakequant",
    checkpoint: Annotated[Optional[Path], typer.Option(help="winq checkpoint folder (fakequant backend)")] = None,
    packed: Annotated[Optional[Path], typer.Option("--packed", help="packed backend: a winq checkpoint or a GPTQ export folder (default: --checkpoint)")] = None,
    gptq: Annotated[Optional[Path], typer.Option("--gptq", help="GPTQ folder (gptq backend; needs pip install \"winq[gptq]\")")] = None,
    gguf: Annotated[Optional[Path], typer.Option("--gguf", help="GGUF file (llamacpp backend; needs pip install \"winq[llamacpp]\")")] = None,
    onnx: Annotated[Optional[Path], typer.Option("--onnx", help="ONNX export folder (ort backend; needs pip install \"winq[onnx]\")")] = None,
    accuracy_level: Annotated[Optional[int], typer.Option("--accuracy-level", help="ort: override the MatMulNBits accuracy level (0 exact float, 4 int8 activations); default: as exported")] = None,
    model: ModelOpt = None,
    data: DataOpt = "ptb",
    split: Annotated[str, typer.Option(help="train | valid | test")] = "test",
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="evaluate the first N tokens of the split (0: all)")] = 16384,
    seq_len: Annotated[int, typer.Option("--seq-len", help="window length")] = 512,
    stride: Annotated[Optional[int], typer.Option(help="targets scored per window after the first (default: seq_len - 1, windows overlapping by one token)")] = None,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
):
    """Perplexity of one or more backends on the same token ids and windows; with several, the
    first (fakequant when listed) is the reference for relative ppl, KL divergence and top-1 agreement."""
    import torch

    from winq.errors import ConfigError

    names = [b.strip() for b in backend.split(",") if b.strip()]

    def go():
        bad = [b for b in names if b not in BACKENDS]
        if bad or not names:
            raise ConfigError(f"unknown backend {bad[0] if bad else backend!r}: choose from {', '.join(BACKENDS)}")
        if len(set(names)) != len(names):
            raise ConfigError(f"backend listed twice in {backend!r}")
        if "fakequant" in names and checkpoint is None:
            raise ConfigError("backend fakequant needs --checkpoint DIR (a folder written by `winq train`)")
        if "packed" in names and packed is None and checkpoint is None:
            raise ConfigError("backend packed needs --packed PATH (a winq checkpoint or GPTQ export) or --checkpoint DIR")
        if "gptq" in names and gptq is None:
            raise ConfigError("backend gptq needs --gptq FOLDER (a folder written by `winq export --format gptq`)")
        if "llamacpp" in names and gguf is None:
            raise ConfigError("backend llamacpp needs --gguf FILE (a file written by `winq export --format gguf`)")
        if "ort" in names and onnx is None:
            raise ConfigError("backend ort needs --onnx FOLDER (a folder written by `winq export --format onnx`)")
        if seq_len < 2:
            raise ConfigError(f"--seq-len must be at least 2, got {seq_len}")
        if threads:
            torch.set_num_threads(threads)
        from transformers import AutoTokenizer

        from winq.checkpoint import load_checkpoint
        from winq.evaluate import eval_ids
        from winq.models import load_base_model
        from winq.runtime.compare import compare, model_logits_fn

        order = (["fakequant"] if "fakequant" in names else []) + [n for n in names if n != "fakequant"]
        fns, tok = {}, None
        for name in order:
            if name == "fakequant":
                net, tok, _ = load_checkpoint(checkpoint)
            elif name == "packed":
                from winq.runtime.packed import load_packed

                src = packed or checkpoint
                net = load_packed(src)
                tok = tok or AutoTokenizer.from_pretrained(str(src))
            elif name == "gptq":
                from winq.runtime.gptq import load_gptq

                net = load_gptq(gptq)
                tok = tok or AutoTokenizer.from_pretrained(str(gptq))
            elif name == "llamacpp":
                from winq.runtime.llamacpp import load_llamacpp

                fns[name] = load_llamacpp(gguf, threads=threads, n_ctx=max(seq_len, 64))
                tok = tok or (AutoTokenizer.from_pretrained(str(checkpoint)) if checkpoint else _tokenizer_for_gguf(gguf))
                continue
            elif name == "ort":
                from winq.runtime.ort import load_ort

                fns[name] = load_ort(onnx, threads=threads, accuracy_level=accuracy_level)
                tok = tok or AutoTokenizer.from_pretrained(str(onnx))
                continue
            else:
                net, t, _ = load_base_model(model)
                tok = tok or t
            fns[name] = model_logits_fn(net)
        ids = eval_ids(tok, data, split, max_tokens or None)
        return compare(fns, ids, seq_len=seq_len, stride=stride, progress=not as_json)

    res = _run(go)
    ref, results = res["reference"], res["results"]
    rel = {n: r["ppl_rel_diff"] for n, r in results.items() if n != ref}
    if as_json:
        print(json.dumps({"data": data, "split": split, "seq_len": seq_len, "stride": stride or seq_len - 1, "results": results,
                          **({"reference": ref, "ppl_relative_diff": rel} if rel else {})}, indent=2))
        return
    t = Table(title=f"{data}/{split}: {next(iter(results.values()))['tokens']} tokens, windows of {seq_len}")
    cols = ("backend", "ppl", "rel. diff", "KL", "top-1 agree", "seconds")
    for c in cols:
        t.add_column(c, justify="left" if c == "backend" else "right")
    for name, r in results.items():
        extra = ("reference", "", "") if name == ref else (f"{r['ppl_rel_diff']:+.3e}", f"{r['kl']:.3e}", f"{r['top1_agreement']:.4f}")
        t.add_row(name, f"{r['ppl']:.6f}", *extra, f"{r['seconds']:.1f}")
    out.print(t)
    for name, d in rel.items():
        out.print(f"{name} vs {ref}: ppl {results[name]['ppl']:.6f} vs {results[ref]['ppl']:.6f}, relative difference {d:+.3e}", highlight=False)


@app.command("export")
def export_cmd(
    checkpoint: Annotated[Path, typer.Option(help="winq checkpoint folder (written by `winq train`)")],
    out_dir: Annotated[Path, typer.Option("--out", help="folder to write (written to a temporary sibling, renamed when verified)")],
    fmt: Annotated[str, typer.Option("--format", help="export format: gguf (a llama.cpp file) | gptq (a folder) | onnx (a folder)")] = "gptq",
    checkpoint_format: Annotated[Optional[str], typer.Option("--checkpoint-format", help="gptq: gptq (v1, every loader) | gptq_v2 (gptqmodel only); default: v1, or v2 when an affine zero point is 0")] = None,
    strict: Annotated[Optional[bool], typer.Option("--strict/--no-strict", help="gptq: refuse wider exact containers (seq 2-bit in 3 bits, binary in 2 bits) instead of warning")] = None,
    float_dtype: Annotated[Optional[str], typer.Option("--float-dtype", help="gptq: embeddings, norms, lm_head: float16 (default) | float32 | bfloat16")] = None,
    gguf_type: Annotated[Optional[str], typer.Option("--type", help="gguf: auto (tightest exact type, default) | q4_0 | q3_k | q2_k | tq2_0 | tq1_0 | q4_1 | q8_0")] = None,
    keep: Annotated[Optional[str], typer.Option("--keep", help="gguf: embeddings and lm_head left in float: f16 (default) | f32 | q8_0 (norms stay f32)")] = None,
    block_size: Annotated[Optional[int], typer.Option("--block-size", help="onnx: MatMulNBits block 16..256, a power of two (default 32)")] = None,
    accuracy_level: Annotated[Optional[int], typer.Option("--accuracy-level", help="onnx: 0 exact float activations (default) | 4 int8 activations")] = None,
    two_bit: Annotated[Optional[str], typer.Option("--two-bit", help="onnx: seq 2-bit as container (4-bit, default) | float-zp (2-bit, float zero point 1.5; slow path in ORT)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing export in --out")] = False,
    as_json: JsonOpt = False,
):
    """Export a trained checkpoint bit-exactly (verified by reading the file back); writes winq-export.json."""
    import warnings

    from winq.exporters import ExportWarning, export

    given = {"checkpoint_format": ("gptq", "--checkpoint-format", checkpoint_format), "strict": ("gptq", "--strict", strict),
             "float_dtype": ("gptq", "--float-dtype", float_dtype), "type": ("gguf", "--type", gguf_type),
             "keep": ("gguf", "--keep", keep), "block_size": ("onnx", "--block-size", block_size),
             "accuracy_level": ("onnx", "--accuracy-level", accuracy_level), "two_bit": ("onnx", "--two-bit", two_bit)}

    def go():
        from winq.errors import ConfigError
        from winq.exporters import formats

        if fmt not in formats():
            raise ConfigError(f"unknown export format {fmt!r}: choose one of {', '.join(formats())}")
        opts = {}
        for key, (owner, flag, value) in given.items():
            if value is None:
                continue
            if owner != fmt:
                raise ConfigError(f"{flag} is an option of --format {owner}, not of --format {fmt}")
            opts[key] = value
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExportWarning)  # printed below as notes
            return export(fmt, checkpoint, out_dir, overwrite=overwrite, **opts)

    res = _run(go)
    m = res.manifest
    if as_json:
        print(json.dumps({"out": str(res.out), "summary": m["summary"], "info": m["info"], "notes": res.notes}, indent=2))
        return
    for note in res.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False)
    info = m["info"]
    group = "per row" if info.get("group_size", -1) == -1 else f"group {info.get('group_size')}"
    detail = {"gptq": f"checkpoint_format {info.get('checkpoint_format')}", "gguf": f"{info.get('arch')}, types {', '.join(info.get('types', []))}"}.get(fmt, "")
    t = Table(title=f"{fmt} export ({detail}) of {checkpoint}: {info.get('grid', '')}, {group}" if detail else f"{fmt} export of {checkpoint}")
    t.add_column("tensor", no_wrap=True)
    for c in ("bits", "stored as", "shape", "bits/w", "max err"):
        t.add_column(c, justify="right", no_wrap=True)
    for r in m["tensors"]:
        bits = f"{r['bits']}" if r["container_bits"] == r["bits"] else f"{r['bits']} in {r['container_bits']}"
        stored = r["container"].split(":")[0] if fmt == "gguf" else ("native" if r["container"] == "native" else "container")
        t.add_row(r["name"], bits, stored, "x".join(map(str, r["shape"])), f"{r['bits_per_weight']:.3f}", f"{r['max_abs_err']:g}")
    out.print(t)
    s = m["summary"]
    rec = f" (record: {res.out.parent / 'winq-export.json'})" if res.out.is_file() else ""
    out.print(
        f"wrote {res.out}{rec}: {s['tensors']} quantized tensors, max error {s['max_abs_err']:g} (read back from the file), "
        f"{s['bits_per_weight']:.3f} bits/weight, {s['float_tensors']} tensors in {info.get('float_dtype') or info.get('keep') or 'float'}, "
        f"{res.seconds:.1f} s",
        highlight=False,
    )


@app.command("hessian")
def hessian_cmd(
    checkpoint: Annotated[Path, typer.Option(help="winq checkpoint folder (written by `winq train`)")],
    data: DataOpt = "ptb",
    split: Annotated[str, typer.Option(help="train | valid | test: the fixed batches are the split's first blocks")] = "train",
    batches: Annotated[int, typer.Option(help="fixed batches the loss is averaged over")] = 4,
    batch_size: Annotated[int, typer.Option("--batch-size", help="sequences per batch")] = 1,
    seq_len: Annotated[int, typer.Option("--seq-len", help="tokens per sequence")] = 128,
    top_k: Annotated[int, typer.Option("--top-k", help="eigenvalues reported at each end")] = 8,
    probes: Annotated[int, typer.Option(help="Rademacher probes (SLQ density and Hutchinson trace)")] = 8,
    steps: Annotated[int, typer.Option(help="Lanczos iterations per probe (HVPs = probes x steps; memory = steps x params x 4 bytes)")] = 16,
    eps: Annotated[float, typer.Option(help="near-zero band |lambda| <= eps x max|lambda|")] = 1e-2,
    by_type: Annotated[bool, typer.Option("--by-type", help="also attention-only and MLP-only spectra")] = False,
    seed: Annotated[int, typer.Option(help="probe seed")] = 0,
    out_json: Annotated[Path, typer.Option("--out", help="JSON to write; the density plot goes beside it (.png)")] = Path("results/hessian.json"),
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
):
    """Hessian spectrum of the loss w.r.t. the quantized latent weights: extremes, density, near-zero share, trace."""
    import torch

    def go():
        if threads:
            torch.set_num_threads(threads)
        from winq.analysis import checkpoint_spectrum, plot_density, write_json

        sums, meta = checkpoint_spectrum(checkpoint, data, split, batches, batch_size, seq_len, by_type=by_type,
                                         top_k=top_k, probes=probes, steps=steps, seed=seed, eps_rel=eps)
        png = out_json.with_suffix(".png")
        write_json({**meta, "summaries": {k: s.to_dict() for k, s in sums.items()}}, out_json)
        plot_density(sums, png, title=f"Hessian density: {checkpoint}")
        return sums, png

    sums, png = _run(go)
    if as_json:
        print(json.dumps({k: s.to_dict(density=False) for k, s in sums.items()}, indent=2))
        return
    t = Table(title=f"Hessian of the loss w.r.t. quantized latent weights ({checkpoint}, {data}/{split})")
    for c in ("params", "n", "loss", "lambda_max", "lambda_min", "trace", "near 0", "pos", "neg", "HVPs", "s"):
        t.add_column(c, justify="left" if c == "params" else "right")
    for k, s in sums.items():
        t.add_row(k, str(s.n_params), f"{s.loss:.4f}", f"{s.top[0]:.4g}", f"{s.bottom[0]:.4g}", f"{s.trace:.4g}",
                  f"{s.near_zero:.3f}", f"{s.positive_mass:.3f}", f"{s.negative_mass:.3f}", str(s.hvps), f"{s.seconds:.1f}")
    out.print(t)
    s = sums["all"]
    out.print(f"top {', '.join(f'{x:.4g}' for x in s.top)}; bottom {', '.join(f'{x:.4g}' for x in s.bottom)}", highlight=False)
    out.print(f"wrote {out_json} and {png}", highlight=False)


# `winq bench` and `winq inspect` live in cli/tools.py; importing it registers them on `app`
from winq.cli import tools as _tools  # noqa: E402,F401


def main() -> None:
    app()


if __name__ == "__main__":
    main()
