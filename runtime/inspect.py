"""`winq inspect`: what a GGUF file, ONNX model, GPTQ folder or winq checkpoint holds.

    from winq.runtime.inspect import inspect_artifact
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

How bits are read: GGUF from each tensor's ggml type and its byte size (gguf-py's GGUFReader);
ONNX from every MatMulNBits node's `bits` / `block_size` attributes and the bytes of its B,
scales and zero_points initializers (the onnx package, imported lazily; weights are not
loaded); GPTQ from the safetensors header (qweight/qzeros/scales/g_idx shapes and bytes) and
the config's bits and group size; a checkpoint's quantized layers hold float32 latent weights,
so their bits_per_weight is the nominal deployed cost: bits + 16 (float16 scale, plus the zero
point's bits for the affine grid) per group.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from winq.errors import ConfigError, MissingDependencyError

KINDS = "a GGUF file (.gguf), an ONNX export folder or model.onnx, a GPTQ export folder (config.json with a GPTQ " \
        "quantization_config) or a winq checkpoint folder (winq.json)"
RECORD = "winq-export.json"
GGUF_MAGIC = b"GGUF"
FLOAT_GGML = ("F32", "F16", "BF16", "F64")
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                     "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


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
        if head == GGUF_MAGIC:
            return "gguf"
        if path.suffix == ".onnx":
            return "onnx"
        if path.suffix == ".gguf":
            raise _bad(path, f"not a GGUF file (magic {head!r}, expected {GGUF_MAGIC!r})")
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
    return {"name": name, "type": type_, "bits": bits, "shape": list(shape), "params": int(params), "bytes": int(nbytes),
            "bits_per_weight": _bpw(nbytes, params), "quantized": quantized, **extra}


def _totals(tensors: list[dict], file_bytes: int) -> dict:
    q = [t for t in tensors if t["quantized"]]
    qp, qb = sum(t["params"] for t in q), sum(t["bytes"] for t in q)
    return {"file_bytes": file_bytes, "tensors": len(tensors), "quantized_tensors": len(q),
            "params": sum(t["params"] for t in tensors), "quantized_params": qp, "bits_per_weight": _bpw(qb, qp)}


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


# ---- the verification record -------------------------------------------------------------------


def check_record(rec_path: Path, fmt: str, artifact_name: str | None = None) -> dict:
    """{path, present, clean, max_abs_err, tensors, problems} of a winq-export.json."""
    out = {"path": str(rec_path), "present": False, "clean": False, "max_abs_err": None, "tensors": None, "problems": []}
    if not rec_path.is_file():
        out["problems"].append(f"no {RECORD}")
        return out
    try:
        m = json.loads(rec_path.read_text())
        if not isinstance(m, dict):
            raise ValueError("not a JSON object")
    except (ValueError, OSError) as e:
        out["problems"].append(f"unreadable ({e})")
        return out
    if artifact_name is not None and m.get("artifact") != artifact_name:
        out["problems"].append(f"{RECORD} beside it describes {m.get('artifact')!r}, not {artifact_name!r}")
        return out
    out["present"] = True
    probs = out["problems"]
    if m.get("format") != fmt:
        probs.append(f"record format {m.get('format')!r}, artifact is {fmt}")
    tensors = m.get("tensors") or []
    out["tensors"] = len(tensors)
    if not tensors:
        probs.append("no tensors recorded")
    errs = [t.get("max_abs_err") for t in tensors]
    bad = [t.get("name") for t, e in zip(tensors, errs) if e != 0]
    if bad:
        probs.append(f"{len(bad)} tensors with max_abs_err != 0 (first: {bad[0]})")
    summary = m.get("summary") or {}
    out["max_abs_err"] = summary.get("max_abs_err")
    if summary.get("max_abs_err") != 0:
        probs.append(f"summary max_abs_err is {summary.get('max_abs_err')!r}, not 0")
    if summary.get("tensors") is not None and summary.get("tensors") != len(tensors):
        probs.append(f"summary counts {summary.get('tensors')} tensors, the record lists {len(tensors)}")
    out["clean"] = not probs
    out["record"] = {k: m.get(k) for k in ("format", "winq_version", "git_commit", "exported_at", "options", "info", "summary")}
    return out


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
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
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
            "record": check_record(path.parent / RECORD, "gguf", artifact_name=path.name)}


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


def _onnx():
    try:
        import onnx
    except ImportError:
        raise MissingDependencyError("inspecting ONNX needs the onnx package: run `pip install onnx`") from None
    return onnx


def inspect_onnx(path: Path) -> dict:
    onnx = _onnx()
    from onnx import helper

    model_file = path if path.is_file() else path / "model.onnx"
    folder = model_file.parent
    try:
        model = onnx.load(str(model_file), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises its own DecodeError family
        raise _bad(model_file, f"corrupt ONNX model ({type(e).__name__}: {e})") from None
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
        parts = [n for n in list(node.input)[1:4] if n and n in inits]  # B, scales, zero_points (g_idx, bias: not counted)
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
            "totals": {**_totals(tensors, file_bytes), "matmulnbits": len([t for t in tensors if t["type"] == "MatMulNBits"]),
                       "bits": {str(k): v for k, v in sorted(nbits.items())}, "block_sizes": {str(k): v for k, v in sorted(blocks.items())}},
            "winq": winq, "metadata": {"opset": [f"{o.domain or 'ai.onnx'}:{o.version}" for o in model.opset_import],
                                       "producer": model.producer_name or None},
            "record": check_record(folder / RECORD, "onnx")}


def _external_files(model) -> set[str]:
    files = set()
    for init in model.graph.initializer:
        for kv in init.external_data:
            if kv.key == "location":
                files.add(kv.value)
    return files


# ---- safetensors headers (shapes and bytes without loading any tensor) ---------------------------


def safetensors_header(file: Path) -> dict[str, dict]:
    """{name: {dtype, shape, bytes}} from a .safetensors header."""
    try:
        with open(file, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > 100_000_000:
                raise ValueError(f"header length {n}")
            head = json.loads(f.read(n))
    except (struct.error, ValueError, OSError) as e:
        raise _bad(file, f"corrupt safetensors file ({e})") from None
    out = {}
    for k, v in head.items():
        if k == "__metadata__":
            continue
        b, e = v["data_offsets"]
        out[k] = {"dtype": v["dtype"], "shape": list(v["shape"]), "bytes": e - b}
    return out


def _float_row(name, h) -> dict:
    return _row(name, h["dtype"], 8 * SAFETENSORS_BYTES.get(h["dtype"], 0) or None, h["shape"], math.prod(h["shape"]),
                h["bytes"], False)


# ---- GPTQ ----------------------------------------------------------------------------------------


def inspect_gptq(path: Path) -> dict:
    cfg = json.loads((path / "config.json").read_text())
    qc = cfg["quantization_config"]
    bits = int(qc.get("bits", 0))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise _bad(path, "a GPTQ config.json but no .safetensors weights")
    heads: dict[str, dict] = {}
    for f in files:
        heads.update(safetensors_header(f))
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
    rec = check_record(path / RECORD, "gptq")
    winq = {"quantization_config": qc}
    if rec["present"]:
        m = json.loads((path / RECORD).read_text())
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
    heads = safetensors_header(w)
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
    totals["bits_per_weight_note"] = "nominal deployed cost (codes + float16 scales); the file holds float32 latent weights"
    return {"format": "checkpoint", "tensors": tensors, "totals": totals, "winq": info, "metadata": {}, "record": None}


INSPECTORS = {"gguf": inspect_gguf, "onnx": inspect_onnx, "gptq": inspect_gptq, "checkpoint": inspect_checkpoint}


def inspect_artifact(path) -> dict:
    """The report described in the module docstring."""
    path = Path(path)
    kind = detect(path)
    rep = INSPECTORS[kind](path)
    return {"path": str(path), **rep}


__all__ = ["inspect_artifact", "detect", "check_record", "safetensors_header", "KINDS"]
