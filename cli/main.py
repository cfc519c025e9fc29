"""The `winq` command line: thin typer commands over library functions.

Every command turns a winq.WinqError into one red line on stderr and exit code 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from winq.config import QuantConfig, TrainConfig
from winq.data import DEFAULT_DATA

from .common import (DataOpt, JsonOpt, ModelOpt, ThreadsOpt, _run, app, backend_help, build_configs, config_options,
                     err, note, out, with_parameters)


@app.command()
@config_options(QuantConfig, TrainConfig, after="data")
def train(
    model: ModelOpt = None,
    data: Annotated[str, typer.Option("--data", help="training text: ptb | sotu | generated (sampled from the model) | "
                                      "a .txt/.jsonl file or folder | a mixture a+b in equal shares (the default: "
                                      "PTB news, State of the Union speeches and the model's own text)")]
    = DEFAULT_DATA,
    calib_data: Annotated[Optional[str], typer.Option("--calib-data", help="calibration text (default: --data)")]
    = None,
    teacher: Annotated[Optional[str], typer.Option(help="teacher model folder for --distill (default: the float "
                                                   "model being quantized); must share its vocabulary")] = None,
    out: Annotated[Path, typer.Option(help="checkpoint folder to write")] = Path("runs/winq"),
    resume: Annotated[bool, typer.Option(help="continue the run saved in --out (its saved settings are used)")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing checkpoint in --out")] = False,
    threads: ThreadsOpt = None,
    progress: Annotated[
        bool, typer.Option(help="show progress: a bar on a terminal, a plain line every 10 steps otherwise")
    ] = True,
    hessian_every: Annotated[
        int,
        typer.Option(
            "--hessian-every",
            help="log a Hessian spectrum summary into metrics.jsonl every N steps "
            "(0: never; costs probes x steps HVPs, see `winq hessian`)",
        ),
    ] = 0,
    **config,
):
    """Quantization-aware training (WinQ or plain QAT); writes a checkpoint folder to --out. Every option between
    --data and --calib-data is a field of winq.QuantConfig or winq.TrainConfig, with that field's default."""
    from winq.train import train as run_train

    def go():
        qcfg, tcfg = build_configs(config, QuantConfig, TrainConfig)
        from winq.checkpoint import is_checkpoint

        if resume and is_checkpoint(out):
            err.print(f"resuming {out}: the run's saved settings are used")
        return run_train(model, data, qcfg, tcfg, out, resume=resume, overwrite=overwrite, progress=progress,
                         threads=threads, hessian_every=hessian_every, teacher=teacher, calib_data=calib_data)

    res = _run(go)
    loss = f"final loss {res.final_loss:.4f}" if res.final_loss is not None else "already complete: no steps run"
    out_msg = f"checkpoint: {res.out}  (step {res.step}, {loss}, {res.seconds:.0f} s)"
    Console().print(out_msg, highlight=False)


@app.command("eval")
def eval_cmd(
    backend: Annotated[str, typer.Option(help=backend_help())] = "fakequant",
    checkpoint: Annotated[Optional[Path], typer.Option(help="winq checkpoint folder (fakequant backend)")] = None,
    packed: Annotated[
        Optional[Path],
        typer.Option(
            "--packed", help="packed backend: a winq checkpoint or a GPTQ export folder (default: --checkpoint)"
        ),
    ] = None,
    gptq: Annotated[Optional[Path], typer.Option("--gptq", help="GPTQ folder (gptq backend)")] = None,
    gguf: Annotated[Optional[Path], typer.Option("--gguf", help="GGUF file (llamacpp backend)")] = None,
    onnx: Annotated[Optional[Path], typer.Option("--onnx", help="ONNX export folder (ort backend)")] = None,
    accuracy_level: Annotated[
        Optional[int],
        typer.Option(
            "--accuracy-level",
            help="ort: override the MatMulNBits accuracy level (0 exact float, 4 int8 activations); "
            "default: as exported",
        ),
    ] = None,
    act: Annotated[
        str,
        typer.Option(
            "--act",
            help="fakequant: emulate a runtime's 8-bit activation quantization in front of every quantized layer: "
            "llamacpp (types from --gguf's winq-export.json, else as the GGUF exporter would choose) | ort4 "
            "(MatMulNBits accuracy level 4; block size and bits from --onnx's record, else the exporter's "
            "defaults) | none (default)",
        ),
    ] = "none",
    model: ModelOpt = None,
    data: DataOpt = "ptb",
    split: Annotated[str, typer.Option(help="train | valid | test")] = "test",
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", help="evaluate the first N tokens of the split (0: all)")
    ] = 16384,
    seq_len: Annotated[int, typer.Option("--seq-len", help="window length")] = 512,
    stride: Annotated[
        Optional[int],
        typer.Option(
            help="targets scored per window after the first (default: seq_len - 1, windows overlapping by one token)"
        ),
    ] = None,
    threads: ThreadsOpt = None,
    with_float: Annotated[bool, typer.Option("--float/--no-float", help="also run the float model (--model, else "
                                             "the checkpoint's base model) and report every backend's KL divergence "
                                             "to it and top-1 agreement with it")] = True,
    as_json: JsonOpt = False,
):
    """Perplexity of one or more backends on the same token ids and windows; with several, the
    first (fakequant when listed) is the reference for relative ppl, KL divergence and top-1 agreement."""
    import torch

    from winq.errors import ConfigError

    def go():
        from winq.evaluate import eval_ids
        from winq.runtime.backends import (BACKENDS, LoadOptions, float_model_for, parse_names, resolve_artifact,
                                           tokenizer_for)
        from winq.runtime.compare import compare

        names = parse_names(backend)
        order = (["fakequant"] if "fakequant" in names else []) + [n for n in names if n != "fakequant"]
        given = {"checkpoint": checkpoint, "packed": packed, "gptq": gptq, "gguf": gguf, "onnx": onnx, "model": model}
        paths = {n: resolve_artifact(BACKENDS[n], given) for n in order}  # every refusal before any loading
        if seq_len < 2:
            raise ConfigError(f"--seq-len must be at least 2, got {seq_len}")
        if threads:
            torch.set_num_threads(threads)
        from winq.runtime.act import ACT_CHOICES

        if act not in ACT_CHOICES:
            raise ConfigError(f"--act {act!r}: choose one of {', '.join(ACT_CHOICES)}")
        if act != "none" and "fakequant" not in names:
            raise ConfigError("--act applies to the fakequant backend: add fakequant to --backend")
        act_from = {"llamacpp": gguf, "ort4": onnx}.get(act)
        opts = LoadOptions(threads=threads, context=seq_len, accuracy_level=accuracy_level, act=act,
                           act_artifact=act_from)
        sessions = {n: BACKENDS[n].load(paths[n], opts) for n in order}
        fp_path = float_model_for(given) if with_float and "fp" not in order else None
        if fp_path is not None:  # the float model, after every artifact loaded (or was refused)
            paths["fp"] = fp_path
            sessions["fp"] = BACKENDS["fp"].load(fp_path, opts)
        elif with_float and "fp" not in order and not as_json:
            note("no float model is known for these artifacts (their checkpoint records none): pass --model to "
                 "report KL to it", label="note:")
        tok = tokenizer_for([checkpoint, *paths.values()])
        ids = eval_ids(tok, data, split, max_tokens or None)
        res = compare(
            {n: s.logits for n, s in sessions.items()}, ids, seq_len=seq_len, stride=stride, progress=not as_json,
            float_ref="fp" if "fp" in sessions else None,
        )
        plan = getattr(sessions.get("fakequant"), "act_plan", None)
        if plan is not None:
            res["act"] = {"mode": act, "plan": plan.describe(), "schemes": plan.counts()}
        return res

    _print_eval(_run(go), data, split, seq_len, stride, as_json)


def _print_eval(res: dict, data: str, split: str, seq_len: int, stride: int, as_json: bool) -> None:
    """`winq eval`'s report: a table (and the relative differences), or the JSON record."""
    ref, results = res["reference"], res["results"]
    if "act" in res and not as_json:
        note(f"fakequant emulates {res['act']['plan']}", style="cyan", label="act:")
    rel = {n: r["ppl_rel_diff"] for n, r in results.items() if n != ref}
    if as_json:
        print(
            json.dumps(
                {
                    "data": data,
                    "split": split,
                    "seq_len": seq_len,
                    "stride": stride or seq_len - 1,
                    "results": results,
                    **({"reference": ref, "ppl_relative_diff": rel} if rel else {}),
                    **({"float_reference": res["float_reference"]} if res.get("float_reference") else {}),
                    **({"act": res["act"]} if "act" in res else {}),
                },
                indent=2,
            )
        )
        return
    t = Table(title=f"{data}/{split}: {next(iter(results.values()))['tokens']} tokens, windows of {seq_len}")
    fl = res.get("float_reference")
    cols = ("backend", "ppl", "rel. diff", "KL", "top-1 agree", *(("KL to float", "top-1 float") if fl else ()),
            "seconds")
    for c in cols:
        t.add_column(c, justify="left" if c == "backend" else "right")
    for name, r in results.items():
        extra = (
            ("reference", "", "")
            if name == ref
            else (f"{r['ppl_rel_diff']:+.3e}", f"{r['kl']:.3e}", f"{r['top1_agreement']:.4f}")
        )
        if fl:
            extra = (*extra, *(("float", "") if name == fl else (f"{r['kl_float']:.3e}", f"{r['top1_float']:.4f}")))
        t.add_row(name, f"{r['ppl']:.6f}", *extra, f"{r['seconds']:.1f}")
    out.print(t)
    for name, d in rel.items():
        out.print(
            f"{name} vs {ref}: ppl {results[name]['ppl']:.6f} vs {results[ref]['ppl']:.6f}, relative difference "
            f"{d:+.3e}",
            highlight=False,
        )


def _format_options() -> tuple[list, dict[str, tuple[str, list[str]]]]:
    """The export command's flags generated from every format's Options dataclass:
    ([inspect.Parameter], {field: (flag, [formats that have it])})."""
    import dataclasses
    import inspect
    import typing

    from winq.exporters import exporter_class, formats

    params, owners, by_name = [], {}, {}
    for fmt in formats():
        opts = exporter_class(fmt).Options
        hints = typing.get_type_hints(opts)
        for f in dataclasses.fields(opts):
            flag = "--" + f.name.replace("_", "-")
            if f.name in owners:  # a flag several formats share: one flag, each format's help
                owners[f.name][1].append(fmt)
                i = by_name[f.name]
                ann = params[i].annotation
                opt_info = typing.get_args(ann)[1]
                opt_info.help = f"{opt_info.help}; {fmt}: {f.metadata.get('help', '')}"
                continue
            by_name[f.name] = len(params)
            owners[f.name] = (flag, [fmt])
            base = next(t for t in (bool, int, float, str) if t == hints[f.name] or t in typing.get_args(hints[f.name]))
            decl = f"{flag}/--no-{flag[2:]}" if base is bool else flag
            help_ = f"{fmt}: {f.metadata.get('help', '')}"
            params.append(
                inspect.Parameter(
                    f.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=None,
                    annotation=Annotated[Optional[base], typer.Option(decl, help=help_)],
                )
            )
    return params, owners


def _float_kinds(manifest: dict) -> str:
    """'61 f32, 1 q8_0': how many of the manifest's non-quantized tensors each storage type holds."""
    from collections import Counter

    kinds = Counter(str(f.get("dtype", "float")) for f in manifest.get("float_tensors", []))
    return ", ".join(f"{n} {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])) or "none"


DEFAULT_EXPORT = {"gguf": Path("runs/winq-gguf/model.gguf"), "onnx": Path("runs/winq-onnx"),
                  "gptq": Path("runs/winq-gptq")}  # winq export's --out when none is given


def export_cmd(
    checkpoint: Annotated[Path, typer.Option(help="winq checkpoint folder (written by `winq train`)")]
    = Path("runs/winq"),
    out_dir: Annotated[
        Optional[Path], typer.Option("--out", help="where to write (a temporary sibling, renamed when verified); "
                                     "default: runs/winq-gguf/model.gguf, runs/winq-onnx or runs/winq-gptq")
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="export format: gguf (a llama.cpp file) | gptq (a folder) | onnx (a folder)")
    ] = "gptq",
    overwrite: Annotated[bool, typer.Option(help="replace an existing export in --out")] = False,
    as_json: JsonOpt = False,
    **format_options,
):
    """Export a trained checkpoint bit-exactly (verified by reading the file back); writes winq-export.json."""
    import warnings

    from winq.exporters import ExportWarning, export

    def go():
        from winq.errors import ConfigError
        from winq.exporters import formats

        if fmt not in formats():
            raise ConfigError(f"unknown export format {fmt!r}: choose one of {', '.join(formats())}")
        opts = {}
        for key, value in format_options.items():
            if value is None:
                continue
            flag, owners = _OWNERS[key]
            if fmt not in owners:
                raise ConfigError(f"{flag} is an option of --format {'/'.join(owners)}, not of --format {fmt}")
            opts[key] = value
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExportWarning)  # printed below as notes
            dest = out_dir if out_dir is not None else DEFAULT_EXPORT[fmt]
            return export(fmt, checkpoint, dest, overwrite=overwrite, **opts)

    _print_export(_run(go), fmt, checkpoint, as_json)


def _print_export(res, fmt: str, checkpoint: Path, as_json: bool) -> None:
    """`winq export`'s report: the notes and a table of every tensor, or the JSON record."""
    m = res.manifest
    if as_json:
        print(
            json.dumps({"out": str(res.out), "summary": m["summary"], "info": m["info"], "notes": res.notes}, indent=2)
        )
        return
    for n in res.notes:
        note(n)
    info = m["info"]
    group = "per row" if info.get("group_size", -1) == -1 else f"group {info.get('group_size')}"
    detail = {
        "gptq": f"checkpoint_format {info.get('checkpoint_format')}",
        "gguf": f"{info.get('arch')}, types {', '.join(info.get('types', []))}",
    }.get(fmt, "")
    t = Table(
        title=f"{fmt} export ({detail}) of {checkpoint}: {info.get('grid', '')}, {group}"
        if detail
        else f"{fmt} export of {checkpoint}"
    )
    t.add_column("tensor", no_wrap=True)
    for c in ("bits", "stored as", "shape", "bits/w", "max err"):
        t.add_column(c, justify="right", no_wrap=True)
    for r in m["tensors"]:
        bits = f"{r['bits']}" if r["container_bits"] == r["bits"] else f"{r['bits']} in {r['container_bits']}"
        kind = "native" if r["container"] == "native" else "container"
        stored = r["container"].split(":")[0] if fmt == "gguf" else kind
        t.add_row(
            r["name"],
            bits,
            stored,
            "x".join(map(str, r["shape"])),
            f"{r['bits_per_weight']:.3f}",
            f"{r['max_abs_err']:g}",
        )
    out.print(t)
    s = m["summary"]
    from winq.formats.manifest import record_path

    rec = f" (record: {record_path(res.out)})" if res.out.is_file() else ""
    out.print(
        f"wrote {res.out}{rec}: {s['tensors']} quantized tensors, max error {s['max_abs_err']:g} (read back from the "
        "file), "
        f"{s['bits_per_weight']:.3f} bits/weight, {s['float_tensors']} other tensors ({_float_kinds(m)}), "
        f"{res.seconds:.1f} s",
        highlight=False,
    )


def _register_export() -> None:
    """Register `winq export` with the fixed options above plus one flag per field of each format's Options."""
    import inspect

    global _OWNERS
    generated, _OWNERS = _format_options()
    fixed = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for p in inspect.signature(export_cmd, eval_str=True).parameters.values()
        if p.kind != p.VAR_KEYWORD
    ]
    app.command("export")(with_parameters(export_cmd, fixed + generated))


_OWNERS: dict[str, tuple[str, list[str]]] = {}
_register_export()


@app.command("hessian")
def hessian_cmd(
    checkpoint: Annotated[Path, typer.Option(help="winq checkpoint folder (written by `winq train`)")],
    data: DataOpt = "ptb",
    split: Annotated[
        str, typer.Option(help="train | valid | test: the fixed batches are the split's first blocks")
    ] = "train",
    batches: Annotated[int, typer.Option(help="fixed batches the loss is averaged over")] = 4,
    batch_size: Annotated[int, typer.Option("--batch-size", help="sequences per batch")] = 1,
    seq_len: Annotated[int, typer.Option("--seq-len", help="tokens per sequence")] = 128,
    top_k: Annotated[int, typer.Option("--top-k", help="eigenvalues reported at each end")] = 8,
    probes: Annotated[int, typer.Option(help="Rademacher probes (SLQ density and Hutchinson trace)")] = 8,
    steps: Annotated[
        int,
        typer.Option(help="Lanczos iterations per probe (HVPs = probes x steps; memory = steps x params x 4 bytes)"),
    ] = 16,
    eps: Annotated[float, typer.Option(help="near-zero band |lambda| <= eps x max|lambda|")] = 1e-2,
    by_type: Annotated[bool, typer.Option("--by-type", help="also attention-only and MLP-only spectra")] = False,
    seed: Annotated[int, typer.Option(help="probe seed")] = 0,
    out_json: Annotated[
        Path, typer.Option("--out", help="JSON to write; the density plot goes beside it (.png)")
    ] = Path("results/hessian.json"),
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
):
    """Hessian spectrum of the loss w.r.t. the quantized latent weights: extremes, density, near-zero share, trace."""
    import torch

    def go():
        if threads:
            torch.set_num_threads(threads)
        from winq.hessian import checkpoint_spectrum, plot_density, write_json

        sums, meta = checkpoint_spectrum(
            checkpoint,
            data,
            split,
            batches,
            batch_size,
            seq_len,
            by_type=by_type,
            top_k=top_k,
            probes=probes,
            steps=steps,
            seed=seed,
            eps_rel=eps,
        )
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
        t.add_row(
            k,
            str(s.n_params),
            f"{s.loss:.4f}",
            f"{s.top[0]:.4g}",
            f"{s.bottom[0]:.4g}",
            f"{s.trace:.4g}",
            f"{s.near_zero:.3f}",
            f"{s.positive_mass:.3f}",
            f"{s.negative_mass:.3f}",
            str(s.hvps),
            f"{s.seconds:.1f}",
        )
    out.print(t)
    s = sums["all"]
    out.print(
        f"top {', '.join(f'{x:.4g}' for x in s.top)}; bottom {', '.join(f'{x:.4g}' for x in s.bottom)}",
        highlight=False,
        markup=False,
    )
    out.print(f"wrote {out_json} and {png}", highlight=False, markup=False)


# `winq bench` and `winq inspect` live in cli/tools.py; importing it registers them on `app`
from . import tools as _tools  # noqa: E402,F401


def main() -> None:
    app()


if __name__ == "__main__":
    main()
