"""`winq bench`: prefill and decode speed, memory and size of every backend, each in its own process.

    from winq.runtime.bench import BenchSpec, run_bench
    res = run_bench(BenchSpec(backends=("fakequant", "packed"), checkpoint="runs/winq", threads=2))
    res["results"]["packed"]["decode_tok_s"]

What is measured, per backend (ARCHITECTURE §7):
- prefill tokens/s: one forward over a prompt of `prompt_tokens` real token ids (the first ids
  of the held-out split, winq.evaluate.eval_ids), from an empty KV cache;
- decode tokens/s: greedy generation of `gen_tokens` tokens, one token per forward, feeding
  the argmax back with the KV cache (past_key_values);
- load seconds and RSS right after loading, peak RSS at the end (VmHWM of /proc/self/status;
  getrusage's ru_maxrss, also recorded, is inherited from the parent across fork/exec on Linux), and the
  artifact's size on disk (a checkpoint's model.safetensors, a folder's total, a file).

Method: every backend runs in a fresh `python -m winq.runtime.bench` worker process (one JSON
line on stdout), so its peak memory is its own and nothing it imported or cached helps the next
one. The worker runs once to warm up (allocator, thread pools, lazy kernels) and then `repeats`
times; prefill and decode seconds are the medians. Timings are wall clock (time.perf_counter).

Baselines (`baseline=True`): torch backends (fakequant, packed, gptq) are compared with "fp",
the checkpoint's model with its fake-quant weights dequantized into plain float32 nn.Linear
(winq.prepare.convert), or the base model given as `model`; llamacpp with an F16 GGUF and ort
with an fp32 ONNX of the same checkpoint, built once into $WINQ_CACHE/bench/<key>/ by
winq.exporters.gguf.write_f16_gguf and winq.runtime.ort.export_fp32.

The llamacpp and ort workers call `winq.runtime.llamacpp.bench(path, prompt_ids, n_gen, threads)`
and `winq.runtime.ort.bench(folder, prompt_ids, n_gen, threads)`, which return prefill_tok_s,
decode_tok_s, prefill_s, decode_s (their own warm-up and median); their load time and RSS after
loading are reported when those functions return `load_s` / `rss_load_mb`, else left empty.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from winq.errors import ConfigError, WinqError

BACKENDS = ("fakequant", "packed", "gptq", "llamacpp", "ort")  # what --backend accepts
TORCH_BACKENDS = ("fakequant", "packed", "gptq", "fp")  # benchmarked by torch_bench() below
# backend -> the baseline it is compared with
BASELINE_OF = {"fakequant": "fp", "packed": "fp", "gptq": "fp", "llamacpp": "llamacpp-f16", "ort": "ort-fp32"}
# what each backend needs and the flag that gives it
NEEDS = {
    "fakequant": ("checkpoint", "--checkpoint DIR (a folder written by `winq train`)"),
    "packed": ("packed", "--packed PATH (a winq checkpoint or GPTQ export) or --checkpoint DIR"),
    "gptq": ("gptq", "--gptq FOLDER (a folder written by `winq export --format gptq`)"),
    "llamacpp": ("gguf", "--gguf FILE (a file written by `winq export --format gguf`)"),
    "ort": ("onnx", "--onnx FOLDER (a folder written by `winq export --format onnx`)"),
}
# the modules other backends come from, and what the bench calls in them
EXTERNAL = {
    "llamacpp": ("winq.runtime.llamacpp", "bench"),
    "ort": ("winq.runtime.ort", "bench"),
    "llamacpp-f16": ("winq.exporters.gguf", "write_f16_gguf"),
    "ort-fp32": ("winq.runtime.ort", "export_fp32"),
}
RESULT_TAG = "WINQ-BENCH-RESULT "  # the worker's result line (libraries may print on stdout too)
MB = 1024 * 1024


class BenchError(WinqError):
    """A benchmark worker failed; the message carries its error."""


@dataclass(frozen=True)
class BenchSpec:
    """What to benchmark. Paths may be None for backends not asked for."""

    backends: tuple[str, ...] = ("fakequant", "packed")
    checkpoint: str | None = None  # winq checkpoint (fakequant; packed's default; baselines' source)
    packed: str | None = None  # winq checkpoint or GPTQ folder for the packed runtime
    gptq: str | None = None  # GPTQ folder
    gguf: str | None = None  # GGUF file
    onnx: str | None = None  # ONNX folder or model.onnx
    model: str | None = None  # base model folder: the fp baseline when there is no checkpoint
    data: str = "ptb"  # prompt ids: the first prompt_tokens ids of this data set's split
    split: str = "test"
    prompt_tokens: int = 128  # prefill length
    gen_tokens: int = 32  # greedy decode steps
    threads: int | None = None  # CPU threads of every backend (None: each library's default)
    repeats: int = 3  # timed runs after one warm-up; medians are reported
    baseline: bool = True

    def __post_init__(self):
        names = tuple(self.backends)
        bad = [b for b in names if b not in BACKENDS]
        if bad or not names:
            raise ConfigError(f"unknown backend {bad[0] if bad else ''!r}: choose from {', '.join(BACKENDS)}")
        if len(set(names)) != len(names):
            raise ConfigError(f"backend listed twice in {','.join(names)}")
        for flag, v, lo in (("--prompt-tokens", self.prompt_tokens, 1), ("--gen-tokens", self.gen_tokens, 1),
                            ("--repeats", self.repeats, 1)):
            if not isinstance(v, int) or v < lo:
                raise ConfigError(f"{flag} must be an integer >= {lo}, got {v!r}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")


@dataclass
class Job:
    name: str  # result key: a backend or a baseline (fp, llamacpp-f16, ort-fp32)
    kind: str  # the worker's loader: fakequant | packed | gptq | fp | llamacpp | ort
    artifact: Path
    baseline_of: list[str] = field(default_factory=list)  # backends compared with this one


# ---------------------------------------------------------------------------------------------
# sizes and memory


def artifact_bytes(path) -> int:
    """Bytes on disk: a checkpoint's model.safetensors, a folder's files (recursively), or a file."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if (path / "winq.json").is_file() and (path / "model.safetensors").is_file():
        return (path / "model.safetensors").stat().st_size
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    raise ConfigError(f"{path} not found")


def rss_mb() -> float:
    """Resident set size of this process now (MB)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss / MB


def _proc_status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def ru_maxrss_mb() -> float:
    """getrusage(RUSAGE_SELF).ru_maxrss in MB (KB on Linux, bytes on macOS)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / MB if sys.platform == "darwin" else r / 1024


def peak_rss_mb() -> float:
    """Peak resident set size of this process (MB).

    Linux keeps ru_maxrss across fork and execve, so a worker started by a parent that holds
    torch would report at least the parent's peak; VmHWM (/proc/self/status) belongs to the
    process's own address space, fresh after execve, and is used where it exists.
    """
    hwm = _proc_status_mb("VmHWM")
    return hwm if hwm is not None else ru_maxrss_mb()


# ---------------------------------------------------------------------------------------------
# the torch benchmark (fakequant, packed, gptq, fp)


def _forward(model, ids, past, keep_last: bool):
    kw = {"logits_to_keep": 1} if keep_last else {}
    return model(input_ids=ids, past_key_values=past, use_cache=True, **kw)


def torch_bench(model, prompt_ids, n_gen: int, repeats: int = 3) -> dict:
    """Prefill and greedy-decode speed of a Hugging Face causal LM (warm-up run, then medians).

    prompt_ids: int64 (T,). Prefill = one forward over (1, T) with use_cache; decode = n_gen
    forwards of (1, 1) each, feeding back the argmax of the last logits with the KV cache.
    Only the last position's logits are computed where the model allows it (logits_to_keep=1),
    as a generation loop would.
    """
    import inspect

    import torch

    ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(1, -1)  # (1, T)
    keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
    model.eval()
    pre, dec, generated = [], [], None
    with torch.inference_mode():
        for r in range(repeats + 1):
            t0 = time.perf_counter()
            out = _forward(model, ids, None, keep_last)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
            t1 = time.perf_counter()
            past, toks = out.past_key_values, []
            for _ in range(n_gen):
                out = _forward(model, nxt, past, keep_last)
                past = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
                toks.append(int(nxt))
            t2 = time.perf_counter()
            del out, past
            if r:  # run 0 warms allocator, thread pool and lazy kernels
                pre.append(t1 - t0)
                dec.append(t2 - t1)
                generated = toks
    p, d = statistics.median(pre), statistics.median(dec)
    return {"prefill_tok_s": ids.shape[1] / p, "decode_tok_s": n_gen / d, "prefill_s": p, "decode_s": d,
            "n_prompt": ids.shape[1], "n_gen": n_gen, "generated": generated}


def load_torch_backend(kind: str, artifact):
    """The model a torch backend runs: fakequant | packed | gptq | fp (checkpoint dequantized, or a base model)."""
    if kind == "fakequant":
        from winq.checkpoint import load_checkpoint

        return load_checkpoint(artifact)[0]
    if kind == "packed":
        from winq.runtime.packed import load_packed

        return load_packed(artifact)
    if kind == "gptq":
        from winq.runtime.gptq import load_gptq

        return load_gptq(artifact)
    if kind == "fp":
        from winq.checkpoint import is_checkpoint, load_checkpoint
        from winq.prepare import convert

        if is_checkpoint(artifact):
            return convert(load_checkpoint(artifact)[0]).eval()
        from winq.models import load_base_model

        return load_base_model(str(artifact))[0].eval()
    raise ConfigError(f"unknown torch backend {kind!r}: choose from {', '.join(TORCH_BACKENDS)}")


def external(name: str):
    """The function another winq module provides for backend/baseline `name` (EXTERNAL), or a ConfigError."""
    mod, fn = EXTERNAL[name]
    if importlib.util.find_spec(mod) is None:
        raise ConfigError(f"{name} needs {mod}.{fn}(), but this winq has no {mod} module")
    f = getattr(importlib.import_module(mod), fn, None)
    if not callable(f):
        raise ConfigError(f"{name} needs {mod}.{fn}(), which {mod} does not define")
    return f


def worker(kind: str, artifact: str, prompt_ids: list[int], n_gen: int, threads: int | None, repeats: int) -> dict:
    """One backend's measurements, in this process (run it in a fresh one: see run_job)."""
    base_rss = None
    if kind in TORCH_BACKENDS:
        import torch
        import transformers  # noqa: F401  (imported before the clock starts: not load time)

        if threads:
            torch.set_num_threads(threads)
        base_rss = rss_mb()
        t0 = time.perf_counter()
        model = load_torch_backend(kind, artifact)
        load_s = time.perf_counter() - t0
        load_rss = rss_mb()
        res = torch_bench(model, prompt_ids, n_gen, repeats)
        res.update(load_s=load_s, rss_load_mb=load_rss, torch_threads=torch.get_num_threads())
    elif kind in ("llamacpp", "ort"):
        import inspect

        fn = external(kind)
        base_rss = rss_mb()
        kw = {"repeats": repeats} if "repeats" in inspect.signature(fn).parameters else {}
        got = dict(fn(artifact, list(prompt_ids), n_gen, threads, **kw))
        missing = [k for k in ("prefill_tok_s", "decode_tok_s", "prefill_s", "decode_s") if got.get(k) is None]
        if missing:
            raise BenchError(f"{EXTERNAL[kind][0]}.bench() returned no {', '.join(missing)}")
        res = {"load_s": None, "rss_load_mb": None, "n_prompt": len(prompt_ids), "n_gen": n_gen, **got}
    else:
        raise ConfigError(f"unknown worker backend {kind!r}")
    # ru_maxrss is the kernel's high-water mark, which may lag the current RSS by a few pages
    peak = max(x for x in (peak_rss_mb(), rss_mb(), res.get("rss_load_mb")) if x is not None)
    res.update(rss_base_mb=base_rss, peak_rss_mb=peak, ru_maxrss_mb=ru_maxrss_mb())
    return res


# ---------------------------------------------------------------------------------------------
# the parent: plan, prompt ids, baselines, one subprocess per backend


def cache_root() -> Path:
    return Path(os.environ.get("WINQ_CACHE", Path.home() / ".cache" / "winq")) / "bench"


def _record_checkpoint(artifact: Path) -> Path | None:
    """The checkpoint an export was made from, as its winq-export.json says (None if unknown or gone)."""
    rec = (artifact.parent if artifact.is_file() else artifact) / "winq-export.json"
    try:
        src = Path(json.loads(rec.read_text())["source"]["checkpoint"])
    except (OSError, KeyError, TypeError, ValueError):
        return None
    return src if (src / "winq.json").is_file() else None


def _exists(flag: str, p, want: str) -> Path:
    p = Path(p)
    ok = p.is_file() if want == "file" else p.is_dir() if want == "folder" else p.exists()
    if not ok:
        raise ConfigError(f"{flag} {p}: {'not found' if not p.exists() else f'not a {want}'}")
    return p


def plan(spec: BenchSpec) -> list[Job]:
    """Jobs in run order (each baseline right after the first backend compared with it), checked up front."""
    from winq.checkpoint import read_info

    paths: dict[str, Path] = {}
    for b in spec.backends:
        key, hint = NEEDS[b]
        val = getattr(spec, key) or (spec.checkpoint if b == "packed" else None)
        if val is None:
            raise ConfigError(f"backend {b} needs {hint}")
        flag = f"--{key}" if getattr(spec, key) is not None else "--checkpoint"
        paths[b] = _exists(flag, val, {"gguf": "file", "onnx": "any"}.get(key, "folder"))
    if spec.checkpoint is not None:
        read_info(_exists("--checkpoint", spec.checkpoint, "folder"))  # CheckpointError names what is wrong
    if "ort" in spec.backends:
        o = paths["ort"]
        if (o.is_file() and o.suffix != ".onnx") or (o.is_dir() and not (o / "model.onnx").is_file()):
            raise ConfigError(f"--onnx {o}: give an ONNX export folder (with model.onnx) or its model.onnx")
    if "gptq" in spec.backends and not (paths["gptq"] / "config.json").is_file():
        raise ConfigError(f"--gptq {paths['gptq']}: not a GPTQ export folder (no config.json); make one with `winq export --format gptq`")
    if "packed" in spec.backends and not ((paths["packed"] / "winq.json").is_file() or (paths["packed"] / "config.json").is_file()):
        raise ConfigError(f"{paths['packed']}: neither a winq checkpoint (winq.json) nor a GPTQ export folder (config.json)")
    for b in ("llamacpp", "ort"):
        if b in spec.backends:
            external(b)

    jobs: list[Job] = []
    base_jobs: dict[str, Job] = {}
    for b in spec.backends:
        jobs.append(Job(b, b, paths[b]))
        if not spec.baseline:
            continue
        bl = BASELINE_OF[b]
        if bl in base_jobs:
            base_jobs[bl].baseline_of.append(b)
            continue
        src = Path(spec.checkpoint) if spec.checkpoint else _record_checkpoint(paths[b])
        if bl == "fp":
            if src is None and spec.model is not None:
                src = _exists("--model", spec.model, "folder")
            if src is None:
                raise ConfigError(f"the fp baseline of {b} is the checkpoint's float model: pass --checkpoint DIR "
                                  f"(or --model FOLDER for a base model), or --no-baseline")
            job = Job("fp", "fp", src, [b])
        else:
            if src is None:
                what = "an F16 GGUF" if b == "llamacpp" else "an fp32 ONNX"
                raise ConfigError(f"the {b} baseline ({what}) is built from the checkpoint the export came from: "
                                  f"pass --checkpoint DIR, or --no-baseline")
            external(bl)
            job = Job(bl, "llamacpp" if b == "llamacpp" else "ort", src, [b])  # artifact: built by build_baselines()
        base_jobs[bl] = job
        jobs.append(job)
    return jobs


def _checkpoint_key(ckpt: Path) -> str:
    w = ckpt / "model.safetensors"
    st = w.stat()
    return hashlib.sha256(f"{ckpt.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def build_baselines(jobs: list[Job], say: Callable[[str], None]) -> None:
    """Point the llamacpp-f16 / ort-fp32 jobs at their cached artifacts, building them the first time."""
    for job in jobs:
        if job.name not in ("llamacpp-f16", "ort-fp32"):
            continue
        ckpt = job.artifact
        folder = cache_root() / _checkpoint_key(ckpt)
        target = folder / ("model-f16.gguf" if job.name == "llamacpp-f16" else "onnx-fp32")
        done = target.is_file() if job.name == "llamacpp-f16" else (target / "model.onnx").is_file()
        if not done:
            say(f"building the {job.name} baseline of {ckpt} once into {target} ...")
            t0 = time.time()
            folder.mkdir(parents=True, exist_ok=True)
            external(job.name)(str(ckpt), str(target))
            if not target.exists():
                raise BenchError(f"{EXTERNAL[job.name][0]}.{EXTERNAL[job.name][1]}() did not write {target}")
            say(f"built {target} in {time.time() - t0:.0f} s")
        job.artifact = target


def tokenizer_for(spec: BenchSpec, jobs: list[Job]):
    """The tokenizer of the benchmarked model: from the checkpoint, an HF folder, or an export's source checkpoint."""
    from transformers import AutoTokenizer

    cands = [Path(spec.checkpoint)] if spec.checkpoint else []
    for j in jobs:
        a = j.artifact
        cands += [a if a.is_dir() else a.parent]
        src = _record_checkpoint(a)
        if src is not None:
            cands.append(src)
    tried = []
    for c in cands:
        if c in tried:
            continue
        tried.append(c)
        if (c / "tokenizer.json").is_file() or (c / "tokenizer_config.json").is_file():
            try:
                return AutoTokenizer.from_pretrained(str(c))
            except Exception:  # noqa: BLE001 - try the next candidate, the error below names them all
                continue
    raise ConfigError(f"no tokenizer found in {', '.join(map(str, tried)) or 'the artifacts'}: pass --checkpoint DIR "
                      f"(the checkpoint the artifacts were exported from)")


def prompt_ids(spec: BenchSpec, jobs: list[Job]) -> list[int]:
    from winq.evaluate import eval_ids

    ids = eval_ids(tokenizer_for(spec, jobs), spec.data, spec.split, spec.prompt_tokens)
    if ids.numel() < spec.prompt_tokens:
        raise ConfigError(f"{spec.data}/{spec.split} has only {ids.numel()} tokens: lower --prompt-tokens")
    return [int(t) for t in ids]


def run_job(job: Job, ids: list[int], spec: BenchSpec, timeout: float | None = None) -> dict:
    """Run one job's worker in a fresh Python process and return its result dict."""
    env = dict(os.environ)
    if spec.threads:
        for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[v] = str(spec.threads)
    env.setdefault("TORCHDYNAMO_DISABLE", "1")  # gptqmodel would torch.compile its dequantizer (seconds per shape)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ids, f)
        ids_file = f.name
    cmd = [sys.executable, "-m", "winq.runtime.bench", "--kind", job.kind, "--artifact", str(job.artifact),
           "--ids", ids_file, "--gen-tokens", str(spec.gen_tokens), "--repeats", str(spec.repeats)]
    if spec.threads:
        cmd += ["--threads", str(spec.threads)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{job.name}: the benchmark worker ran past {timeout:.0f} s") from None
    finally:
        os.unlink(ids_file)
    line = next((l[len(RESULT_TAG):] for l in reversed(p.stdout.splitlines()) if l.startswith(RESULT_TAG)), None)
    got = json.loads(line) if line else None
    if got and "error" in got:
        raise BenchError(f"{job.name}: {got['error']}")
    if p.returncode != 0 or got is None:
        tail = " | ".join(l for l in (p.stderr or "").strip().splitlines()[-6:])
        raise BenchError(f"{job.name}: the benchmark worker exited with code {p.returncode} and no result ({tail})")
    return got


def machine_info(threads: int | None) -> dict:
    import torch

    return {"cpu_count": os.cpu_count(), "threads": threads, "torch_default_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine()}


def run_bench(spec: BenchSpec, say: Callable[[str], None] = lambda s: None) -> dict:
    """Benchmark every backend of `spec` (and its baselines); returns the JSON-able report."""
    jobs = plan(spec)
    ids = prompt_ids(spec, jobs)
    build_baselines(jobs, say)
    results = {}
    for i, job in enumerate(jobs, 1):
        say(f"[{i}/{len(jobs)}] {job.name}: {job.artifact}")
        r = run_job(job, ids, spec)
        r.update(artifact=str(job.artifact), size_bytes=artifact_bytes(job.artifact))
        if job.baseline_of:
            r["baseline_of"] = job.baseline_of
        results[job.name] = r
    for name, r in results.items():
        bl = BASELINE_OF.get(name)
        if spec.baseline and bl in results:
            b = results[bl]
            r["baseline"] = bl
            r["speedup"] = {"prefill": r["prefill_tok_s"] / b["prefill_tok_s"], "decode": r["decode_tok_s"] / b["decode_tok_s"]}
    return {"settings": {k: v for k, v in asdict(spec).items()}, "machine": machine_info(spec.threads),
            "prompt": {"data": spec.data, "split": spec.split, "tokens": len(ids)}, "results": results}


def write_report(report: dict, out_json) -> tuple[Path, Path]:
    """Write the JSON (atomically) and the bar chart beside it (.png); returns both paths."""
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_json.with_name(f".{out_json.name}.part")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out_json)
    png = out_json.with_suffix(".png")
    plot(report, png)
    return out_json, png


def plot(report: dict, png) -> Path:
    """Two bar panels, prefill and decode tokens/s, one bar per backend and baseline (baselines hatched)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    names = list(res)
    colors = ["#bbbbbb" if res[n].get("baseline_of") else "#3b75af" for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 1.6 * len(names) + 3), 3.8))
    for ax, key, title in zip(axes, ("prefill_tok_s", "decode_tok_s"), ("prefill", "decode")):
        vals = [res[n][key] for n in names]
        bars = ax.bar(names, vals, color=colors)
        for bar, v in zip(bars, vals):
            ax.annotate(f"{v:.0f}" if v >= 100 else f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, v),
                        ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{title} tokens/s")
        ax.tick_params(axis="x", labelrotation=30)
        ax.set_ylim(0, max(vals) * 1.15)
    s, m = report["settings"], report["machine"]
    fig.suptitle(f"winq bench: prompt {report['prompt']['tokens']}, decode {s['gen_tokens']} tokens, "
                 f"threads {s['threads'] or 'default'} ({m['cpu_count']} CPUs), grey = baseline", fontsize=9)
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


# ---------------------------------------------------------------------------------------------
# worker entry point: python -m winq.runtime.bench --kind K --artifact PATH --ids FILE ...


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="one winq bench worker: prints one result line (" + RESULT_TAG.strip() + " {json})")
    p.add_argument("--kind", required=True, choices=TORCH_BACKENDS + ("llamacpp", "ort"))
    p.add_argument("--artifact", required=True)
    p.add_argument("--ids", required=True, help="JSON file with the prompt's token ids")
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    try:
        ids = json.loads(Path(a.ids).read_text())
        res = worker(a.kind, a.artifact, ids, a.gen_tokens, a.threads, a.repeats)
    except WinqError as e:
        print(RESULT_TAG + json.dumps({"error": str(e)}), flush=True)
        return 1
    print(RESULT_TAG + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
