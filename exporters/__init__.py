"""winq.exporters: whole files (metadata, tokenizer, graph) assembled around winq.formats' bytes, all
written from `QuantizedWeight` (ARCHITECTURE §2, §5).

    from winq.exporters import export
    res = export("gptq", "runs/winq", "runs/winq-gptq", checkpoint_format="gptq")
    res.out, res.manifest["tensors"][0]["max_abs_err"]      # 0.0: read back from the written file

A format is an `Exporter` subclass registered under its name (`@register("gptq")`):

    Options                                  a frozen dataclass; its fields (with `option(default, help)`)
                                             are the format's options and generate the CLI flags
    write(folder, source, options)  -> Written    the files, one record per tensor, notes, `layout`
                                                  (what verify must find in the file)
    check(source, options)          optional: refuse what write() cannot do, before anything is made
    verify(folder, written, reference) -> Verified   {tensor: max |dequant(file) - reference|}, read back
                                                  from the written files, plus the checks it ran

`source` and `reference` are the same `Source`: the checkpoint's model, tokenizer and QuantizedWeights.
`export()` owns what every format shares: load the checkpoint, write into a temporary sibling,
read the written file back and verify it (every quantized tensor must match with max abs error 0),
write `winq-export.json`, then rename into place. A failed or interrupted export leaves nothing that
looks finished (ARCHITECTURE §6). `write_float(fmt, checkpoint, out)` writes the same model with
float weights in a format (the F16 GGUF / fp32 ONNX baselines of `winq bench`).

This package imports `winq` and `winq.formats` only (never the backends); format modules are
imported the first time a format is asked for, so `import winq.exporters` stays light.
"""

from __future__ import annotations

import importlib
import os
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from winq.config import option  # noqa: F401  (the exporters' Options fields: default + CLI help)
from winq.errors import ConfigError, WinqError
from winq.formats import manifest

# built-in formats: name -> module that registers it (imported on first use)
BUILTIN = {"gptq": "winq.exporters.gptq", "gguf": "winq.exporters.gguf", "onnx": "winq.exporters.onnx"}

_REGISTRY: dict[str, type[Exporter]] = {}


class ExportError(WinqError):
    """The written artifact does not read back exactly, or the output path cannot be used."""


class ExportWarning(UserWarning):
    """An export that is exact but not what was asked for literally (a wider container, a switched format)."""


def register(name: str):
    """Class decorator: make a format available to `get_exporter(name)` / `export(name, ...)`."""

    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ConfigError(f"export format {name!r} is registered twice ({_REGISTRY[name].__name__}, "
                              f"{cls.__name__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


@dataclass(frozen=True)
class Source:
    """What an export is made from and verified against: a loaded winq checkpoint."""

    checkpoint: Path
    info: dict  # the checkpoint's winq.json
    model: object  # the fake-quant model (transformers causal LM with QuantLinear layers)
    tokenizer: object
    qweights: dict  # {module name: QuantizedWeight}


@dataclass
class Written:
    """What an exporter's write() produced."""

    tensors: list  # list[manifest.TensorRecord] for quantized tensors
    floats: list = field(default_factory=list)  # list[manifest.FloatRecord] for tensors kept in float
    notes: list[str] = field(default_factory=list)  # warnings (containers, switched formats)
    info: dict = field(default_factory=dict)  # format-specific facts for the manifest
    layout: dict = field(default_factory=dict)  # format-specific: where verify finds each quantized tensor
    kept: dict = field(default_factory=dict)  # format-specific: float tensors verify reads back (post-training)
    options: object = None  # the options write() was given (verify reads them; not part of the record)


@dataclass
class Verified:
    """What an exporter's verify() found in the written files."""

    errors: dict[str, float]  # {module name: max |dequant(file) - QuantizedWeight.dequantize()|}
    checks: dict = field(default_factory=dict)  # further checks run (recorded in the manifest's info)


class Exporter(ABC):
    """Base of every format (see the module docstring)."""

    name: ClassVar[str] = "?"
    Options: ClassVar[type]
    # a one-file format: export() moves this file to --out, the record beside it
    single_file: ClassVar[str | None] = None

    def options(self, **opts):
        """The format's frozen options; ConfigError naming the valid keys for an unknown one."""
        names = [f.name for f in fields(self.Options)]
        unknown = sorted(set(opts) - set(names))
        if unknown:
            raise ConfigError(f"{self.name} export: unknown option {', '.join(unknown)}; options are "
                              f"{', '.join(names)}")
        return self.Options(**opts)

    def check(self, source: Source, options) -> None:
        """Refuse (ConfigError) what write() could not do with this checkpoint, before any file or folder is made."""

    @abstractmethod
    def write(self, folder: Path, source: Source, options) -> Written:
        """Write the artifact into the empty folder `folder`."""

    @abstractmethod
    def verify(self, folder: Path, written: Written, reference: Source) -> Verified:
        """Read the written files back and compare every quantized tensor with reference.qweights."""

    @classmethod
    def write_float(cls, src: Path, out: Path) -> None:
        """The model of `src` (a checkpoint or a Hugging Face folder) with float weights in this format at
        `out`, written atomically (a benchmark baseline; no record)."""
        raise ConfigError(f"the {cls.name} exporter writes no float copy")


# files of a checkpoint folder that travel with a folder export (tokenizer, generation defaults)
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


def copy_side_files(checkpoint: Path, folder: Path, tokenizer, also: tuple[str, ...] = ()) -> list[str]:
    """Copy the checkpoint's tokenizer files (and `also`) into folder; save `tokenizer` when it had none."""
    import shutil

    copied = [f for f in SIDE_FILES + also if (Path(checkpoint) / f).is_file()]
    for f in copied:
        shutil.copy2(Path(checkpoint) / f, Path(folder) / f)
    if not any(f.startswith("tokenizer") for f in copied) and tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return copied


def float_tensors(model, qweights, dedupe: bool = False) -> dict:
    """{state-dict key: tensor} of everything that is not a quantized Linear's weight, scale or zero point;
    dedupe=True keeps tied tensors (lm_head = embed_tokens) once, as transformers saves them."""
    owned = {f"{n}.{k}" for n in qweights for k in ("weight", "alpha", "zero_point")}
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        if k in owned:
            continue
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if dedupe and ptr in seen:
            continue
        seen.add(ptr)
        out[k] = v.detach().cpu()
    return out


def formats() -> tuple[str, ...]:
    """Names of every available format (built-in ones included)."""
    return tuple(sorted(set(_REGISTRY) | set(BUILTIN)))


def exporter_class(name: str) -> type[Exporter]:
    """The class registered as `name`; ConfigError listing the formats otherwise."""
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in _REGISTRY:
        raise ConfigError(f"unknown export format {name!r}: choose one of {', '.join(formats())}")
    return _REGISTRY[name]


def get_exporter(name: str) -> Exporter:
    """An instance of the exporter registered as `name`; ConfigError listing the formats otherwise."""
    return exporter_class(name)()


@dataclass
class ExportResult:
    out: Path
    manifest: dict
    notes: list[str]
    seconds: float


def _check_single_out(out: Path, overwrite: bool) -> None:
    """A single-file artifact (model.gguf) may replace only a winq export of the same name, with overwrite."""
    if out.is_dir():
        raise ExportError(f"{out} is a folder: give the file to write, e.g. {out / 'model.gguf'}")
    owner = manifest.owner(out.parent)
    if out.exists():
        if owner != out.name:
            raise ExportError(f"{out} exists and is not a winq export (no {manifest.MANIFEST} beside it names it); "
                              f"refusing to overwrite it")
        if not overwrite:
            raise ExportError(f"{out} already holds an export: pass --overwrite to replace it")
    elif owner is not None and owner != out.name and not overwrite:
        raise ExportError(
            f"{out.parent} already holds the {manifest.MANIFEST} of another export ({owner}); write to another folder "
            f"(one export per folder) or pass --overwrite to replace that record"
        )


def _check_folder_out(out: Path, overwrite: bool) -> None:
    """A folder artifact may replace only a winq export (a folder with a record), with overwrite."""
    if out.exists() and (out.is_file() or any(out.iterdir())):
        if out.is_file() or not (out / manifest.MANIFEST).is_file():
            raise ExportError(f"{out} exists and is not a winq export (no {manifest.MANIFEST}); refusing to overwrite "
                              "it")
        if not overwrite:
            raise ExportError(f"{out} already holds an export: pass --overwrite to replace it")


def load_source(checkpoint, model=None) -> Source:
    """A Source from a checkpoint folder, or from an already loaded (model, tokenizer, info) triple of it."""
    from winq.checkpoint import load_checkpoint, read_info
    from winq.prepare import quantized_weights

    checkpoint = Path(checkpoint)
    read_info(checkpoint)  # a clear CheckpointError before loading anything
    net, tok, info = model if model is not None else load_checkpoint(checkpoint)
    return Source(checkpoint, info, net, tok, quantized_weights(net))


def _write_verified(exporter: Exporter, tmp: Path, source: Source, options, out: Path) -> dict:
    """Write into tmp, read back and verify, write the record into tmp; returns the record."""
    written = exporter.write(tmp, source, options)
    verified = exporter.verify(tmp, written, source)
    for rec in written.tensors:
        rec.max_abs_err = verified.errors[rec.name]
    bad = {n: e for n, e in verified.errors.items() if e != 0.0}
    if bad:
        n, e = next(iter(bad.items()))
        raise ExportError(
            f"{exporter.name} export does not read back exactly: {len(bad)} tensors differ from the trained quantizer "
            f"(first: {n}, max abs error {e:g}); nothing was written to {out}"
        )
    record = manifest.build(exporter.name, options, source.checkpoint, source.info, written.tensors, written.floats,
                            written.notes, {**written.info, **verified.checks}, artifact=out.name)
    manifest.write(tmp / manifest.MANIFEST, record)
    return record


def export(fmt: str, checkpoint, out, overwrite: bool = False, model=None, **opts) -> ExportResult:
    """Export the winq checkpoint folder `checkpoint` to `out` in format `fmt`.

    opts are the format's options (see its `Options`); overwrite=True replaces an existing
    export in `out` (a folder that is not a winq export is never replaced). `model` may pass
    an already loaded (model, tokenizer, info) triple of `checkpoint` to skip loading it again.
    """
    from winq.fsutil import atomic_dir, temp_dir

    t0 = time.time()
    exporter = get_exporter(fmt)
    options = exporter.options(**opts)  # validate before any heavy work
    out = Path(out)
    single = exporter.single_file
    if single:
        _check_single_out(out, overwrite)
    else:
        _check_folder_out(out, overwrite)
    source = load_source(checkpoint, model)
    exporter.check(source, options)
    if single:
        with temp_dir(out) as tmp:
            record = _write_verified(exporter, tmp, source, options, out)
            # the record first: a crash between the two renames leaves a record without its file,
            # never a file without one
            os.replace(tmp / manifest.MANIFEST, out.parent / manifest.MANIFEST)
            os.replace(tmp / single, out)
    else:
        with atomic_dir(out) as tmp:
            record = _write_verified(exporter, tmp, source, options, out)
    for note in record["notes"]:
        warnings.warn(note, ExportWarning, stacklevel=2)
    return ExportResult(out=out, manifest=record, notes=list(record["notes"]), seconds=time.time() - t0)


def write_float(fmt: str, src, out) -> Path:
    """Write the model of `src` (a winq checkpoint: its fake-quant weights dequantized; or a Hugging Face
    model folder) with float weights in format `fmt` to `out`, atomically: the baselines `winq bench`
    compares llamacpp (an F16 GGUF) and ort (an fp32 ONNX) with."""
    cls = exporter_class(fmt)
    out = Path(out)
    cls.write_float(Path(src), out)
    return out


__all__ = ["Exporter", "Source", "Written", "Verified", "option", "register", "get_exporter", "exporter_class",
           "formats", "export", "write_float", "load_source", "copy_side_files", "float_tensors", "ExportError",
           "ExportWarning", "ExportResult"]
