"""`winq inspect`: what a GGUF file, ONNX model, GPTQ folder or winq checkpoint holds.

    from winq.runtime.inspection import inspect_artifact
    rep = inspect_artifact("runs/winq.gguf")
    rep["format"], rep["totals"]["bits_per_weight"], rep["record"]["clean"]

The report (a JSON-able dict):
    format      gguf | onnx | gptq | checkpoint
    tensors     [{name, type, bits, shape, params, bytes, bits_per_weight, quantized}, ...]
                shape is row-major (out, in) for weights, as torch prints it
    totals      file_bytes (every file of the artifact), tensors, quantized_tensors, params,
                quantized_params, bits_per_weight: 8 * stored bytes / weights over the quantized
                tensors only (codes, scales, zero points, indices all counted)
    winq        the winq settings the artifact was made with, as stored in it:
                GGUF metadata "winq.export" (a JSON string), ONNX metadata_props "winq.export",
                GPTQ config.json quantization_config (+ the record's source settings),
                a checkpoint's winq.json
    record      the verification record winq-export.json (a GGUF's lies beside it and names it in
                "artifact"; a folder's lies inside): present, clean (every tensor max_abs_err == 0
                and the summary says 0), and what is wrong otherwise. None for a checkpoint.

    backends    the backends of `winq eval` / `winq bench` that run it (runtime/backends.py's registry)

How bits are read (through winq.formats, no weights loaded): GGUF from each tensor's ggml type
and its byte size (gguf-py's GGUFReader); ONNX from every MatMulNBits node's `bits` /
`block_size` attributes and the bytes of its B, scales and zero_points initializers; GPTQ from
the safetensors headers (qweight/qzeros/scales/g_idx shapes and bytes) and the config's bits and
group size; a checkpoint's quantized layers hold float32 latent weights, so their
bits_per_weight is the nominal deployed cost: bits + 16 (float16 scale, plus the zero point's
bits for the affine grid) per group.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from winq.errors import ConfigError, FormatError, MissingDependencyError
from winq.formats import gguf as G
from winq.formats import manifest
from winq.formats.headers import DTYPE_BYTES, safetensors_headers
from winq.grids import GRIDS, GridSpec

from .backends import backends_for

KINDS = "a GGUF file (.gguf), an ONNX export folder or model.onnx, a GPTQ export folder (config.json with a GPTQ " \
        "quantization_config) or a winq checkpoint folder (winq.json)"
FLOAT_GGML = ("F32", "F16", "BF16", "F64")


def _bad(path, why: str) -> ConfigError:
    return ConfigError(f"{path}: {why}; winq inspect accepts {KINDS}")


def detect(path) -> str:
    """gguf | onnx | gptq | checkpoint for `path`, or ConfigError naming the accepted kinds."""
    path = Path(path)
    if not path.exists():
        raise _bad(path, "not found")
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(4)
        if head == G.MAGIC:
            return "gguf"
        if path.suffix == ".onnx":
            return "onnx"
        if path.suffix == ".gguf":
            raise _bad(path, f"not a GGUF file (magic {head!r}, expected {G.MAGIC!r})")
        raise _bad(path, "unknown file type")
    if (path / "model.onnx").is_file():  # before winq.json: an ONNX export carries its checkpoint's winq.json
        return "onnx"
    cfg = path / "config.json"
    if cfg.is_file():
        try:
            qc = json.loads(cfg.read_text()).get("quantization_config") or {}
        except (json.JSONDecodeError, AttributeError):
            raise _bad(path, "config.json is not valid JSON") from None
        if qc.get("quant_method") == "gptq":
            return "gptq"
        if (path / "winq.json").is_file():
            return "checkpoint"
        raise _bad(path, "a Hugging Face folder without a GPTQ quantization_config")
    if (path / "winq.json").is_file():
        return "checkpoint"  # read_info / the missing config.json are reported by inspect_checkpoint
    raise _bad(path, "a folder without winq.json, model.onnx or config.json")


def _bpw(nbytes: int, params: int) -> float | None:
    return round(8 * nbytes / params, 4) if params else None


def _row(name, type_, bits, shape, params, nbytes, quantized, **extra) -> dict:
    return {"name": name, "type": type_, "bits": bits, "shape": list(shape), "params": int(params),
            "bytes": int(nbytes),
            "bits_per_weight": _bpw(nbytes, params), "quantized": quantized, **extra}


def _totals(tensors: list[dict], file_bytes: int) -> dict:
    q = [t for t in tensors if t["quantized"]]
    qp, qb = sum(t["params"] for t in q), sum(t["bytes"] for t in q)
    return {"file_bytes": file_bytes, "tensors": len(tensors), "quantized_tensors": len(q),
            "params": sum(t["params"] for t in tensors), "quantized_params": qp, "bits_per_weight": _bpw(qb, qp)}


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


# ---- GGUF ----------------------------------------------------------------------------------------


def _gguf_field(reader, key: str):
    f = reader.get_field(key)
    if f is None:
        return None
    try:
        return f.contents()
    except (ValueError, IndexError, TypeError):
        return None


def inspect_gguf(path: Path) -> dict:
    try:
        reader = G.read(path)
        tensors_raw = list(reader.tensors)
    except (ValueError, OSError, KeyError, IndexError, struct.error) as e:
        raise _bad(path, f"corrupt or truncated GGUF ({type(e).__name__}: {e})") from None
    tensors = []
    for t in tensors_raw:
        tname = t.tensor_type.name
        quantized = tname not in FLOAT_GGML
        shape = [int(x) for x in reversed(t.shape.tolist())]  # ggml lists ne0 (the row length) first
        bits = None if quantized else {"F32": 32, "F16": 16, "BF16": 16, "F64": 64}[tname]
        tensors.append(_row(t.name, tname, bits, shape, t.n_elements, t.n_bytes, quantized))
    for row in tensors:  # a quantized type's nominal bits: its bits per weight without the rest of the block
        if row["quantized"]:
            row["bits"] = _ggml_code_bits(row["type"])
    meta_raw = _gguf_field(reader, "winq.export")
    winq = None
    if meta_raw is not None:
        try:
            winq = json.loads(meta_raw)
        except (json.JSONDecodeError, TypeError):
            winq = {"unparsed": meta_raw}
    meta = {k: _gguf_field(reader, k) for k in ("general.architecture", "general.name", "general.file_type")}
    types: dict[str, int] = {}
    for row in tensors:
        types[row["type"]] = types.get(row["type"], 0) + 1
    return {"format": "gguf", "tensors": tensors, "totals": {**_totals(tensors, path.stat().st_size), "types": types},
            "winq": winq, "metadata": {k: v for k, v in meta.items() if v is not None},
            "record": manifest.check(manifest.record_path(path), "gguf", artifact_name=path.name)}


def _ggml_code_bits(type_name: str) -> int | float | None:
    """Bits of one code in a ggml quant type (TQ1_0: log2(3) packed as 1.6)."""
    import re

    if type_name.startswith("TQ1"):
        return 1.6
    if type_name.startswith("TQ2"):
        return 2
    m = re.match(r"I?Q(\d)", type_name)
    return int(m.group(1)) if m else None


# ---- ONNX ----------------------------------------------------------------------------------------


def inspect_onnx(path: Path) -> dict:
    from winq.formats.onnx import MODEL_FILE, load_graph

    model_file = path if path.is_file() else path / MODEL_FILE
    folder = model_file.parent
    try:
        model = load_graph(model_file)
    except MissingDependencyError:
        raise
    except Exception as e:  # noqa: BLE001 - protobuf raises its own DecodeError family
        raise _bad(model_file, f"corrupt ONNX model ({type(e).__name__}: {e})") from None
    import onnx
    from onnx import helper

    g = model.graph

    def nbytes(init) -> int:
        itemsize = helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        return math.prod(init.dims) * itemsize

    inits = {i.name: i for i in g.initializer}
    used: set[str] = set()
    tensors, nbits, blocks = [], {}, {}
    for node in g.node:
        if node.op_type != "MatMulNBits":
            continue
        at = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        K, N, bits, bs = int(at["K"]), int(at["N"]), int(at.get("bits", 4)), int(at.get("block_size", 0))
        # B, scales, zero_points (g_idx, bias: not counted)
        parts = [n for n in list(node.input)[1:4] if n and n in inits]
        used.update(parts)
        nb = sum(nbytes(inits[n]) for n in parts)
        name = node.name or node.input[1]
        tensors.append(_row(name, "MatMulNBits", bits, (N, K), N * K, nb, True, block_size=bs,
                            accuracy_level=int(at.get("accuracy_level", 0)),
                            zero_points=(len(node.input) > 3 and bool(node.input[3]))))
        nbits[bits] = nbits.get(bits, 0) + 1
        blocks[bs] = blocks.get(bs, 0) + 1
    for name, init in inits.items():
        if name in used:
            continue
        dt = helper.tensor_dtype_to_np_dtype(init.data_type)
        tensors.append(_row(name, onnx.TensorProto.DataType.Name(init.data_type), dt.itemsize * 8, tuple(init.dims),
                            math.prod(init.dims), nbytes(init), False))
    props = {p.key: p.value for p in model.metadata_props}
    winq = None
    if "winq.export" in props:
        try:
            winq = json.loads(props["winq.export"])
        except json.JSONDecodeError:
            winq = {"unparsed": props["winq.export"]}
    file_bytes = _folder_bytes(folder) if path.is_dir() else model_file.stat().st_size + sum(
        (folder / loc).stat().st_size for loc in _external_files(model) if (folder / loc).is_file())
    return {"format": "onnx", "tensors": tensors,
            "totals": {**_totals(tensors, file_bytes),
                       "matmulnbits": len([t for t in tensors if t["type"] == "MatMulNBits"]),
                       "bits": {str(k): v for k, v in sorted(nbits.items())},
                       "block_sizes": {str(k): v for k, v in sorted(blocks.items())}},
            "winq": winq, "metadata": {"opset": [f"{o.domain or 'ai.onnx'}:{o.version}" for o in model.opset_import],
                                       "producer": model.producer_name or None},
            "record": manifest.check(manifest.record_path(model_file), "onnx")}


def _external_files(model) -> set[str]:
    files = set()
    for init in model.graph.initializer:
        for kv in init.external_data:
            if kv.key == "location":
                files.add(kv.value)
    return files


def _headers(*files) -> dict[str, dict]:
    try:
        return safetensors_headers(*files)
    except FormatError as e:
        raise _bad(files[0], str(e)) from None


def _float_row(name, h) -> dict:
    return _row(name, h["dtype"], 8 * DTYPE_BYTES.get(h["dtype"], 0) or None, h["shape"], math.prod(h["shape"]),
                h["bytes"], False)


# ---- GPTQ ----------------------------------------------------------------------------------------


def inspect_gptq(path: Path) -> dict:
    cfg = json.loads((path / "config.json").read_text())
    qc = cfg["quantization_config"]
    bits = int(qc.get("bits", 0))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise _bad(path, "a GPTQ config.json but no .safetensors weights")
    heads = _headers(*files)
    prefixes = sorted({k[: -len(".qweight")] for k in heads if k.endswith(".qweight")})
    if not prefixes:
        raise _bad(path, "a GPTQ config.json but no qweight tensors")
    tensors, used = [], set()
    for p in prefixes:
        parts = {s: heads.get(f"{p}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx")}
        if parts["scales"] is None or parts["qzeros"] is None:
            raise _bad(path, f"{p} has a qweight but no scales/qzeros")
        N = parts["qweight"]["shape"][1]
        K = parts["g_idx"]["shape"][0] if parts["g_idx"] else parts["qweight"]["shape"][0] * 32 // bits
        G = parts["scales"]["shape"][0]
        nb = sum(h["bytes"] for h in parts.values() if h)
        used.update(f"{p}.{s}" for s, h in parts.items() if h)
        tensors.append(_row(p, f"gptq int{bits}", bits, (N, K), N * K, nb, True, group_size=K // G if G else None,
                            **{f"{s}_shape": h["shape"] for s, h in parts.items() if h}))
    for name, h in heads.items():
        if name not in used:
            tensors.append(_float_row(name, h))
    rec = manifest.check(manifest.record_path(path), "gptq")
    winq = {"quantization_config": qc}
    if rec["present"]:
        m = manifest.read(manifest.record_path(path))
        winq["source"] = m.get("source")
        winq["export_options"] = m.get("options")
    return {"format": "gptq", "tensors": tensors, "totals": _totals(tensors, _folder_bytes(path)), "winq": winq,
            "metadata": {"architectures": cfg.get("architectures"), "model_type": cfg.get("model_type")}, "record": rec}


# ---- winq checkpoint -----------------------------------------------------------------------------


def inspect_checkpoint(path: Path) -> dict:
    from winq.checkpoint import read_info

    info = read_info(path)  # CheckpointError names what is wrong
    w = path / "model.safetensors"
    if not w.is_file():
        raise _bad(path, "a winq.json but no model.safetensors")
    heads = _headers(w)
    q = info["quant"]
    bits, grid = int(q["bits"]), q.get("grid")
    extra_bits = bits if grid == "affine" else 0  # the affine zero point is stored with the codes' bits
    quant = set(info.get("quantized_modules") or [])
    tensors = []
    for name, h in heads.items():
        mod, _, leaf = name.rpartition(".")
        if mod in quant and leaf == "weight":
            out_f, in_f = h["shape"]
            G = heads.get(f"{mod}.alpha", {"shape": [out_f, 1]})["shape"][1]
            nominal = bits + (16 + extra_bits) * G / in_f
            tensors.append(_row(name, f"{grid}{bits} (latent {h['dtype']})", bits, h["shape"], out_f * in_f,
                                round(nominal * out_f * in_f / 8), True, group_size=in_f // G, stored_bytes=h["bytes"]))
        else:
            tensors.append(_float_row(name, h))
    totals = _totals(tensors, w.stat().st_size)
    totals["bits_per_weight_note"] = ("nominal deployed cost (codes + float16 scales); the file holds float32 latent "
                                      "weights")
    return {"format": "checkpoint", "tensors": tensors, "totals": totals, "winq": info, "metadata": {}, "record": None,
            "diagnostics": _diagnostics(path)}


def _diagnostics(path: Path) -> dict:
    """The code-flip diagnostics of the run's metrics.jsonl (winq.diagnostics.summarize_metrics); {} without."""
    import json

    from winq.diagnostics import summarize_metrics

    log = path / "metrics.jsonl"
    if not log.is_file():
        return {}
    records = []
    for line in log.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a run killed mid-write leaves a torn last line
            break
    return summarize_metrics(records)


INSPECTORS = {"gguf": inspect_gguf, "onnx": inspect_onnx, "gptq": inspect_gptq, "checkpoint": inspect_checkpoint}


def inspect_artifact(path) -> dict:
    """The report described in the module docstring."""
    path = Path(path)
    kind = detect(path)
    rep = INSPECTORS[kind](path)
    backends = backends_for(kind)
    quant = ((rep.get("winq") or {}).get("quant") or {}) if kind == "checkpoint" else {}
    if quant.get("grid") in GRIDS and not GridSpec(quant["grid"], int(quant["bits"])).uniform:
        backends = [b for b in backends if b != "packed"]  # the packed kernels multiply s (q - z): not nl4's levels
    return {"path": str(path), **rep, "backends": backends}


__all__ = ["inspect_artifact", "detect", "KINDS"]
