"""winq-export.json: what an export holds and how exactly it holds it (ARCHITECTURE §6).

    {
      "format": "gptq", "format_version": 1, "winq_version": "0.1.0", "git_commit": ..., "exported_at": ...,
      "options": {...},                                   the exporter's options, as used
      "source": {"checkpoint": "runs/winq", "winq": {...}},   the checkpoint and its winq.json
      "info": {...},                                      format facts (bits, group size, checkpoint format)
      "summary": {"tensors": 210, "max_abs_err": 0.0, "bits_per_weight": 4.27, "bytes": ...},
      "tensors": [{"name", "grid", "bits", "container_bits", "container", "group_size",
                   "shape", "bits_per_weight", "bytes", "max_abs_err"}, ...],
      "float_tensors": [{"name", "dtype", "shape", "max_abs_err"}, ...],
      "notes": [...]
    }

`max_abs_err` of a quantized tensor is max |dequant(written file) - QuantizedWeight.dequantize()|,
computed from the file read back after writing; it must be 0. For a tensor kept in float it is
the rounding error of the stored dtype against the checkpoint's float32 value (0 for float32).
`bits_per_weight` counts every stored byte of the layer (codes, zeros, scales, indices).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

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


def write_manifest(folder, fmt: str, options, checkpoint, ckpt_info: dict, written, artifact: str | None = None) -> dict:
    """Write folder/winq-export.json and return its content."""
    import winq
    from winq.checkpoint import git_commit

    tensors = written.tensors
    total_bytes = sum(t.bytes for t in tensors)
    total_weights = sum(t.shape[0] * t.shape[1] for t in tensors)
    errs = [t.max_abs_err for t in tensors if t.max_abs_err is not None]
    manifest = {
        "format": fmt,
        "format_version": MANIFEST_VERSION,
        "artifact": artifact,  # the export's file or folder name (a GGUF file's record lies beside it)
        "winq_version": winq.__version__,
        "git_commit": git_commit(),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "options": _jsonable(options),
        "source": {"checkpoint": str(checkpoint), "winq": ckpt_info},
        "info": _jsonable(written.info),
        "summary": {
            "tensors": len(tensors),
            "max_abs_err": max(errs) if errs else None,
            "bytes": total_bytes,
            "bits_per_weight": round(8 * total_bytes / total_weights, 4) if total_weights else None,
            "float_tensors": len(written.floats),
            "float_max_abs_err": max((f.max_abs_err for f in written.floats), default=None),
        },
        "tensors": _jsonable(tensors),
        "float_tensors": _jsonable(written.floats),
        "notes": list(written.notes),
    }
    path = Path(folder) / MANIFEST
    tmp = path.with_suffix(".json.part")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(path)
    return manifest


def read_manifest(folder) -> dict:
    from . import ExportError

    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ExportError(f"{folder} is not a winq export (no {MANIFEST}); make one with `winq export`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: corrupt JSON ({e.msg} at line {e.lineno})") from None
