"""llama.cpp's own `llama-bench`, as a second opinion on `winq bench`'s llamacpp timings.

    from winq.runtime.bench.llama import find_llama_bench, run_llama_bench
    find_llama_bench()     # Path of the binary ($WINQ_LLAMA_BENCH, else the cache; ConfigError when missing)
    r = run_llama_bench("runs/winq.gguf", threads=2)   # one llama-bench process, its JSON parsed
    r["prefill"]["avg_ts"], r["decode"]["avg_ts"], r["cmd"], r["settings"]

The binary is built by `python -m winq.benchmarks.llama_bench build` from the llama.cpp that
llama-cpp-python 0.3.36 vendors (its sdist's vendor/llama.cpp), with the ggml options of that
package's own build, into $WINQ_CACHE/llama.cpp/0.3.36/build/bin/llama-bench: the same kernels
as the `llamacpp` backend, without Python in the loop.

What llama-bench measures (tools/llama-bench/llama-bench.cpp of that version), and how
`run_llama_bench` lines it up with `winq bench` (runtime/backends.py time_session over
runtime/llamacpp.py's LlamaCppSession):

- One test is `-p N` (prompt processing: N random tokens, BOS first when the vocab adds one,
  from an empty KV cache, in batches of n_batch) or `-n N` (generation: N single-token decodes,
  random tokens, no sampling), at a depth `-d D` (D tokens put in the KV cache before the clock
  starts). Each test is warmed up once (a whole prompt run; one generated token) unless
  `--no-warmup`, then run `-r` times; it reports mean and stddev of tokens/s over the runs
  (`avg_ts`, `stddev_ts`) and every run's time (`samples_ns`).
- winq's decode steps run after the prompt, so its KV cache holds n_prompt tokens: we pass
  `-d 0,N` and read prefill from the `pp N` test at depth 0 and decode from the `tg` test at depth
  N (`tg` at depth 0 comes along as `decode_empty`).
- Settings are pinned to the llamacpp backend's (`winq bench`, purpose "bench"), not llama-bench's
  defaults; `settings` in the result names each one and `LLAMA_BENCH_DEFAULTS` what llama-bench
  would use otherwise: flash attention off (llama-cpp-python's `flash_attn=False`; llama-bench: auto),
  mmap load (llama-bench: auto), n_batch = n_ubatch = max(512, n_prompt + n_gen + 8) (the
  backend's n_ctx; llama-bench: 2048 / 512), F16 KV cache (both), weight repacking ("extra buffer
  types") as runtime/llamacpp.py chooses it (off on AMX CPUs; llama-bench: on), the given threads
  for both decode and batch (llama-bench: the physical core count).
- Differences that stay: llama-bench uses random tokens and no logits read-back or sampling; its
  context is n_prompt + n_gen + depth tokens (winq's: n_batch); it attaches its own thread pool
  (poll 50, no strict CPU placement); it reports mean/stddev where winq reports the median
  (`median_ts` here is tokens / the median of `samples_ns`, winq's statistic).
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
from pathlib import Path

from winq.data import cache_dir
from winq.errors import ConfigError
from winq.formats.gguf import is_gguf

LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python release whose vendored llama.cpp is built (pyproject's extra)
ENV_VAR = "WINQ_LLAMA_BENCH"  # a llama-bench binary to use instead of the cached build
BUILD_COMMAND = "python -m winq.benchmarks.llama_bench build"
BUILD_INFO = "llama-bench-build.json"  # written by the build beside the binary

# llama-bench's own defaults (llama-bench.cpp cmd_params_defaults) where run_llama_bench pins another value
LLAMA_BENCH_DEFAULTS = {"flash_attn": "auto", "load_mode": "auto", "n_batch": 2048, "n_ubatch": 512,
                        "type_k": "f16", "type_v": "f16", "repack": True, "threads": "physical cores",
                        "repetitions": 5, "warmup": True, "n_prompt": 512, "n_gen": 128, "n_depth": 0,
                        "poll": 50, "cpu_strict": False}
FLASH_ATTN = ("on", "off", "auto")
LOAD_MODES = ("auto", "none", "mmap", "mlock", "mmap+mlock", "dio")


def build_root() -> Path:
    """$WINQ_CACHE/llama.cpp/<version>: the sdist, its unpacked sources (src/) and the build (build/)."""
    return cache_dir() / "llama.cpp" / LLAMA_CPP_PYTHON


def default_binary() -> Path:
    return build_root() / "build" / "bin" / "llama-bench"


def find_llama_bench() -> Path:
    """The llama-bench binary: $WINQ_LLAMA_BENCH when set, else the cached build; ConfigError when missing."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_file() or not os.access(path, os.X_OK):
            raise ConfigError(f"{ENV_VAR}={env} is not an executable file: point it at a llama-bench binary, or "
                              f"unset it to use the one `{BUILD_COMMAND}` builds")
        return path
    path = default_binary()
    if not path.is_file():
        raise ConfigError(f"llama-bench is not built (looked for {path}): run `{BUILD_COMMAND}` (builds llama.cpp "
                          f"from the llama-cpp-python {LLAMA_CPP_PYTHON} sdist, minutes), or set {ENV_VAR} to a "
                          f"llama-bench binary")
    return path


def build_info(binary: Path | None = None) -> dict | None:
    """The build record written beside the binary (times, cmake options), or None (e.g. a $WINQ_LLAMA_BENCH
    binary built elsewhere)."""
    p = Path(binary or find_llama_bench()).with_name(BUILD_INFO)
    return json.loads(p.read_text()) if p.is_file() else None


def _default_repack() -> bool:
    """Weight repacking as runtime/llamacpp.py's open_model chooses it: WINQ_LLAMACPP_EXTRA_BUFTS=1/0, else on
    unless llama.cpp reports AMX (llama-cpp-python needed only to ask)."""
    env = os.environ.get("WINQ_LLAMACPP_EXTRA_BUFTS")
    if env in ("0", "1"):
        return env == "1"
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:  # llama-cpp-python is needed only to ask about AMX
        return LLAMA_BENCH_DEFAULTS["repack"]
    from ..llamacpp import has_amx

    return not has_amx()


def _positive(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def parse_output(text: str) -> list[dict]:
    """The records of `llama-bench -o json` (a JSON list, one object per test); ConfigError on anything else."""
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"llama-bench output is not JSON ({e}): {text[:200]!r}") from None
    need = ("n_prompt", "n_gen", "n_depth", "avg_ts", "stddev_ts", "samples_ns")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ConfigError(f"llama-bench JSON is not a list of tests: {text[:200]!r}")
    for r in records:
        missing = [k for k in need if k not in r]
        if missing:
            raise ConfigError(f"llama-bench test record lacks {', '.join(missing)}: {json.dumps(r)[:200]}")
    return records


def summarize(record: dict) -> dict:
    """One test's speed: llama-bench's mean and stddev of tokens/s, and winq's statistic (tokens / median s)."""
    n = record["n_prompt"] + record["n_gen"]
    samples = [int(s) for s in record["samples_ns"]]
    med = statistics.median(samples) / 1e9 if samples else None
    return {"n_prompt": record["n_prompt"], "n_gen": record["n_gen"], "n_depth": record["n_depth"],
            "avg_ts": float(record["avg_ts"]), "stddev_ts": float(record["stddev_ts"]),
            "median_s": med, "median_ts": n / med if med else None, "samples_ns": samples,
            "samples_ts": [float(t) for t in record.get("samples_ts", [])]}


def pick(records: list[dict], n_prompt: int, n_gen: int, n_depth: int) -> dict:
    """The record of test (n_prompt, n_gen) at depth n_depth; ConfigError naming the tests there are."""
    for r in records:
        if (r["n_prompt"], r["n_gen"], r["n_depth"]) == (n_prompt, n_gen, n_depth):
            return r
    have = ", ".join(f"p{r['n_prompt']}/n{r['n_gen']}@d{r['n_depth']}" for r in records) or "none"
    raise ConfigError(f"llama-bench output has no test p{n_prompt}/n{n_gen}@d{n_depth} (has: {have})")


def bench_command(binary, gguf, threads: int, n_prompt: int = 128, n_gen: int = 32, repeats: int = 3,
                  extra_args=(), *, flash_attn: str = "off", load_mode: str = "mmap", n_batch: int | None = None,
                  n_ubatch: int | None = None, repack: bool | None = None, warmup: bool = True,
                  decode_depth: int | None = None) -> tuple[list[str], dict]:
    """(argv, settings) of one llama-bench run; see run_llama_bench for the arguments."""
    threads = _positive("threads", threads)
    n_prompt, n_gen = _positive("n_prompt", n_prompt), _positive("n_gen", n_gen)
    repeats = _positive("repeats", repeats)
    if flash_attn not in FLASH_ATTN:
        raise ConfigError(f"flash_attn {flash_attn!r}: choose from {', '.join(FLASH_ATTN)}")
    if load_mode not in LOAD_MODES:
        raise ConfigError(f"load_mode {load_mode!r}: choose from {', '.join(LOAD_MODES)}")
    n_ctx_winq = max(512, n_prompt + n_gen + 8)  # runtime/llamacpp.py: n_ctx for purpose "bench", n_batch = n_ctx
    n_batch = _positive("n_batch", n_batch if n_batch is not None else n_ctx_winq)
    n_ubatch = _positive("n_ubatch", n_ubatch if n_ubatch is not None else n_batch)
    repack = _default_repack() if repack is None else bool(repack)
    depth = n_prompt if decode_depth is None else _positive("decode_depth", decode_depth, 0)
    if isinstance(extra_args, str):
        raise ConfigError(f"extra_args must be a sequence of arguments, not the string {extra_args!r}")
    depths = "0" if depth == 0 else f"0,{depth}"
    argv = [str(binary), "-m", str(gguf), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen), "-d", depths,
            "-r", str(repeats), "-b", str(n_batch), "-ub", str(n_ubatch), "-ctk", "f16", "-ctv", "f16",
            "-fa", flash_attn, "-lm", load_mode, "--repack", str(int(repack)), "-o", "json"]
    if not warmup:
        argv.append("--no-warmup")
    argv += [str(a) for a in extra_args]
    settings = {"threads": threads, "threads_batch": threads, "n_prompt": n_prompt, "n_gen": n_gen,
                "repetitions": repeats, "decode_depth": depth, "flash_attn": flash_attn, "load_mode": load_mode,
                "n_batch": n_batch, "n_ubatch": n_ubatch, "type_k": "f16", "type_v": "f16", "repack": repack,
                "warmup": warmup, "n_ctx": {"prefill": n_prompt + n_gen, "decode": n_prompt + n_gen + depth},
                "tokens": "random (BOS first when the vocab adds one)", "statistic": "mean and stddev of tokens/s "
                "over runs (avg_ts, stddev_ts); median_ts = tokens / median seconds", "extra_args": list(extra_args)}
    return argv, settings


def run_llama_bench(gguf, threads: int, n_prompt: int = 128, n_gen: int = 32, repeats: int = 3, extra_args=(),
                    *, binary=None, timeout: float | None = None, **options) -> dict:
    """Run `llama-bench -m FILE -t T -p N -n N -d 0,N -r R ... -o json` on a GGUF and parse its JSON.

    threads: for decode and batch alike; n_prompt/n_gen/repeats: llama-bench's -p/-n/-r; extra_args: appended
    to the command line as given (a later flag overrides an earlier one there). Keyword options, each pinned to
    winq bench's llamacpp backend by default: flash_attn ("off"), load_mode ("mmap"), n_batch and n_ubatch
    (max(512, n_prompt + n_gen + 8)), repack (None: as runtime/llamacpp.py decides), warmup (True),
    decode_depth (None: n_prompt, the KV cache winq's decode steps see).

    Returns {"prefill": summary of test pN at depth 0, "decode": summary of test nN at decode_depth,
    "decode_empty": test nN at depth 0 (None when decode_depth is 0), "prefill_tok_s", "prefill_tok_s_std",
    "decode_tok_s", "decode_tok_s_std" (llama-bench's avg_ts / stddev_ts), "settings", "llama_bench_defaults",
    "cmd" (argv), "cmdline" (one shell line), "binary", "build" (the build record or None), "records" (llama-bench's
    JSON as printed)}. A summary: avg_ts, stddev_ts, median_s, median_ts, samples_ns, samples_ts, n_*.
    """
    gguf = Path(gguf)
    if not gguf.is_file():
        raise ConfigError(f"GGUF file {gguf} not found (write one with `winq export --format gguf`)")
    if not is_gguf(gguf):
        raise ConfigError(f"{gguf} is not a GGUF file (bad magic)")
    binary = Path(binary) if binary is not None else find_llama_bench()
    argv, settings = bench_command(binary, gguf, threads, n_prompt, n_gen, repeats, extra_args, **options)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"llama-bench ran past {timeout} s: {shlex.join(argv)}") from None
    except OSError as e:
        raise ConfigError(f"could not run {binary}: {e}") from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip())[-800:]
        raise ConfigError(f"llama-bench exited with {proc.returncode}: {shlex.join(argv)}\n{tail}")
    records = parse_output(proc.stdout)
    return result_from_records(records, argv, settings, binary)


def result_from_records(records: list[dict], argv: list[str], settings: dict, binary=None) -> dict:
    """run_llama_bench's result from parsed records and the command that printed them."""
    n_prompt, n_gen, depth = settings["n_prompt"], settings["n_gen"], settings["decode_depth"]
    prefill = summarize(pick(records, n_prompt, 0, 0))
    decode = summarize(pick(records, 0, n_gen, depth))
    empty = summarize(pick(records, 0, n_gen, 0)) if depth else None
    first = records[0]
    return {"prefill": prefill, "decode": decode, "decode_empty": empty,
            "prefill_tok_s": prefill["avg_ts"], "prefill_tok_s_std": prefill["stddev_ts"],
            "decode_tok_s": decode["avg_ts"], "decode_tok_s_std": decode["stddev_ts"],
            "settings": settings, "llama_bench_defaults": dict(LLAMA_BENCH_DEFAULTS),
            "reported": {k: first.get(k) for k in ("build_commit", "build_number", "cpu_info", "backends", "n_threads",
                                                   "n_batch", "n_ubatch", "type_k", "type_v", "flash_attn",
                                                   "load_mode", "repack", "poll", "cpu_strict", "model_type",
                                                   "model_size", "model_n_params")},
            "cmd": list(argv), "cmdline": shlex.join(argv), "binary": str(binary) if binary else None,
            "build": build_info(binary) if binary else None, "records": records}
