"""Build llama.cpp's `llama-bench` from the sources llama-cpp-python 0.3.36 ships, and run it on a GGUF.

    python -m winq.benchmarks.llama_bench build            # download, unpack, configure, compile (minutes)
    python -m winq.benchmarks.llama_bench run runs/winq.gguf --threads 2
    python -m winq.benchmarks.llama_bench info             # the binary and its build record

Why: `winq bench --backend llamacpp` times llama.cpp through llama-cpp-python and a Python loop;
llama-bench times the same kernels from C++. To compare the two, the binary must be built from the
very llama.cpp the installed package runs, with the same ggml options:

- Sources: `pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36` (PyPI; only an
  sdist exists), reused from $WINQ_CACHE/llama.cpp/0.3.36/ when already there; its
  vendor/llama.cpp is configured directly.
- Options: llama-cpp-python's CMakeLists.txt adds vendor/llama.cpp as a subproject with
  BUILD_SHARED_LIBS=ON and LLAMA_BUILD_COMMON=ON (and LLAMA_CURL=OFF, a deprecated no-op in this
  llama.cpp, so not passed), and sets no GGML_* option on Linux; scikit-build-core builds Release.
  So: Release, shared libraries, every GGML_* at its default (GGML_NATIVE=ON: -march=native on the
  machine that builds, as for the pip build; OpenMP, llamafile sgemm and CPU repacking on).
  LLAMA_BUILD_TOOLS=ON for llama-bench; tests, examples, server and app off (they add targets,
  not flags). Extra `--cmake-arg`s are for a package built with other CMAKE_ARGS (ours:
  "-DLLAVA_BUILD=OFF", which concerns only the top-level project, not llama.cpp).
- Only the `llama-bench` target is compiled (ggml, llama, common and the tool), `-j 2`, under
  `nice -n 5`, into $WINQ_CACHE/llama.cpp/0.3.36/build; the binary is build/bin/llama-bench.

The build prints and records its times (download, unpack, configure, compile) with the cmake options,
compiler and the resulting ggml cache values in build/bin/llama-bench-build.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from winq.errors import ConfigError, WinqError
from winq.runtime.bench.llama import (BUILD_INFO, LLAMA_CPP_PYTHON, build_root, default_binary,
                                          find_llama_bench, run_llama_bench)

PACKAGE = "llama-cpp-python"
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
TARGET = "llama-bench"
# llama-cpp-python's CMakeLists.txt (LLAMA_BUILD branch, non-Apple, non-Emscripten) + scikit-build-core's Release
PACKAGE_OPTIONS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_COMMON=ON"]
# what a standalone configure needs for llama-bench, and what it need not configure
TOOL_OPTIONS = ["-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF"]
CACHE_KEYS = re.compile(r"^(GGML_[A-Z0-9_]+|BUILD_SHARED_LIBS|CMAKE_BUILD_TYPE|CMAKE_C_COMPILER|CMAKE_CXX_COMPILER|"
                        r"LLAMA_BUILD_[A-Z]+|CMAKE_GENERATOR):[A-Z]+=(.*)$")


def _log(msg: str) -> None:
    print(msg, flush=True)


def _run(cmd: list[str], what: str, cwd: Path | None = None, log: Path | None = None) -> None:
    """Run a command; its output goes to `log` (when given) and, on failure, its tail into one ConfigError."""
    _log("$ " + " ".join(cmd))
    if log is not None:
        with open(log, "w") as f:
            rc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT).returncode
        tail = log.read_text(errors="replace")[-2000:] if rc else ""
    else:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        rc, tail = p.returncode, (p.stdout + p.stderr)[-2000:]
    if rc != 0:
        raise ConfigError(f"{what} failed (exit {rc}): {' '.join(cmd)}" + (f"\nlog: {log}" if log else "")
                          + f"\n{tail}")


def get_sdist(root: Path) -> tuple[Path, float, bool]:
    """(path, seconds, reused) of the llama-cpp-python sdist in `root`, downloaded from PyPI with pip if absent."""
    dest = root / SDIST
    if dest.is_file():
        return dest, 0.0, True
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"{PACKAGE}=={LLAMA_CPP_PYTHON}", "-d", tmp], "pip download of the llama-cpp-python sdist")
        got = Path(tmp) / SDIST
        if not got.is_file():
            raise ConfigError(f"pip download wrote {sorted(p.name for p in Path(tmp).iterdir())}, not {SDIST}")
        os.replace(got, dest)
    return dest, time.perf_counter() - t0, False


def unpack(sdist: Path, root: Path) -> tuple[Path, float]:
    """(llama.cpp source folder, seconds): the sdist unpacked into root/src (once; a complete copy is reused)."""
    src = root / "src"
    llama = src / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    done = src / ".unpacked"
    if done.is_file() and (llama / "CMakeLists.txt").is_file():
        return llama, 0.0
    t0 = time.perf_counter()
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    with tarfile.open(sdist) as tf:
        if hasattr(tarfile, "data_filter"):
            tf.extractall(src, filter="data")
        else:  # Python < 3.11.4: check the member names ourselves
            for m in tf.getmembers():
                if m.name.startswith("/") or ".." in Path(m.name).parts:
                    raise ConfigError(f"{sdist} holds an unsafe path {m.name!r}")
            tf.extractall(src)
    if not (llama / "CMakeLists.txt").is_file():
        raise ConfigError(f"{sdist} has no vendor/llama.cpp/CMakeLists.txt (expected {llama})")
    done.write_text(sdist.name + "\n")
    return llama, time.perf_counter() - t0


def _tool_version(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True).stdout
    except OSError:
        return None
    return out.splitlines()[0].strip() if out else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_values(build: Path) -> dict:
    """GGML_*, BUILD_SHARED_LIBS, build type, compilers and LLAMA_BUILD_* from CMakeCache.txt."""
    out = {}
    for line in (build / "CMakeCache.txt").read_text(errors="replace").splitlines():
        m = CACHE_KEYS.match(line)
        if m:
            out[line.split(":", 1)[0]] = m.group(2)
    return dict(sorted(out.items()))


def check_build_tools(what: str, jobs: int) -> None:
    """ConfigError unless cmake and a C++ compiler are on PATH and jobs >= 1 (before any download or build)."""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise ConfigError(f"building {what} needs `{tool}` on PATH (e.g. `apt-get install cmake g++`)")
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")


def build(jobs: int = 2, force: bool = False, cmake_args: list[str] = (), nice: int = 5) -> dict:
    """Download, unpack, configure and compile llama-bench; returns (and writes) the build record."""
    check_build_tools("llama-bench", jobs)
    root = build_root()
    binary = default_binary()
    info_path = binary.with_name(BUILD_INFO)
    if binary.is_file() and info_path.is_file() and not force:
        info = json.loads(info_path.read_text())
        _log(f"llama-bench already built: {binary} (--force rebuilds)")
        return info
    t_all = time.perf_counter()
    sdist, t_download, reused = get_sdist(root)
    _log(f"sdist: {sdist} ({'reused' if reused else f'downloaded in {t_download:.1f} s'})")
    llama, t_unpack = unpack(sdist, root)
    _log(f"sources: {llama} (unpacked in {t_unpack:.1f} s)")
    build_dir = root / "build"
    if force:
        shutil.rmtree(build_dir, ignore_errors=True)
    build_dir.mkdir(parents=True, exist_ok=True)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    nice_cmd = ["nice", "-n", str(nice)] if nice and shutil.which("nice") else []
    configure = ["cmake", "-S", str(llama), "-B", str(build_dir), *generator, *PACKAGE_OPTIONS, *TOOL_OPTIONS,
                 *cmake_args]
    t0 = time.perf_counter()
    _run(nice_cmd + configure, "cmake configure", log=build_dir / "configure.log")
    t_configure = time.perf_counter() - t0
    _log(f"configured in {t_configure:.1f} s")
    compile_cmd = ["cmake", "--build", str(build_dir), "--target", TARGET, "-j", str(jobs)]
    t0 = time.perf_counter()
    _run(nice_cmd + compile_cmd, "compiling llama-bench", log=build_dir / "compile.log")
    t_compile = time.perf_counter() - t0
    _log(f"compiled in {t_compile:.1f} s")
    if not binary.is_file():
        raise ConfigError(f"the build finished but {binary} is missing (see {build_dir / 'compile.log'})")
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    try:
        import llama_cpp

        installed = {"version": llama_cpp.__version__,
                     "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}
    except ImportError:
        installed = None
    info = {
        "llama_cpp_python": LLAMA_CPP_PYTHON, "sdist": str(sdist), "sdist_sha256": _sha256(sdist),
        "sdist_reused": reused, "source": str(llama), "build_dir": str(build_dir), "binary": str(binary),
        "configure_cmd": configure, "compile_cmd": compile_cmd, "nice": nice, "jobs": jobs,
        "cmake_cache": _cache_values(build_dir),
        "llama_bench_version": (version.stdout + version.stderr).strip(),
        "installed_llama_cpp": installed,
        "times_s": {"download": round(t_download, 2), "unpack": round(t_unpack, 2),
                    "configure": round(t_configure, 2), "compile": round(t_compile, 2),
                    "total": round(time.perf_counter() - t_all, 2)},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "machine": platform.machine(),
                    "cmake": _tool_version(["cmake", "--version"]), "c++": _tool_version(["c++", "--version"])},
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    t = info["times_s"]
    _log(f"llama-bench: {binary}\ntimes: download {t['download']} s, unpack {t['unpack']} s, configure "
         f"{t['configure']} s, compile {t['compile']} s (total {t['total']} s)\nrecord: {info_path}")
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m winq.benchmarks.llama_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build llama-bench into $WINQ_CACHE/llama.cpp/0.3.36")
    b.add_argument("--jobs", "-j", type=int, default=2, help="parallel compile jobs (default 2)")
    b.add_argument("--force", action="store_true", help="rebuild from a clean build folder")
    b.add_argument("--cmake-arg", action="append", default=[], metavar="ARG",
                   help="extra cmake option (repeat), e.g. -DGGML_NATIVE=OFF if the package was built with it")
    b.add_argument("--nice", type=int, default=5, help="niceness of configure and compile (default 5; 0: none)")
    r = sub.add_parser("run", help="run llama-bench on a GGUF with winq bench's llamacpp settings")
    r.add_argument("gguf", help="a GGUF file")
    r.add_argument("--threads", "-t", type=int, default=os.cpu_count())
    r.add_argument("--prompt-tokens", "-p", type=int, default=128)
    r.add_argument("--gen-tokens", "-n", type=int, default=32)
    r.add_argument("--repeats", "-r", type=int, default=3)
    r.add_argument("--flash-attn", default="off", help="on | off | auto (default off, as llama-cpp-python)")
    r.add_argument("--json", action="store_true", help="print the whole result as JSON")
    r.epilog = "Arguments after `--` go to llama-bench as they are, e.g. `-- --poll 0`."
    sub.add_parser("info", help="print the binary path and its build record")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if extra and args.command != "run":
        ap.error("arguments after -- are for `run` only")
    try:
        if args.command == "build":
            build(args.jobs, args.force, args.cmake_arg, args.nice)
        elif args.command == "run":
            res = run_llama_bench(args.gguf, args.threads, args.prompt_tokens, args.gen_tokens, args.repeats, extra,
                                  flash_attn=args.flash_attn)
            if args.json:
                print(json.dumps(res, indent=2))
            else:
                p, d = res["prefill"], res["decode"]
                print(res["cmdline"])
                print(f"prefill {p['n_prompt']} tokens: {p['avg_ts']:.2f} +- {p['stddev_ts']:.2f} tok/s "
                      f"(median {p['median_ts']:.2f})")
                print(f"decode {d['n_gen']} tokens at depth {d['n_depth']}: {d['avg_ts']:.2f} +- "
                      f"{d['stddev_ts']:.2f} tok/s (median {d['median_ts']:.2f})")
        else:
            binary = find_llama_bench()
            rec = binary.with_name(BUILD_INFO)
            print(binary)
            print(rec.read_text() if rec.is_file() else f"(no build record {rec})")
    except WinqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
