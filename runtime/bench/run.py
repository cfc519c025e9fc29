"""`winq bench`: prefill and decode speed, memory and size of every backend, each in its own process.

    from winq.runtime.bench import BenchSpec, run_bench
    res = run_bench(BenchSpec(backends=("fakequant", "packed"), checkpoint="runs/winq", threads=2),
                    write_float=write_float)   # the export layer's write_float(format, src, out)
    res["results"]["packed"]["decode_tok_s"]

What is measured, per backend (ARCHITECTURE §7), by the one timing loop of runtime/backends.py
(`time_session`: a warm-up run, then the median of `repeats` runs):
- prefill tokens/s: one forward over a prompt of `prompt_tokens` real token ids (the first ids
  of the held-out split, winq.evaluate.eval_ids), from an empty KV cache;
- decode tokens/s: greedy generation of `gen_tokens` tokens, one token per forward, feeding
  the argmax back with the KV cache; each step is timed on its own, and `decode_ms` gives the
  per-token latency p50/p90/p99 over every timed step;
- load seconds and RSS right after loading, peak RSS at the end (runtime/bench/measure.py), and the
  artifact's size on disk (a checkpoint's model.safetensors, a folder's total, a file).

Method: every backend runs in a fresh `python -m winq.runtime.bench` worker process (one JSON
line on stdout), so its peak memory is its own and nothing it imported or cached helps the next
one. Sessions are loaded for deployment (`LoadOptions(purpose="bench")`: llama.cpp with its
default F16 KV cache). Timings are wall clock (time.perf_counter).

Baselines (`baseline=True`): each backend's registry entry names its float baseline: "fp" (the
checkpoint's model with its fake-quant weights dequantized into plain float32 nn.Linear, or the
base model given as `model`) for the torch backends; an F16 GGUF for llamacpp and an fp32 ONNX
for ort, written from the checkpoint once into $WINQ_CACHE/bench/<key>/ by `write_float(format,
checkpoint, out)`, the export layer's function, which this package may not import: the caller
passes it in (`winq bench` does).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from winq.errors import EXTRAS, ConfigError, WinqError, check_installed

from ..backends import BACKENDS, NAMES, artifact_of, get_backend, parse_names, resolve_artifact
from ..session import LoadOptions, time_session
from .measure import artifact_bytes, machine_info, peak_rss_mb, rss_mb, ru_maxrss_mb


RESULT_TAG = "WINQ-BENCH-RESULT "  # the worker's result line (libraries may print on stdout too)


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
    model: str | None = None  # base model folder: backend fp, and the fp baseline when there is no checkpoint
    data: str = "ptb"  # prompt ids: the first prompt_tokens ids of this data set's split
    split: str = "test"
    prompt_tokens: int = 128  # prefill length
    gen_tokens: int = 32  # greedy decode steps
    threads: int | None = None  # CPU threads of every backend (None: each library's default)
    repeats: int = 3  # timed runs after one warm-up; medians are reported
    baseline: bool = True

    def __post_init__(self):
        parse_names(self.backends)
        for flag, v, lo in (("--prompt-tokens", self.prompt_tokens, 1), ("--gen-tokens", self.gen_tokens, 1),
                            ("--repeats", self.repeats, 1)):
            if not isinstance(v, int) or v < lo:
                raise ConfigError(f"{flag} must be an integer >= {lo}, got {v!r}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")


@dataclass
class Job:
    name: str  # result key: a backend or a baseline (fp, llamacpp-f16, ort-fp32)
    kind: str  # the backend that runs it
    artifact: Path
    baseline_of: list[str] = field(default_factory=list)  # backends compared with this one
    build: str | None = None  # a baseline written from the checkpoint `artifact` in this format before it runs


# ---------------------------------------------------------------------------------------------
# the worker: one backend, in this process


def worker(kind: str, artifact: str, prompt_ids: list[int], n_gen: int, threads: int | None, repeats: int,
           prefill_lengths: list[int] | None = None, accuracy_level: int | None = None,
           warmup_gen: int | None = None) -> dict:
    """One backend's measurements, in this process (run it in a fresh one: see run_job). prefill_lengths,
    warmup_gen: see session.time_session; accuracy_level: ort's MatMulNBits override."""
    import torch
    import transformers  # noqa: F401  (imported before the clock starts: not load time)

    backend = get_backend(kind)
    if threads:
        torch.set_num_threads(threads)
    base_rss = rss_mb()
    t0 = time.perf_counter()
    opts = LoadOptions(threads=threads, context=len(prompt_ids) + n_gen, purpose="bench",
                       accuracy_level=accuracy_level)
    session = backend.load(None if artifact is None else Path(artifact), opts)
    load_s = time.perf_counter() - t0
    load_rss = rss_mb()
    res = time_session(session, prompt_ids, n_gen, repeats, prefill_lengths=prefill_lengths, warmup_gen=warmup_gen)
    res.update(load_s=load_s, rss_load_mb=load_rss, torch_threads=torch.get_num_threads())
    # ru_maxrss is the kernel's high-water mark, which may lag the current RSS by a few pages
    peak = max(x for x in (peak_rss_mb(), rss_mb(), load_rss) if x is not None)
    res.update(rss_base_mb=base_rss, peak_rss_mb=peak, ru_maxrss_mb=ru_maxrss_mb())
    return res


# ---------------------------------------------------------------------------------------------
# the parent: plan, prompt ids, baselines, one subprocess per backend


def cache_root() -> Path:
    return Path(os.environ.get("WINQ_CACHE", Path.home() / ".cache" / "winq")) / "bench"


def _exists(flag: str, p, want: str) -> Path:
    p = Path(p)
    ok = p.is_file() if want == "file" else p.is_dir() if want == "folder" else p.exists()
    if not ok:
        raise ConfigError(f"{flag} {p}: {'not found' if not p.exists() else f'not a {want}'}")
    return p


def _paths(spec: BenchSpec) -> dict[str, Path]:
    """Each backend's artifact, checked to exist and to be of the right kind."""
    from winq.checkpoint import read_info

    given = {k: getattr(spec, k) for k in ("checkpoint", "packed", "gptq", "gguf", "onnx", "model")}
    paths = {}
    for name in spec.backends:
        b = BACKENDS[name]
        _, opt = artifact_of(b, given)
        paths[name] = _exists(f"--{opt}", resolve_artifact(b, given), b.kind)
    if spec.checkpoint is not None:
        read_info(_exists("--checkpoint", spec.checkpoint, "folder"))  # CheckpointError names what is wrong
    if "ort" in paths:
        o = paths["ort"]
        if (o.is_file() and o.suffix != ".onnx") or (o.is_dir() and not (o / "model.onnx").is_file()):
            raise ConfigError(f"--onnx {o}: give an ONNX export folder (with model.onnx) or its model.onnx")
    if "gptq" in paths and not (paths["gptq"] / "config.json").is_file():
        raise ConfigError(f"--gptq {paths['gptq']}: not a GPTQ export folder (no config.json); make one with "
                          f"`winq export --format gptq`")
    if "packed" in paths and not any((paths["packed"] / f).is_file() for f in ("winq.json", "config.json")):
        raise ConfigError(f"{paths['packed']}: neither a winq checkpoint (winq.json) nor a GPTQ export folder "
                          "(config.json)")
    for name in paths:
        extra = BACKENDS[name].extra
        if extra:
            check_installed(*EXTRAS[extra], extra=extra, purpose=f"backend {name}")
    return paths


def plan(spec: BenchSpec) -> list[Job]:
    """Jobs in run order (each baseline right after the first backend compared with it), checked up front."""
    from winq.formats.manifest import source_checkpoint

    paths = _paths(spec)
    jobs = [Job(name, name, paths[name]) for name in spec.backends]
    base_jobs: dict[str, Job] = {j.name: j for j in jobs}  # a listed backend (fp) is its own baseline job
    for name in spec.backends:
        bl = BACKENDS[name].baseline
        if not spec.baseline or bl is None:
            continue
        if bl.name in base_jobs:
            base_jobs[bl.name].baseline_of.append(name)
            continue
        src = Path(spec.checkpoint) if spec.checkpoint else source_checkpoint(paths[name])
        if bl.format is None:  # fp: the checkpoint's float model, or --model
            if src is None and spec.model is not None:
                src = _exists("--model", spec.model, "folder")
            if src is None:
                raise ConfigError(f"the fp baseline of {name} is the checkpoint's float model: pass --checkpoint DIR "
                                  f"(or --model FOLDER for a base model), or --no-baseline")
        elif src is None:
            what = "an F16 GGUF" if bl.format == "gguf" else "an fp32 ONNX"
            raise ConfigError(f"the {name} baseline ({what}) is built from the checkpoint the export came from: "
                              f"pass --checkpoint DIR, or --no-baseline")
        job = Job(bl.name, bl.backend, src, [name], build=bl.format)  # artifact: built by build_baselines()
        base_jobs[bl.name] = job
        jobs.insert(jobs.index(base_jobs[name]) + 1, job)
    return jobs


def _checkpoint_key(ckpt: Path) -> str:
    st = (ckpt / "model.safetensors").stat()
    return hashlib.sha256(f"{ckpt.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def build_baselines(jobs: list[Job], say: Callable[[str], None], write_float=None) -> None:
    """Point the jobs of written baselines (F16 GGUF, fp32 ONNX) at their cached artifacts, writing them the first
    time with `write_float(format, checkpoint, out)` (the export layer's)."""
    for job in jobs:
        if job.build is None:
            continue
        ckpt = job.artifact
        target = cache_root() / _checkpoint_key(ckpt) / BACKENDS[job.baseline_of[0]].baseline.file
        if not target.exists():  # written atomically: present means complete
            if write_float is None:
                raise ConfigError(f"the {job.name} baseline is not built yet and no writer was given: "
                                  "pass run_bench(..., write_float=...) the export layer's write_float, or "
                                  "--no-baseline")
            say(f"building the {job.name} baseline of {ckpt} once into {target} ...")
            t0 = time.time()
            write_float(job.build, str(ckpt), str(target))
            if not target.exists():
                raise BenchError(f"write_float({job.build!r}) did not write {target}")
            say(f"built {target} in {time.time() - t0:.0f} s")
        job.artifact = target


def prompt_ids(spec: BenchSpec, jobs: list[Job]) -> list[int]:
    """The first prompt_tokens ids of the data's split, tokenized by the benchmarked model's tokenizer."""
    from winq.evaluate import eval_ids

    from ..backends import tokenizer_for

    tok = tokenizer_for([spec.checkpoint] + [j.artifact for j in jobs])
    ids = eval_ids(tok, spec.data, spec.split, spec.prompt_tokens)
    if ids.numel() < spec.prompt_tokens:
        raise ConfigError(f"{spec.data}/{spec.split} has only {ids.numel()} tokens: lower --prompt-tokens")
    return [int(t) for t in ids]


def worker_command(kind: str, artifact, ids_file, gen_tokens: int, repeats: int, threads: int | None = None,
                   prefill_lengths: list[int] | None = None, accuracy_level: int | None = None,
                   warmup_gen: int | None = None) -> list[str]:
    """The command line of one worker (`python -m winq.runtime.bench ...`; see main below)."""
    cmd = [sys.executable, "-m", "winq.runtime.bench", "--kind", kind, "--artifact", str(artifact),
           "--ids", str(ids_file), "--gen-tokens", str(gen_tokens), "--repeats", str(repeats)]
    if threads:
        cmd += ["--threads", str(threads)]
    if prefill_lengths:
        cmd += ["--prefill-lengths", ",".join(str(n) for n in prefill_lengths)]
    if accuracy_level is not None:
        cmd += ["--accuracy-level", str(accuracy_level)]
    if warmup_gen is not None:
        cmd += ["--warmup-gen", str(warmup_gen)]
    return cmd


def run_job(job: Job, ids: list[int], spec: BenchSpec, timeout: float | None = None, threads: int | None = None,
            prefill_lengths: list[int] | None = None, accuracy_level: int | None = None,
            warmup_gen: int | None = None) -> dict:
    """Run one job's worker in a fresh Python process and return its result dict. threads overrides
    spec.threads; prefill_lengths, accuracy_level and warmup_gen are passed to the worker."""
    threads = threads or spec.threads
    env = dict(os.environ)
    if threads:
        for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[v] = str(threads)
    env.setdefault("TORCHDYNAMO_DISABLE", "1")  # gptqmodel would torch.compile its dequantizer (seconds per shape)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ids, f)
        ids_file = f.name
    cmd = worker_command(job.kind, job.artifact, ids_file, spec.gen_tokens, spec.repeats, threads, prefill_lengths,
                         accuracy_level, warmup_gen)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{job.name}: the benchmark worker ran past {timeout:.0f} s") from None
    finally:
        os.unlink(ids_file)
    line = next((x[len(RESULT_TAG):] for x in reversed(p.stdout.splitlines()) if x.startswith(RESULT_TAG)), None)
    got = json.loads(line) if line else None
    if got and "error" in got:
        raise BenchError(f"{job.name}: {got['error']}")
    if p.returncode != 0 or got is None:
        tail = " | ".join(x for x in (p.stderr or "").strip().splitlines()[-6:])
        raise BenchError(f"{job.name}: the benchmark worker exited with code {p.returncode} and no result ({tail})")
    return got


def run_bench(spec: BenchSpec, say: Callable[[str], None] = lambda s: None, write_float=None) -> dict:
    """Benchmark every backend of `spec` (and its baselines); returns the JSON-able report.
    write_float: the export layer's write_float, to build the F16 GGUF / fp32 ONNX baselines (module docstring)."""
    jobs = plan(spec)
    ids = prompt_ids(spec, jobs)
    build_baselines(jobs, say, write_float)
    results = {}
    for i, job in enumerate(jobs, 1):
        say(f"[{i}/{len(jobs)}] {job.name}: {job.artifact}")
        r = run_job(job, ids, spec)
        r.update(artifact=str(job.artifact), size_bytes=artifact_bytes(job.artifact))
        if job.baseline_of:
            r["baseline_of"] = job.baseline_of
        results[job.name] = r
    for name, r in results.items():
        bl = BACKENDS[name].baseline if name in BACKENDS else None
        if spec.baseline and bl is not None and bl.name in results:
            b = results[bl.name]
            r["baseline"] = bl.name
            r["speedup"] = {"prefill": r["prefill_tok_s"] / b["prefill_tok_s"],
                            "decode": r["decode_tok_s"] / b["decode_tok_s"]}
    return {"settings": dict(asdict(spec)), "machine": machine_info(spec.threads),
            "prompt": {"data": spec.data, "split": spec.split, "tokens": len(ids)}, "results": results}


# ---------------------------------------------------------------------------------------------
# worker entry point: python -m winq.runtime.bench --kind K --artifact PATH --ids FILE ...


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="one winq bench worker: prints one result line "
                                            "(" + RESULT_TAG.strip() + " {json})")
    p.add_argument("--kind", required=True, choices=NAMES)
    p.add_argument("--artifact", required=True)
    p.add_argument("--ids", required=True, help="JSON file with the prompt's token ids")
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prefill-lengths", default=None, help="comma-separated prompt lengths to time prefill at")
    p.add_argument("--accuracy-level", type=int, default=None, help="ort: MatMulNBits accuracy_level override")
    p.add_argument("--warmup-gen", type=int, default=None, help="decode steps of the warm-up run")
    a = p.parse_args(argv)
    try:
        ids = json.loads(Path(a.ids).read_text())
        lengths = [int(x) for x in a.prefill_lengths.split(",")] if a.prefill_lengths else None
        res = worker(a.kind, a.artifact, ids, a.gen_tokens, a.threads, a.repeats, prefill_lengths=lengths,
                     accuracy_level=a.accuracy_level, warmup_gen=a.warmup_gen)
    except WinqError as e:
        print(RESULT_TAG + json.dumps({"error": str(e)}), flush=True)
        return 1
    print(RESULT_TAG + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
