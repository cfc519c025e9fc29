"""winq.exporters: one module per file format, all written from `QuantizedWeight` (ARCHITECTURE §2, §5).

    from winq.exporters import export
    res = export("gptq", "runs/winq", "runs/winq-gptq", checkpoint_format="gptq")
    res.out, res.manifest["tensors"][0]["max_abs_err"]      # 0.0: read back from the written file

A format is an `Exporter` subclass registered under its name (`@register("gptq")`) with an
`Options` dataclass and three methods:

    options(**opts)                          -> a frozen, validated options object (shared)
    write(folder, model, qweights, tokenizer, ckpt, options) -> Written (tensor records, notes)
    verify(folder, qweights, written)        -> {tensor name: max |dequant(file) - QuantizedWeight.dequantize()|}

`export()` owns what every format shares: load the checkpoint, write into a temporary sibling
folder, read the written file back and verify it (every quantized tensor must match with
max abs error 0), write `winq-export.json`, then rename the folder into place. A failed or
interrupted export leaves nothing that looks finished (ARCHITECTURE §6).

This package imports `winq` only (never winq.runtime); format modules are imported the first
time a format is asked for, so `import winq.exporters` stays light.
"""

from __future__ import annotations

import importlib
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from winq.errors import ConfigError, WinqError

# built-in formats: name -> module that registers it (imported on first use)
BUILTIN = {"gptq": "winq.exporters.gptq", "gguf": "winq.exporters.gguf", "onnx": "winq.exporters.onnx"}

_REGISTRY: dict[str, type] = {}


class ExportError(WinqError):
    """The written artifact does not read back exactly, or the output folder cannot be used."""


class ExportWarning(UserWarning):
    """An export that is exact but not what was asked for literally (a wider container, a switched format)."""


def register(name: str):
    """Class decorator: make a format available to `get_exporter(name)` / `export(name, ...)`."""

    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ConfigError(f"export format {name!r} is registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


class Exporter:
    """Base of every format: `Options` is the format's frozen options dataclass; `options(**opts)`
    rejects unknown keys (naming the valid ones) and lets the dataclass validate the values."""

    name = "?"
    Options: type

    def options(self, **opts):
        from dataclasses import fields

        names = [f.name for f in fields(self.Options)]
        unknown = sorted(set(opts) - set(names))
        if unknown:
            raise ConfigError(f"{self.name} export: unknown option {', '.join(unknown)}; options are {', '.join(names)}")
        return self.Options(**opts)


def formats() -> tuple[str, ...]:
    """Names of every available format (built-in ones included)."""
    return tuple(sorted(set(_REGISTRY) | set(BUILTIN)))


def get_exporter(name: str):
    """An instance of the exporter registered as `name`; ConfigError listing the formats otherwise."""
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in _REGISTRY:
        raise ConfigError(f"unknown export format {name!r}: choose one of {', '.join(formats())}")
    return _REGISTRY[name]()


@dataclass
class Written:
    """What an exporter's write() produced: one record per tensor, plus notes for the user."""

    tensors: list  # list[manifest.TensorRecord] for quantized tensors
    floats: list = field(default_factory=list)  # list[manifest.FloatRecord] for tensors kept in float
    notes: list[str] = field(default_factory=list)  # warnings (containers, switched formats)
    info: dict = field(default_factory=dict)  # format-specific facts for the manifest


@dataclass
class ExportResult:
    out: Path
    manifest: dict
    notes: list[str]
    seconds: float


def _tmp_sibling(out: Path, tag: str) -> Path:
    return out.with_name(f".{out.name}.{tag}{os.getpid()}")


def _is_export(path: Path) -> bool:
    from .manifest import MANIFEST

    return (path / MANIFEST).is_file()


def _check_single_out(out: Path, overwrite: bool) -> None:
    """A single-file artifact (model.gguf) may replace only a winq export of the same name, with overwrite."""
    import json

    from .manifest import MANIFEST

    if out.is_dir():
        raise ExportError(f"{out} is a folder: give the file to write, e.g. {out / 'model.gguf'}")
    record = out.parent / MANIFEST
    owner = None
    if record.is_file():
        try:
            owner = json.loads(record.read_text()).get("artifact")
        except (json.JSONDecodeError, AttributeError):
            owner = "?"
    if out.exists():
        if owner != out.name:
            raise ExportError(f"{out} exists and is not a winq export (no {MANIFEST} beside it names it); refusing to overwrite it")
        if not overwrite:
            raise ExportError(f"{out} already holds an export: pass --overwrite to replace it")
    elif owner is not None and owner != out.name and not overwrite:
        raise ExportError(
            f"{out.parent} already holds the {MANIFEST} of another export ({owner}); write to another folder "
            f"(one export per folder) or pass --overwrite to replace that record"
        )


def export(fmt: str, checkpoint, out, overwrite: bool = False, model=None, **opts) -> ExportResult:
    """Export the winq checkpoint folder `checkpoint` to `out` in format `fmt`.

    opts are the format's options (see its `options()`); overwrite=True replaces an existing
    export in `out` (a folder that is not a winq export is never replaced). `model` may pass
    an already loaded (model, tokenizer, info) triple of `checkpoint` to skip loading it again.
    """
    from winq.checkpoint import load_checkpoint, read_info
    from winq.prepare import quantized_weights

    from .manifest import write_manifest

    t0 = time.time()
    exporter = get_exporter(fmt)
    options = exporter.options(**opts)  # validate before any heavy work
    checkpoint = Path(checkpoint)
    out = Path(out)
    single = getattr(exporter, "single_file", None)  # formats written as one file (gguf): record beside it
    if single:
        _check_single_out(out, overwrite)
    elif out.exists() and (out.is_file() or any(out.iterdir())):
        if out.is_file() or not _is_export(out):
            raise ExportError(f"{out} exists and is not a winq export (no winq-export.json); refusing to overwrite it")
        if not overwrite:
            raise ExportError(f"{out} already holds an export: pass --overwrite to replace it")
    read_info(checkpoint)  # a clear CheckpointError before loading anything
    net, tok, info = model if model is not None else load_checkpoint(checkpoint)
    qws = quantized_weights(net)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(out, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        written = exporter.write(tmp, net, qws, tok, checkpoint, options)
        errors = exporter.verify(tmp, qws, written)
        for rec in written.tensors:
            rec.max_abs_err = errors[rec.name]
        bad = {n: e for n, e in errors.items() if e != 0.0}
        if bad:
            n, e = next(iter(bad.items()))
            raise ExportError(
                f"{fmt} export does not read back exactly: {len(bad)} tensors differ from the trained quantizer "
                f"(first: {n}, max abs error {e:g}); nothing was written to {out}"
            )
        manifest = write_manifest(tmp, fmt, options, checkpoint, info, written, artifact=out.name)
        if single:
            from .manifest import MANIFEST

            # the record first: a crash between the two renames leaves a record without its file, never a file without one
            os.replace(tmp / MANIFEST, out.parent / MANIFEST)
            os.replace(tmp / single, out)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            from winq.fsutil import swap_into_place

            swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for note in written.notes:
        warnings.warn(note, ExportWarning, stacklevel=2)
    return ExportResult(out=out, manifest=manifest, notes=list(written.notes), seconds=time.time() - t0)


__all__ = ["Exporter", "register", "get_exporter", "formats", "export", "ExportError", "ExportWarning", "ExportResult", "Written"]
