"""winq-export.json: what an export holds and how exactly it holds it (ARCHITECTURE §6): written by
winq.exporters, read by winq.runtime (bench, inspect, the tokenizer of a GGUF) and checked here.

    {
      "format": "gptq", "format_version": 1, "artifact": "model.gguf" | folder name,
      "winq_version": "0.1.0", "git_commit": ..., "exported_at": ...,
      "options": {...},                                   the exporter's options, as used
      "source": {"checkpoint": "runs/winq", "winq": {...}},   the checkpoint and its winq.json
      "info": {...},                                      format facts (bits, group size, checks run)
      "summary": {"tensors": 210, "max_abs_err": 0.0, "bits_per_weight": 4.27, "bytes": ...},
      "tensors": [{"name", "grid", "bits", "container_bits", "container", "group_size",
                   "shape", "bits_per_weight", "bytes", "max_abs_err"}, ...],
      "float_tensors": [{"name", "dtype", "shape", "max_abs_err"}, ...],
      "notes": [...]
    }

Where it lies: inside a folder export; beside a single-file export (a GGUF), whose name it records
in "artifact" (one export per folder). `max_abs_err` of a quantized tensor is
max |dequant(written file) - QuantizedWeight.dequantize()|, computed from the file read back after
writing; it must be 0. For a tensor kept in float it is the rounding error of the stored dtype
against the checkpoint's float32 value (0 for float32). `bits_per_weight` counts every stored byte
of the layer (codes, zeros, scales, indices).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

from winq.errors import FormatError

MANIFEST = "winq-export.json"
MANIFEST_VERSION = 1


@dataclass
class TensorRecord:
    name: str  # module name, e.g. model.layers.0.self_attn.q_proj
    grid: str
    bits: int  # the grid's bits (QuantizedWeight.bits)
    container_bits: int  # bits per code in the file (> bits when a wider exact container is used)
    container: str  # "native" or how the codes were mapped, e.g. "q' = 2q + 1, z' = 4, s' = s/2"
    group_size: int  # elements per group along in_features (in_features for per-row)
    shape: tuple[int, int]  # (out, in)
    bytes: int  # bytes stored for this layer
    bits_per_weight: float
    max_abs_err: float | None = None  # filled in by verification


@dataclass
class FloatRecord:
    name: str
    dtype: str
    shape: tuple[int, ...]
    max_abs_err: float


def record_path(artifact) -> Path:
    """Where the record of `artifact` lies: inside a folder, beside a file."""
    artifact = Path(artifact)
    return (artifact.parent if artifact.is_file() or artifact.suffix == ".gguf" else artifact) / MANIFEST


def _jsonable(x):
    if is_dataclass(x):
        return {k: _jsonable(v) for k, v in asdict(x).items()}
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def build(fmt: str, options, checkpoint, ckpt_info: dict, tensors: list[TensorRecord], floats: list[FloatRecord],
          notes: list[str], info: dict, artifact: str | None) -> dict:
    """The record's content (see the module docstring)."""
    import winq
    from winq.checkpoint import git_commit

    total_bytes = sum(t.bytes for t in tensors)
    total_weights = sum(t.shape[0] * t.shape[1] for t in tensors)
    errs = [t.max_abs_err for t in tensors if t.max_abs_err is not None]
    return {
        "format": fmt,
        "format_version": MANIFEST_VERSION,
        "artifact": artifact,  # the export's file or folder name (a GGUF file's record lies beside it)
        "winq_version": winq.__version__,
        "git_commit": git_commit(),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "options": _jsonable(options),
        "source": {"checkpoint": str(checkpoint), "winq": ckpt_info},
        "info": _jsonable(info),
        "summary": {
            "tensors": len(tensors),
            "max_abs_err": max(errs) if errs else None,
            "bytes": total_bytes,
            "bits_per_weight": round(8 * total_bytes / total_weights, 4) if total_weights else None,
            "float_tensors": len(floats),
            "float_max_abs_err": max((f.max_abs_err for f in floats), default=None),
        },
        "tensors": _jsonable(tensors),
        "float_tensors": _jsonable(floats),
        "notes": list(notes),
    }


def write(path, record: dict) -> Path:
    """Write `record` to the file `path` atomically."""
    from winq.fsutil import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return Path(path)


def read(path) -> dict:
    """The record in file `path`; FormatError when it is missing or not a JSON object."""
    from winq.fsutil import read_json

    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path.parent} is not a winq export (no {MANIFEST}); make one with `winq export`")
    return read_json(path, FormatError)


def owner(folder) -> str | None:
    """The artifact the record in `folder` describes: None without a record, "?" when it is unreadable."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return read(path).get("artifact")
    except FormatError:
        return "?"


def source_checkpoint(artifact) -> Path | None:
    """The checkpoint an export was made from, as its record says (None if unknown or no longer there)."""
    try:
        src = Path(read(record_path(artifact))["source"]["checkpoint"])
    except (FormatError, OSError, KeyError, TypeError):
        return None
    return src if (src / "winq.json").is_file() else None


def check(path, fmt: str, artifact_name: str | None = None) -> dict:
    """{path, present, clean, max_abs_err, tensors, problems, record} of the record in file `path`:
    clean when it describes `artifact_name` (if given) in format `fmt` and every error is 0."""
    path = Path(path)
    out = {"path": str(path), "present": False, "clean": False, "max_abs_err": None, "tensors": None, "problems": []}
    if not path.is_file():
        out["problems"].append(f"no {MANIFEST}")
        return out
    try:
        m = read(path)
    except (FormatError, OSError) as e:
        out["problems"].append(f"unreadable ({e})")
        return out
    if artifact_name is not None and m.get("artifact") != artifact_name:
        out["problems"].append(f"{MANIFEST} beside it describes {m.get('artifact')!r}, not {artifact_name!r}")
        return out
    out["present"] = True
    probs = out["problems"]
    if m.get("format") != fmt:
        probs.append(f"record format {m.get('format')!r}, artifact is {fmt}")
    tensors = m.get("tensors") or []
    out["tensors"] = len(tensors)
    if not tensors:
        probs.append("no tensors recorded")
    bad = [t.get("name") for t in tensors if t.get("max_abs_err") != 0]
    if bad:
        probs.append(f"{len(bad)} tensors with max_abs_err != 0 (first: {bad[0]})")
    summary = m.get("summary") or {}
    out["max_abs_err"] = summary.get("max_abs_err")
    if summary.get("max_abs_err") != 0:
        probs.append(f"summary max_abs_err is {summary.get('max_abs_err')!r}, not 0")
    if summary.get("tensors") is not None and summary.get("tensors") != len(tensors):
        probs.append(f"summary counts {summary.get('tensors')} tensors, the record lists {len(tensors)}")
    out["clean"] = not probs
    keys = ("format", "winq_version", "git_commit", "exported_at", "options", "info", "summary")
    out["record"] = {k: m.get(k) for k in keys}
    return out
