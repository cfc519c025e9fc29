"""Edge latency at real model shapes: every deployable GGUF / ONNX type against its float baseline.

    winq bench --shape llama-3.2-1b                      # all types, 1 and 2 threads -> results/edge.json + .png
    python benchmarks/edge.py --shape llama-100m --types f16,q4_0 --threads 2
    python benchmarks/edge.py --list-shapes

A shape is a Hugging Face config (benchmarks/shapes/NAME.json: the config of a real model, with its
source and any change written beside it; or any config.json). The model is built from it with
**random weights** (seeded; decoding speed does not depend on weight values), prepared with winq's
grids so codes and scales are genuine (one scale per row, initialised as winq train does), saved as a
winq checkpoint and exported through the same exporters and read-back checks as a trained model. The
tokenizer is the built-in model's (49152 tokens; a larger vocabulary is padded with unused tokens, as
the GGUF writer does for any model).

Types (`--types`, default all):

| row        | format | grid      | what                                                              |
|------------|--------|-----------|-------------------------------------------------------------------|
| f16        | gguf   | -         | llama.cpp's float baseline (every weight F16)                     |
| q2_k ...   | gguf   | seq 2     | Q2_K; tq2_0 / tq1_0 from ternary, q3_k from lsq 3, q4_0 lsq 4, q8_0 lsq 8 |
| q4_0-head  | gguf   | lsq 4     | `--quantize-lm-head`: the output head in Q4_0 too (exact)         |
| q4_0-keep-q8_0 | gguf | lsq 4   | float embeddings / head stored Q8_0 after training (--keep q8_0): NOT exact |
| q2_k-keep-q6_k | gguf | seq 2   | the same with Q6_K (--keep q6_k): NOT exact                       |
| ort-fp32   | onnx   | -         | onnxruntime's float baseline                                      |
| ort-2bit   | onnx   | ternary   | MatMulNBits bits=2 (ort-4bit lsq 4, ort-8bit lsq 8), run at accuracy_level 0 and 4 |

Artifacts are built once into $WINQ_CACHE/edge/<shape>-s<seed>/ (each checkpoint in a fresh process,
whose peak memory is recorded, and removed once its exports are written), then every artifact is
timed by `winq bench`'s worker (runtime/bench/run.py: a fresh process per run, a warm-up run of the
first prefill length and `--warmup-gen` decode steps, then `--repeats` timed runs): prefill tokens/s at
each `--prefill` length, decode tokens/s after the first, per-token decode latency p50/p90/p99, load
time, peak RSS, file size and bits per weight (the whole file over every parameter of the model).
Speed-ups are over the float baseline of the same format at the same thread count, next to the
size ratio (the ideal of a memory-bound decode). When llama.cpp's own `llama-bench` is built
(benchmarks/llama_bench.py build), it is run on the f16 and q4_0 files as a cross-check.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SHAPES_DIR = Path(__file__).resolve().parent / "shapes"
RESULT_TAG = "WINQ-EDGE-RESULT "
BUILD_LOG = "build.json"  # in the shape's cache folder: {checkpoint: seconds, peak RSS, exports}
WEIGHTS_NOTE = "random weights (seeded): speed does not depend on weight values; perplexity is meaningless"


@dataclass(frozen=True)
class Variant:
    name: str
    fmt: str  # gguf | onnx
    grid: str | None = None  # None: the float baseline of the format
    bits: int | None = None
    options: dict = field(default_factory=dict)  # export options
    head: bool = False  # a --quantize-lm-head checkpoint
    levels: tuple = (None,)  # ort: MatMulNBits accuracy levels to time

    @property
    def baseline(self) -> str:
        return "f16" if self.fmt == "gguf" else "ort-fp32"

    @property
    def ckpt(self) -> str | None:
        """Key of the checkpoint it is exported from (None: a float baseline)."""
        return None if self.grid is None else f"{self.grid}{self.bits}{'-head' if self.head else ''}"


VARIANTS = {v.name: v for v in (
    Variant("f16", "gguf"),
    Variant("q2_k", "gguf", "seq", 2, {"type": "q2_k"}),
    Variant("tq2_0", "gguf", "ternary", 2, {"type": "tq2_0"}),
    Variant("tq1_0", "gguf", "ternary", 2, {"type": "tq1_0"}),
    Variant("q3_k", "gguf", "lsq", 3, {"type": "q3_k"}),
    Variant("q4_0", "gguf", "lsq", 4, {"type": "q4_0"}),
    Variant("q8_0", "gguf", "lsq", 8, {"type": "q8_0"}),
    Variant("q4_0-head", "gguf", "lsq", 4, {"type": "q4_0"}, head=True),
    # float embeddings / head quantized after training: NOT exact (the export records its ppl cost; off here, where
    # the weights are random)
    Variant("q4_0-keep-q8_0", "gguf", "lsq", 4, {"type": "q4_0", "keep": "q8_0", "keep_eval_tokens": 0}),
    Variant("q2_k-keep-q6_k", "gguf", "seq", 2, {"type": "q2_k", "keep": "q6_k", "keep_eval_tokens": 0}),
    Variant("ort-fp32", "onnx"),
    Variant("ort-2bit", "onnx", "ternary", 2, {}, levels=(0, 4)),
    Variant("ort-4bit", "onnx", "lsq", 4, {}, levels=(0, 4)),
    Variant("ort-8bit", "onnx", "lsq", 8, {}, levels=(0, 4)),
)}
BASE_BITS = {"gguf": 16, "onnx": 32}


# ---------------------------------------------------------------------------------------------
# shapes


def shape_names() -> list[str]:
    return sorted(p.stem for p in SHAPES_DIR.glob("*.json"))


def load_shape(name_or_path: str) -> dict:
    """{"name", "source", "changes", "config"} of a shipped shape or a config.json file; ConfigError otherwise."""
    from winq.errors import ConfigError

    p = Path(name_or_path)
    if not p.is_file():
        if p.suffix == ".json" or os.sep in name_or_path:
            raise ConfigError(f"--shape {name_or_path}: file not found")
        p = SHAPES_DIR / f"{name_or_path}.json"
        if not p.is_file():
            raise ConfigError(f"unknown shape {name_or_path!r}: choose one of {', '.join(shape_names())} or give a "
                              f"Hugging Face config.json")
    try:
        d = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--shape {p}: not a JSON file ({e})") from None
    if "config" not in d:  # a plain Hugging Face config.json
        d = {"name": p.parent.name if p.name == "config.json" else p.stem, "source": str(p), "changes": "none",
             "config": d}
    cfg = d["config"]
    missing = [k for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size") if k not in cfg]
    if missing:
        raise ConfigError(f"--shape {p}: not a causal LM config (missing {', '.join(missing)})")
    return d


def hf_config(shape: dict):
    from transformers import AutoConfig

    cfg = dict(shape["config"])
    return AutoConfig.for_model(cfg.pop("model_type"), **{k: v for k, v in cfg.items() if k != "architectures"})


def n_params(config) -> int:
    """Parameters of the model (tied embeddings counted once), from a meta-device build."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config)
    seen, n = set(), 0
    for p in m.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def parse_types(text: str | None) -> list[str]:
    from winq.errors import ConfigError

    if text in (None, "", "all"):
        return list(VARIANTS)
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in VARIANTS]
    if bad:
        raise ConfigError(f"unknown edge type {', '.join(bad)}: choose from {', '.join(VARIANTS)} (or all)")
    return names


# ---------------------------------------------------------------------------------------------
# build: one checkpoint (in its own process) -> its exports


def cache_dir(shape: dict, seed: int) -> Path:
    from winq.data import cache_dir as winq_cache

    return winq_cache() / "edge" / f"{shape['name']}-s{seed}"


def artifact_path(root: Path, v: Variant) -> Path:
    return root / v.name / ("model.gguf" if v.fmt == "gguf" else "")


def _done(root: Path, v: Variant) -> bool:
    a = artifact_path(root, v)
    if v.grid is None:
        return a.exists() if v.fmt == "gguf" else (a / "model.onnx").is_file()
    return (root / v.name / "winq-export.json").is_file()


def tokenizer_dir(tokenizer: str | None) -> str:
    """The folder whose tokenizer the shapes use: `tokenizer`, or the built-in model's."""
    if tokenizer is not None:
        return str(tokenizer)
    from winq.models import default_model_dir

    return str(default_model_dir())


def build_one(shape_file: str, key: str, variants: list[str], root: str, seed: int, keep_ckpt: bool,
              tokenizer: str | None = None) -> dict:
    """Build checkpoint `key` (grid+bits[-head]) of the shape and export `variants` from it (plus the float
    baselines when asked: their names in variants). Runs in its own process; returns what it did."""
    import torch

    from winq.checkpoint import load_checkpoint, read_info, save_checkpoint
    from winq.config import QuantConfig
    from winq.exporters import export
    from winq.prepare import prepare
    from winq.runtime.bench.measure import peak_rss_mb

    from transformers import AutoModelForCausalLM, AutoTokenizer

    shape = load_shape(shape_file)
    root = Path(root)
    grid, bits, head = _parse_key(key)
    ck = root / f"ckpt-{key}"
    t0 = time.time()
    info = {"checkpoint": key, "exports": {}}
    if (ck / "winq.json").is_file():
        loaded = load_checkpoint(ck)
    else:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config(shape), dtype=torch.float32)
        qcfg = QuantConfig(bits=bits, grid=grid, group_size=-1, quantize_lm_head=head)
        prepare(model, qcfg)
        tok = AutoTokenizer.from_pretrained(tokenizer_dir(tokenizer))
        save_checkpoint(ck, model, tok, qcfg, None,
                        meta={"edge": {"shape": shape["name"], "seed": seed, "weights": WEIGHTS_NOTE}})
        loaded = (model.eval(), tok, read_info(ck))
    info["checkpoint_s"] = time.time() - t0
    model, tok = loaded[0], loaded[1]
    for name in variants:  # every export from the model in memory (export() verifies against the same weights)
        v = VARIANTS[name]
        out = artifact_path(root, v)
        t1 = time.time()
        if v.grid is None:
            _write_float(v.fmt, model, tok, ck, out)
            info["exports"][name] = {"seconds": time.time() - t1, "float": True}
            continue
        res = export(v.fmt, ck, out, overwrite=True, model=loaded, **v.options)
        errs = [t.get("max_abs_err") for t in res.manifest["tensors"]]
        types = sorted({t.get("container", "").split(":")[0] for t in res.manifest["tensors"]})
        info["exports"][name] = {"seconds": time.time() - t1, "max_abs_err": max(errs) if errs else None,
                                 "containers": types, "notes": res.notes}
    if not keep_ckpt:
        shutil.rmtree(ck, ignore_errors=True)
    info["seconds"] = time.time() - t0
    info["peak_rss_mb"] = peak_rss_mb()
    return info


def _write_float(fmt: str, model, tok, ck: Path, out: Path) -> None:
    """The float baseline (F16 GGUF / fp32 ONNX) of the fake-quant model in memory, written atomically: what
    `winq.exporters.write_float(fmt, ck, out)` writes, without loading the checkpoint again."""
    from winq.fsutil import atomic_dir, atomic_file
    from winq.prepare import quantized_weights

    if fmt == "gguf":
        from winq.exporters.gguf import GGUFOptions, write_gguf

        with atomic_file(out) as tmp:
            write_gguf(tmp, model, quantized_weights(model), tok, ck, GGUFOptions(keep="f16"), float_weights=True)
    else:
        from winq.exporters.onnx_graph import export_float

        with atomic_dir(out) as tmp:
            export_float(model, tmp, metadata={"format": "onnx-fp32", "source": str(ck), "source_kind": "checkpoint"})
            tok.save_pretrained(str(tmp))
            model.config.save_pretrained(str(tmp))


def _build_log(shape: dict, seed: int) -> dict:
    """What building each checkpoint of the shape took (seconds, the build process's peak RSS, each export)."""
    log = cache_dir(shape, seed) / BUILD_LOG
    return json.loads(log.read_text()) if log.is_file() else {}


def _parse_key(key: str):
    head = key.endswith("-head")
    k = key[: -len("-head")] if head else key
    grid = k.rstrip("0123456789")
    return grid, int(k[len(grid):]), head


def build(shape: dict, shape_file: str, types: list[str], seed: int, say, keep_ckpt: bool = False,
          tokenizer: str | None = None) -> dict:
    """Every artifact of `types` (and their baselines) under cache_dir(shape, seed); one process per checkpoint."""
    from winq.errors import WinqError

    root = cache_dir(shape, seed)
    root.mkdir(parents=True, exist_ok=True)
    want = list(dict.fromkeys([VARIANTS[t].baseline for t in types] + types))
    todo = [t for t in want if not _done(root, VARIANTS[t])]
    groups: dict[str, list[str]] = {}
    for t in todo:
        v = VARIANTS[t]
        groups.setdefault(v.ckpt, []).append(t)
    floats = groups.pop(None, [])
    if floats:  # float baselines: written from one of the checkpoints being built (any; speed only)
        key = next(iter(groups), "lsq4")
        groups.setdefault(key, []).extend(floats)
    report = {}
    for i, (key, names) in enumerate(groups.items(), 1):
        say(f"[build {i}/{len(groups)}] {shape['name']}: checkpoint {key} -> {', '.join(names)}")
        cmd = [sys.executable, "-m", "winq.benchmarks.edge", "--build-one", key, "--shape", shape_file,
               "--types", ",".join(names), "--seed", str(seed), "--root", str(root)]
        if keep_ckpt:
            cmd.append("--keep-checkpoints")
        if tokenizer is not None:
            cmd += ["--tokenizer", str(tokenizer)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x[len(RESULT_TAG):] for x in reversed(p.stdout.splitlines()) if x.startswith(RESULT_TAG)), None)
        if p.returncode != 0 or line is None:
            tail = " | ".join((p.stderr or "").strip().splitlines()[-8:])
            raise WinqError(f"building {key} of {shape['name']} failed (exit {p.returncode}): {tail}")
        report[key] = json.loads(line)
        say(f"  built in {report[key]['seconds']:.0f} s, peak RSS {report[key]['peak_rss_mb']:.0f} MB")
        log = root / BUILD_LOG  # every checkpoint's build, kept beside the artifacts for the report
        done = json.loads(log.read_text()) if log.is_file() else {}
        done[key] = report[key]
        log.write_text(json.dumps(done, indent=2) + "\n")
    return report


# ---------------------------------------------------------------------------------------------
# bench


def runs_of(types: list[str], threads: list[int]) -> list[tuple[str, Variant, int | None, int]]:
    """(row name, variant, accuracy level, threads): baselines first within each thread count."""
    rows = []
    for t in threads:
        names = list(dict.fromkeys([VARIANTS[x].baseline for x in types] + types))
        names.sort(key=lambda n: (VARIANTS[n].fmt, VARIANTS[n].grid is not None))
        for n in names:
            v = VARIANTS[n]
            for lvl in v.levels:
                rows.append((n if lvl is None else f"{n}-acc{lvl}", v, lvl, t))
    return rows


def bench(shape: dict, types: list[str], threads: list[int], seed: int, prefill: list[int], gen_tokens: int,
          repeats: int, warmup_gen: int, say, tokenizer: str | None = None) -> dict:
    from transformers import AutoTokenizer

    from winq.evaluate import eval_ids
    from winq.runtime.bench import BenchSpec, Job, run_job
    from winq.runtime.bench.measure import artifact_bytes

    root = cache_dir(shape, seed)
    spec = BenchSpec(backends=("llamacpp",), prompt_tokens=max(prefill), gen_tokens=gen_tokens, repeats=repeats)
    # the prompt: PTB test text in the built-in tokenizer (every shape's artifacts carry it)
    ids = [int(t) for t in eval_ids(AutoTokenizer.from_pretrained(tokenizer_dir(tokenizer)), "ptb", "test",
                                    max(prefill))]
    total = n_params(hf_config(shape))
    results = {}
    rows = runs_of(types, threads)
    for i, (name, v, lvl, t) in enumerate(rows, 1):
        art = artifact_path(root, v)
        say(f"[{i}/{len(rows)}] {shape['name']} {name} threads {t}")
        kind = "llamacpp" if v.fmt == "gguf" else "ort"
        r = run_job(Job(name, kind, art), ids, spec, threads=t, prefill_lengths=prefill, accuracy_level=lvl,
                    warmup_gen=warmup_gen)
        size = artifact_bytes(art)
        r.update(type=v.name, format=v.fmt, grid=v.grid, bits=v.bits, head_quantized=v.head, accuracy_level=lvl,
                 threads=t, artifact=str(art), size_bytes=size, bits_per_weight=8 * size / total)
        r.pop("generated", None)
        results[f"{name}@t{t}"] = r
        say(f"    prefill {r['prefill_tok_s']:.1f} tok/s, decode {r['decode_tok_s']:.2f} tok/s, "
            f"p50 {r['decode_ms']['p50']:.1f} ms, {size / 2**20:.0f} MB")
    return {"params": total, "results": results}


def add_speedups(results: dict) -> None:
    """Each row's speed-ups over the float baseline of its format at the same thread count, and the size ratio."""
    for r in results.values():
        r.pop("speedup", None)
        b = results.get(f"{VARIANTS[r['type']].baseline}@t{r['threads']}")
        if b is None or b is r:
            continue
        sp = {"decode": r["decode_tok_s"] / b["decode_tok_s"]}
        for n in r["prefill"]:
            if n in b["prefill"]:
                sp[f"prefill_{n}"] = r["prefill"][n]["tok_s"] / b["prefill"][n]["tok_s"]
        sp["size_ratio"] = b["size_bytes"] / r["size_bytes"]
        sp["decode_vs_size_ratio"] = sp["decode"] / sp["size_ratio"]
        r["speedup"] = sp


def cross_check(shape: dict, types: list[str], threads: list[int], seed: int, prefill: list[int], gen_tokens: int,
                repeats: int, bench_res: dict, say) -> dict:
    """llama.cpp's own llama-bench on the f16 and q4_0 files (when built), beside winq bench's figures."""
    try:
        from winq.runtime.bench.llama import find_llama_bench, run_llama_bench
        find_llama_bench()
    except Exception as e:  # noqa: BLE001 - the cross-check is optional; say why it did not run
        return {"run": False, "reason": f"{type(e).__name__}: {e}"}
    root = cache_dir(shape, seed)
    out = {"run": True, "rows": {}}
    t = max(threads)
    for name in [n for n in ("f16", "q4_0", "q2_k", "tq2_0") if n in types or n == "f16"]:
        art = artifact_path(root, VARIANTS[name])
        if not art.exists():
            continue
        say(f"llama-bench {name} threads {t}")
        lb = run_llama_bench(art, threads=t, n_prompt=prefill[0], n_gen=gen_tokens, repeats=max(repeats, 2))
        mine = bench_res["results"].get(f"{name}@t{t}")
        row = {"llama_bench": lb}
        if mine:
            row["winq_bench"] = {"prefill_tok_s": mine["prefill_tok_s"], "decode_tok_s": mine["decode_tok_s"]}
            for k in ("prefill_tok_s", "decode_tok_s"):
                if lb.get(k):
                    row[f"{k}_ratio_winq_over_llama_bench"] = mine[k] / lb[k]
        out["rows"][name] = row
    return out


RUNTIME_DSOS = ("ggml", "llama")  # llama.cpp's shared libraries (libggml-cpu, libggml-base, libllama)
PERF_FREQ = 499  # perf record -F: samples per second (a tiny model's decode needs more to be seen at all)
PERF_PERCENT_LIMIT = 0.02  # perf report rows below this share of all samples are left out


def perf_profile(kind: str, artifact: Path, ids: list[int], threads: int, level, gen_tokens: int,
                 top: int = 12) -> dict:
    """Where llama.cpp spends a decode's time: `perf record` (Linux perf, every thread) over one winq bench worker
    that prefills 16 tokens and decodes `gen_tokens`, then the share of samples per library and the symbols of
    llama.cpp's libraries with the largest share (`perf report --sort dso,sym`). The worker's Python start-up
    and model load are in the samples too: the `runtime_pct` of each symbol is its share of llama.cpp's own."""
    import tempfile

    from winq.runtime.bench import worker_command

    if shutil.which("perf") is None:
        return {"run": False, "reason": "perf (Linux perf tools) is not installed"}
    with tempfile.TemporaryDirectory() as d:
        idf, data = Path(d) / "ids.json", Path(d) / "perf.data"
        idf.write_text(json.dumps(ids[:16]))
        cmd = worker_command(kind, artifact, idf, gen_tokens, 1, threads, accuracy_level=level, warmup_gen=1)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        r = subprocess.run(["perf", "record", "-F", str(PERF_FREQ), "-o", str(data), "--", *cmd],
                           capture_output=True, text=True, env=env)
        if r.returncode != 0:
            return {"run": False, "reason": f"perf record failed: {(r.stderr or '').strip()[-300:]}"}
        rep = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--sort", "dso,sym", "--percent-limit",
                              str(PERF_PERCENT_LIMIT)], capture_output=True, text=True)
    rows, by_dso = [], {}
    for line in rep.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0].endswith("%") and parts[2] in ("[.]", "[k]"):
            pct = float(parts[0][:-1])
            rows.append({"pct": pct, "dso": parts[1], "symbol": " ".join(parts[3:])})
            by_dso[parts[1]] = by_dso.get(parts[1], 0.0) + pct
    mine = [x for x in rows if any(k in x["dso"] for k in RUNTIME_DSOS)]
    total = sum(x["pct"] for x in mine) or 1.0
    for x in mine:
        x["runtime_pct"] = 100 * x["pct"] / total
    return {"run": True, "tool": f"perf record -F {PERF_FREQ}; perf report --sort dso,sym",
            "note": "whole worker process (Python start-up, load, a 16-token prefill, the decode steps)",
            "runtime_share_pct": sum(x["pct"] for x in mine),
            "by_dso": dict(sorted(by_dso.items(), key=lambda kv: -kv[1])[:8]), "top": mine[:top]}


def ort_profile(folder: Path, ids: list[int], threads: int, level, gen_tokens: int, top: int = 10) -> dict:
    """Where onnxruntime spends a decode's time, from its own profiler (its shared library has no symbols for
    perf): a 16-token prefill, then `gen_tokens` steps; node time summed per operator type over the steps."""
    import tempfile

    from winq.formats.onnx import OrtDecoder

    with tempfile.TemporaryDirectory() as d:
        dec = OrtDecoder(folder, threads=threads, accuracy_level=level, profile_prefix=str(Path(d) / "ort"))
        nxt = int(dec.prefill(ids[:16])[-1].argmax())
        for _ in range(gen_tokens):
            nxt = int(dec.step(nxt).argmax())
        trace = json.loads(Path(dec.session.end_profiling()).read_text())
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    steps = runs[1:]  # the first run is the prefill
    t0 = steps[0]["ts"] if steps else 0
    by_op: dict[str, float] = {}
    for e in trace:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e.get("ts", 0) >= t0:
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + e["dur"]
    step_us = sum(e["dur"] for e in steps) or 1.0
    ops = sorted(by_op.items(), key=lambda kv: -kv[1])[:top]
    return {"run": True, "tool": "onnxruntime SessionOptions.enable_profiling", "steps": len(steps),
            "ms_per_step": step_us / 1000 / max(len(steps), 1),
            "ops": [{"op": op, "ms_per_step": us / 1000 / max(len(steps), 1), "pct_of_step": 100 * us / step_us}
                    for op, us in ops]}


def profiles(shape: dict, types: list[str], threads: list[int], seed: int, gen_tokens: int, rows, say,
             tokenizer: str | None = None) -> dict:
    """{row: profile} of each asked row (e.g. q4_0, ort-4bit-acc4) at the largest thread count."""
    from transformers import AutoTokenizer

    from winq.errors import ConfigError
    from winq.evaluate import eval_ids

    known = {name for name, *_ in runs_of(list(VARIANTS), [1])}
    bad = [r for r in rows if r not in known]
    if bad:
        raise ConfigError(f"--profile {', '.join(bad)}: choose rows from {', '.join(sorted(known))}")
    ids = [int(t) for t in eval_ids(AutoTokenizer.from_pretrained(tokenizer_dir(tokenizer)), "ptb", "test", 16)]
    out = {}
    for name, v, lvl, t in runs_of(list(VARIANTS), [max(threads)]):
        if name not in rows:
            continue
        say(f"profile of {name} decode, {t} threads")
        art = artifact_path(cache_dir(shape, seed), v)
        out[name] = (perf_profile("llamacpp", art, ids, t, lvl, gen_tokens) if v.fmt == "gguf" else
                     ort_profile(art, ids, t, lvl, gen_tokens))
    return out


# ---------------------------------------------------------------------------------------------
# report


def plot(report: dict, png) -> None:
    """Decode speed-up over the float baseline vs bits per weight, per shape; the size-ratio ideal drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    shapes = report["shapes"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(6.2 * len(shapes), 4.6), squeeze=False)
    for ax, (sname, s) in zip(axes[0], shapes.items()):
        res = s["results"]
        labels = []
        for fmt, color in (("gguf", "#3b75af"), ("onnx", "#c44e52")):
            base = [r for r in res.values() if r["format"] == fmt and r["grid"] is None]
            if not base:
                continue
            bpw0 = base[0]["bits_per_weight"]
            xs = np.linspace(1.2, bpw0, 100)
            ax.plot(xs, bpw0 / xs, color=color, lw=0.8, ls="--",
                    label=f"size ratio ({'F16 GGUF' if fmt == 'gguf' else 'fp32 ONNX'})")
            for key, r in res.items():
                if r["format"] != fmt or "speedup" not in r:
                    continue
                mk = "o" if r["threads"] == 1 else "s"
                ax.scatter(r["bits_per_weight"], r["speedup"]["decode"], color=color, marker=mk,
                           facecolors="none" if r["threads"] == 1 else color, s=28)
                if r["threads"] == max(x["threads"] for x in res.values()):
                    labels.append((key.split("@")[0], r["bits_per_weight"], r["speedup"]["decode"]))
        ax.set_xlabel("bits per weight (whole file / every parameter)")
        ax.set_ylabel("decode speed-up over the float baseline")
        ax.set_title(f"{sname} ({s['params'] / 1e6:.0f}M params; open = 1 thread, filled = 2)", fontsize=9)
        ax.set_yscale("log")
        _place_labels(ax, labels)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"winq edge bench: {WEIGHTS_NOTE}", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110, format="png")
    plt.close(fig)


def _place_labels(ax, labels: list[tuple[str, float, float]], height: float = 9.0, width: float = 7.0) -> None:
    """Annotate the points, moving a label up (in steps of one text line) while it would overlap one placed before."""
    ax.figure.canvas.draw()  # fix the scales, so data -> pixel positions are final
    to_px = ax.transData.transform
    placed: list[tuple[float, float, float]] = []  # x0, x1, y of each placed label, in pixels
    for text, x, y in sorted(labels, key=lambda t: (t[2], t[1])):
        px, py = to_px((x, y))
        dy = 3.0
        x0, x1 = px + 3, px + 3 + width * len(text) * 0.6
        while any(a < x1 and x0 < b and abs((py + dy) - yy) < height for a, b, yy in placed):
            dy += height
        placed.append((x0, x1, py + dy))
        ax.annotate(text, (x, y), fontsize=7, xytext=(3, dy * 72 / ax.figure.dpi), textcoords="offset points",
                    arrowprops=dict(arrowstyle="-", lw=0.4, color="0.5") if dy > 3 else None)


def write(report: dict, out_json: Path) -> tuple[Path, Path]:
    """results/edge.json and the speed-up plot beside it, each written atomically."""
    from winq.runtime.bench.report import write_report

    return write_report(report, out_json, plot_fn=plot)


def table(s: dict, threads: int) -> str:
    """A markdown table of one shape at one thread count."""
    lines = ["| type | size MB | bits/w | load s | peak RSS MB | prefill 128 tok/s | prefill 512 tok/s | "
             "decode tok/s | p50 / p90 / p99 ms | decode x | size x |", "|---" * 11 + "|"]
    for key, r in s["results"].items():
        if r["threads"] != threads:
            continue
        pf = r["prefill"]
        p = [pf[k]["tok_s"] for k in sorted(pf, key=int)]
        sp = r.get("speedup")
        lat = r["decode_ms"]
        lines.append(f"| {key.split('@')[0]} | {r['size_bytes'] / 2**20:.0f} | {r['bits_per_weight']:.2f} | "
                     f"{r['load_s']:.1f} | {r['peak_rss_mb']:.0f} | {p[0]:.1f} | {p[-1] if len(p) > 1 else 0:.1f} | "
                     f"{r['decode_tok_s']:.2f} | {lat['p50']:.0f} / {lat['p90']:.0f} / {lat['p99']:.0f} | "
                     f"{sp['decode'] if sp else 1:.2f} | {sp['size_ratio'] if sp else 1:.2f} |")
    return "\n".join(lines)


def run_edge(shape_arg: str, types=None, threads=(1, 2), seed: int = 0, prefill=(128, 512), gen_tokens: int = 32,
             repeats: int = 2, warmup_gen: int = 4, out: Path = Path("results/edge.json"), phase: str = "all",
             keep_ckpt: bool = False, say=print, tokenizer: str | None = None, profile=(),
             llama_bench: bool = True) -> dict:
    """Build and/or time one shape; merge it into `out` (other shapes' entries kept)."""
    from winq.errors import EXTRAS, ConfigError, check_installed
    from winq.runtime.bench.measure import machine_info

    shape = load_shape(shape_arg)
    types = parse_types(",".join(types) if isinstance(types, (list, tuple)) else types)
    if phase not in ("all", "build", "bench", "profile"):
        raise ConfigError(f"--phase {phase!r}: choose all, build, bench or profile")
    threads, prefill = [int(t) for t in threads], [int(n) for n in prefill]
    if any(t < 1 for t in threads) or any(n < 1 for n in prefill) or gen_tokens < 1 or repeats < 1:
        raise ConfigError("threads, prefill lengths, gen tokens and repeats must be >= 1")
    shape_file = str(SHAPES_DIR / f"{shape_arg}.json") if not Path(shape_arg).is_file() else shape_arg
    for fmt, extra in (("gguf", "llamacpp"), ("onnx", "onnx")):
        if any(VARIANTS[t].fmt == fmt for t in types):
            check_installed(*EXTRAS[extra], extra=extra, purpose=f"--shape with {fmt} types")
    build_info = build(shape, shape_file, types, seed, say, keep_ckpt, tokenizer)
    if phase == "build":
        return {"build": build_info}
    out = Path(out)
    report = json.loads(out.read_text()) if out.is_file() else {}
    report.setdefault("shapes", {})
    t0 = time.time()
    if phase == "profile":  # profiles only, merged into the shape's entry of an earlier run
        entry = report["shapes"].get(shape["name"])
        if entry is None or entry.get("seed") != seed:
            raise ConfigError(f"--phase profile adds to an earlier run of {shape['name']} (seed {seed}) in {out}: "
                              f"none there")
        entry["build"] = _build_log(shape, seed) or entry.get("build", {})
        entry["profile"] = {**entry.get("profile", {}),
                            **profiles(shape, types, threads, seed, gen_tokens, profile, say, tokenizer)}
        write(report, out)
        return report
    res = bench(shape, types, threads, seed, prefill, gen_tokens, repeats, warmup_gen, say, tokenizer)
    res["cross_check"] = (cross_check(shape, types, threads, seed, prefill, gen_tokens, repeats, res, say)
                          if llama_bench else {"run": False, "reason": "not asked for (--no-cross-check)"})
    if profile:
        res["profile"] = profiles(shape, types, threads, seed, gen_tokens, profile, say, tokenizer)
    old = report["shapes"].get(shape["name"], {})
    results, runs, same = {}, [], old.get("seed") == seed and old.get("config") == shape["config"]
    if same:  # rows of earlier runs of the same model are kept (a later run replaces the rows it times)
        results.update(old.get("results", {}))
        runs = list(old.get("runs", []))
        for k in ("profile",):
            res[k] = {**old.get(k, {}), **res.get(k, {})}
        if not res["cross_check"].get("run") and old.get("cross_check", {}).get("run"):
            res["cross_check"] = old["cross_check"]
    results.update(res.pop("results"))
    for r in results.values():  # JSON keys: prefill lengths as strings, also in this run's rows
        r["prefill"] = {str(k): v for k, v in r["prefill"].items()}
    add_speedups(results)
    runs.append({"types": types, "threads": threads, "prefill": prefill, "gen_tokens": gen_tokens,
                 "repeats": repeats, "warmup": f"one run: the first prefill length and {warmup_gen} decode steps",
                 "command": " ".join(sys.argv), "bench_seconds": time.time() - t0})
    entry = {
        "shape": {k: shape[k] for k in ("name", "source", "changes")}, "config": shape["config"],
        "weights": WEIGHTS_NOTE, "seed": seed,
        "settings": {"llamacpp": "llama-cpp-python 0.3.36, F16 KV cache, n_batch = n_ctx, mmap (library defaults)",
                     "ort": "CPUExecutionProvider, intra_op_num_threads = threads, inter_op 1, graph optimization "
                            "ORT_ENABLE_ALL (default), MatMulNBits accuracy_level overridden per row (-acc0/-acc4)",
                     "timing": "winq bench's worker (runtime/bench/run.py), a fresh process per row"},
        "runs": runs, "machine": machine_info(None),
        "build": _build_log(shape, seed), **res, "results": results,
    }
    report["shapes"][shape["name"]] = entry
    report["about"] = ("winq edge bench (benchmarks/edge.py, `winq bench --shape`): every deployable GGUF and "
                       "ONNX type against its float baseline on models of real shapes; " + WEIGHTS_NOTE)
    jpath, png = write(report, out)
    for t in threads:
        say(f"\n{shape['name']}, {t} thread(s):\n" + table(entry, t))
    say(f"wrote {jpath} and {png}")
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", help="a shipped shape (" + ", ".join(shape_names()) + ") or a config.json")
    p.add_argument("--types", default="all", help="comma-separated: " + ", ".join(VARIANTS) + " (default all)")
    p.add_argument("--threads", default="1,2", help="thread counts, comma-separated (default 1,2)")
    p.add_argument("--prefill", default="128,512", help="prefill lengths; decode follows the first (default 128,512)")
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup-gen", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phase", default="all", choices=("all", "build", "bench", "profile"),
                   help="build the artifacts only, time them (building what is missing), or only add --profile rows")
    p.add_argument("--out", default="results/edge.json")
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--list-shapes", action="store_true")
    p.add_argument("--profile", default="", help="rows to profile with Linux perf at the largest thread count, "
                                                  "e.g. f16,q4_0,ort-4bit-acc4")
    p.add_argument("--no-cross-check", action="store_true", help="do not run llama.cpp's llama-bench on f16/q4_0")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the built-in model's)")
    p.add_argument("--build-one", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    from winq.errors import WinqError

    if a.list_shapes:
        for n in shape_names():
            s = load_shape(n)
            print(f"{n}: {s['source']}")
        return 0
    if not a.shape:
        p.error("--shape is required")
    try:
        if a.build_one:
            info = build_one(a.shape, a.build_one, a.types.split(","), a.root, a.seed, a.keep_checkpoints,
                             a.tokenizer)
            print(RESULT_TAG + json.dumps(info), flush=True)
            return 0
        run_edge(a.shape, a.types, a.threads.split(","), a.seed, a.prefill.split(","), a.gen_tokens, a.repeats,
                 a.warmup_gen, Path(a.out), a.phase, a.keep_checkpoints, tokenizer=a.tokenizer,
                 profile=[x for x in a.profile.split(",") if x], llama_bench=not a.no_cross_check)
    except WinqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
