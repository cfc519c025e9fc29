"""Quality against file size: every quantized file of one float model, scored the same way in its own runtime.

    python benchmarks/quality.py build-tools            # llama-quantize, llama-imatrix, llama-perplexity (minutes)
    python benchmarks/quality.py texts                  # the held-out texts and the calibration text
    python benchmarks/quality.py baselines              # F16, llama.cpp's ladder +- imatrix, ORT, gptqmodel
    python benchmarks/quality.py baselines --only ort --force
    python benchmarks/quality.py measure --gguf runs/winq-gguf/model.gguf --name winq-default
    python benchmarks/quality.py cross-check            # llama-perplexity's KLD against winq's Python path
    python benchmarks/quality.py plot                   # results/quality.png from results/quality.json
    python benchmarks/quality.py table                  # the results as a markdown table

    from winq.benchmarks.quality import measure_gguf, add_point
    m = measure_gguf("runs/winq-gguf/model.gguf")       # {"size_mb", "bits_per_weight", "texts": {text: {...}}}
    add_point("winq-30min-s0", m, {"family": "winq", "command": "winq train ...", "seed": 0})

Why: winq's exports are exact (trained == deployed), but that says nothing about whether what was
trained is worth deploying. This benchmark puts every point on one chart, quality against file size,
where the alternatives are post-training quantizations of the very same float weights (the built-in
model's floats: the dequantized Q4_1 values of SmolLM2-135M-Instruct, see winq.models):

- **llama.cpp**: the default model as an F16 GGUF written by winq's own writer
  (exporters.gguf.write_gguf, float weights), then llama.cpp's own quantizer (`llama-quantize`) to
  Q8_0, Q5_0, Q4_1, Q4_0, IQ4_NL, Q4_K_M, Q3_K_M and Q2_K, each without and with an importance matrix
  (`llama-imatrix` on the first 50 chunks of 512 tokens of
  the calibration text, training data: PTB train then SOTU train; 50 chunks reach only its PTB half). The
  tools are built from the llama.cpp that llama-cpp-python 0.3.36 vendors, in the build folder
  benchmarks/llama_bench.py uses (same sdist, same options; its code is reused).
- **onnxruntime**: an fp32 ONNX export of the float model (exporters/onnx.py's float graph) quantized
  by onnxruntime.quantization.matmul_nbits_quantizer: DEFAULT (round-to-nearest, asymmetric min/max
  per block), HQQ, RTN and k_quant (neural-compressor port) and GPTQ, at 4 and 2 bits, blocks of 32
  (and DEFAULT at ORT's own default block 128). ORT's neural-compressor path (RTN, k_quant, GPTQ)
  writes MatMulNBits only for 4 bits (GPTQ) or 4/8 bits (RTN, k_quant): at 2 bits it stores the
  quantize-dequantized weights in float32; those points are marked `"packed": false`, their size is
  the real (float) file and they are left off the size plot.
- **gptqmodel** GPTQ at 2/3/4 bits (group 128) on CPU, loaded back with transformers + gptqmodel
  (runtime/gptq.py). When it cannot run here the error is recorded as the point's result.

Measurement (one definition for every runtime): each held-out text is cut to 8,192 tokens of the
model's tokenizer, i.e. 16 windows of 512 tokens, each evaluated from an empty cache; as
llama-perplexity does, only the second half of a window is scored (positions 256..510 predicting
tokens 257..511: 255 tokens a window, 4,080 a text) and the first token of a window becomes BOS when
the vocabulary adds one. Per text: perplexity, mean KL divergence to the float model
KL(p_float || p_quant), and top-1 agreement (the share of scored positions where both argmaxes agree).
GGUF files are measured by llama-perplexity itself (`--kl-divergence-base` from the F16 file once per
text, then `--kl-divergence` per file; its output is parsed); ONNX files by onnxruntime against the
fp32 ONNX model, GPTQ folders by transformers + gptqmodel against the float model in transformers,
both through the same Python scorer (`score`). `cross-check` runs that Python scorer over
llama-cpp-python (runtime/llamacpp.py) on one GGUF and text, against the F16 file, on the very token
windows llama-perplexity used, and records both KLDs.

Texts (none in the training data, which is `ptb` and `sotu` train): `stdlib-docs`, technical
English, the docstrings of a fixed list of Python standard-library modules (module, then its public
classes and functions in sorted order; they change with the Python version, which is recorded with
the text's sha256); `licenses`, legal English, Apache-2.0, MPL-2.0 and GPL-3 from
/usr/share/common-licenses; and `sotu-test`, the SOTU test split (years >= 2010), as an in-domain
reference. They are written to <work>/texts/*.txt (the files llama-perplexity reads with -f).

Size: file size in MB (10^6 bytes; a GPTQ or ONNX folder: its weight files + graph) and bits per
weight over all tensors, embeddings and head included: 8 * (bytes of every tensor in the file) /
(weights of the float model, tied embedding counted once). GGUF tensor bytes are read with gguf-py.

Results merge by point name into results/quality.json (commands, versions, the texts' token counts,
machine, timestamps) and results/quality.png. `baselines` skips points already there unless `--force`.
The work folder (texts, files, llama-perplexity's logit files, reference log-probs) is
$WINQ_CACHE/quality (about 6 GB when everything has run).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import inspect
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from winq.benchmarks import llama_bench as LB
from winq.data import cache_dir
from winq.errors import ConfigError, DataError, WinqError

LLAMA_CPP_PYTHON = LB.LLAMA_CPP_PYTHON  # the llama-cpp-python release whose vendored llama.cpp is built
build_root = LB.build_root  # $WINQ_CACHE/llama.cpp/<version>: sdist, sources, build (shared with llama-bench)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "quality.json"
SCRIPT = "python benchmarks/quality.py"

# ---------------------------------------------------------------------------------------------------------------
# settings every point is measured with

N_CTX = 512  # window length (tokens)
N_CHUNKS = 16  # windows a text: 8,192 tokens
TEXT_TOKENS = N_CTX * N_CHUNKS
CUT_MARGIN = 64  # tokens kept past TEXT_TOKENS in a text file, so that re-tokenising it still gives TEXT_TOKENS
CALIB_CHUNKS = 100  # llama-imatrix: chunks of N_CTX tokens of the calibration text (51,200 tokens: PTB train
# then SOTU train, the two corpora of winq's default training data, so both see the same domains)
THREADS = 2
LADDER = ("q4_0", "iq4_nl", "q4_k_m", "q3_k_m", "q2_k", "q5_0", "q8_0", "q4_1")  # the sizes that matter first
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
TOOLS_ENV = "WINQ_LLAMA_TOOLS"  # a folder holding the three binaries, instead of the cached build
TOOLS_INFO = "llama-tools-build.json"  # the build record, beside the binaries
FAMILIES = ("reference", "llama.cpp", "llama.cpp+imatrix", "onnxruntime", "gptqmodel", "winq")


def _log(msg: str) -> None:
    print(f"[quality] {msg}", flush=True)


def work_dir(work=None) -> Path:
    """The benchmark's work folder: `work`, else $WINQ_CACHE/quality."""
    return Path(work) if work is not None else cache_dir() / "quality"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _cmd_str(cmd: list) -> str:
    return " ".join(shlex.quote(str(c)) for c in cmd)


# ---------------------------------------------------------------------------------------------------------------
# 1. llama.cpp's tools, built like llama-bench (benchmarks/llama_bench.py)


def tools_dir() -> Path:
    env = os.environ.get(TOOLS_ENV)
    return Path(env).expanduser() if env else build_root() / "build" / "bin"


def find_tool(name: str) -> Path:
    """The path of one of TOOLS; ConfigError saying how to build it when missing."""
    if name not in TOOLS:
        raise ConfigError(f"unknown llama.cpp tool {name!r}: one of {', '.join(TOOLS)}")
    path = tools_dir() / name
    if not path.is_file() or not os.access(path, os.X_OK):
        where = f"${TOOLS_ENV}={os.environ[TOOLS_ENV]}" if os.environ.get(TOOLS_ENV) else str(tools_dir())
        raise ConfigError(f"{name} not found in {where}: build it with `{SCRIPT} build-tools` (about 10 minutes "
                          f"on 2 cores) or point ${TOOLS_ENV} at a folder holding {', '.join(TOOLS)}")
    return path


def build_tools(jobs: int = 2, force: bool = False, nice: int = 10, cmake_args: list[str] = ()) -> dict:
    """Build TOOLS from llama-cpp-python 0.3.36's vendored llama.cpp into $WINQ_CACHE/llama.cpp/0.3.36/build/bin
    (the build folder llama-bench uses: same sdist, same configure options). Returns and writes the build record."""
    LB.check_build_tools("llama.cpp's tools", jobs)
    root = build_root()
    build_dir = root / "build"
    binaries = [build_dir / "bin" / t for t in TOOLS]
    info_path = build_dir / "bin" / TOOLS_INFO
    if all(b.is_file() for b in binaries) and info_path.is_file() and not force:
        _log(f"llama.cpp tools already built in {build_dir / 'bin'} (--force rebuilds)")
        return json.loads(info_path.read_text())
    t_all = time.perf_counter()
    sdist, t_download, reused = LB.get_sdist(root)
    _log(f"sdist: {sdist} ({'reused' if reused else f'downloaded in {t_download:.1f} s'})")
    llama, t_unpack = LB.unpack(sdist, root)
    _log(f"sources: {llama} (unpacked in {t_unpack:.1f} s)")
    build_dir.mkdir(parents=True, exist_ok=True)
    generator = ["-G", "Ninja"] if shutil.which("ninja") and not (build_dir / "Makefile").is_file() else []
    nice_cmd = ["nice", "-n", str(nice)] if nice and shutil.which("nice") else []
    configure = ["cmake", "-S", str(llama), "-B", str(build_dir), *generator, *LB.PACKAGE_OPTIONS, *LB.TOOL_OPTIONS,
                 "-DLLAMA_CURL=OFF", *cmake_args]
    t0 = time.perf_counter()
    LB._run(nice_cmd + configure, "cmake configure", log=build_dir / "configure-tools.log")
    t_configure = time.perf_counter() - t0
    _log(f"configured in {t_configure:.1f} s; compiling {', '.join(TOOLS)} with -j {jobs} (minutes)")
    compile_cmd = ["cmake", "--build", str(build_dir), "--target", *TOOLS, "-j", str(jobs)]
    t0 = time.perf_counter()
    LB._run(nice_cmd + compile_cmd, "compiling llama.cpp's tools", log=build_dir / "compile-tools.log")
    t_compile = time.perf_counter() - t0
    missing = [str(b) for b in binaries if not b.is_file()]
    if missing:
        raise ConfigError(f"the build finished but {', '.join(missing)} is missing (see "
                          f"{build_dir / 'compile-tools.log'})")
    version = subprocess.run([str(binaries[-1]), "--version"], capture_output=True, text=True)
    info = {
        "llama_cpp_python": LLAMA_CPP_PYTHON, "sdist": str(sdist), "sdist_sha256": LB._sha256(sdist),
        "source": str(llama), "build_dir": str(build_dir), "tools": [str(b) for b in binaries],
        "configure_cmd": configure, "compile_cmd": compile_cmd, "nice": nice, "jobs": jobs,
        "cmake_cache": LB._cache_values(build_dir), "version": (version.stdout + version.stderr).strip(),
        "times_s": {"download": round(t_download, 2), "unpack": round(t_unpack, 2),
                    "configure": round(t_configure, 2), "compile": round(t_compile, 2),
                    "total": round(time.perf_counter() - t_all, 2)},
        "machine": machine(), "built_at": _now(),
    }
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    t = info["times_s"]
    _log(f"built {', '.join(TOOLS)} in {t['total']} s (configure {t['configure']} s, compile {t['compile']} s); "
         f"record: {info_path}")
    return info


def tools_record() -> dict | None:
    p = tools_dir() / TOOLS_INFO
    if not p.is_file():
        return None
    info = json.loads(p.read_text())
    return {k: info.get(k) for k in ("llama_cpp_python", "version", "configure_cmd", "compile_cmd", "sdist_sha256",
                                      "built_at", "times_s")}


def run_tool(cmd: list, log: Path, what: str) -> str:
    """Run a llama.cpp tool (stdout and stderr into `log`, UTF-8); its output, or ConfigError with the tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f:
        rc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT).returncode
    out = log.read_bytes().decode("utf-8", errors="replace")
    if rc != 0:
        raise ConfigError(f"{what} failed (exit {rc}): {_cmd_str(cmd)}\nlog: {log}\n{out[-1500:]}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# 2. texts: held out from training (which reads ptb and sotu train), cut to TEXT_TOKENS tokens

STDLIB_MODULES = ("argparse", "json", "pathlib", "subprocess", "collections", "functools", "itertools", "textwrap",
                  "shutil", "tempfile", "logging", "unittest", "csv", "heapq", "bisect", "datetime", "statistics",
                  "zipfile")
LICENSES = ("Apache-2.0", "MPL-2.0", "GPL-3")
LICENSE_DIR = Path("/usr/share/common-licenses")


@dataclass(frozen=True)
class TextSpec:
    name: str
    domain: str
    source: str
    held_out: bool  # from a domain training never saw (False: an in-domain reference)


TEXTS = {t.name: t for t in (
    TextSpec("stdlib-docs", "technical English",
             f"docstrings (inspect.getdoc) of Python {platform.python_version()} modules "
             f"{', '.join(STDLIB_MODULES)}: module, then its public classes and functions in sorted order", True),
    TextSpec("licenses", "legal English", f"{', '.join(LICENSES)} from {LICENSE_DIR}, in that order", True),
    TextSpec("sotu-test", "political speech (in-domain)", "sotu test split (years >= 2010), documents in year order, "
             "blank-line separated (winq.data)", False),
)}


def stdlib_docs_text(modules=STDLIB_MODULES) -> str:
    """Docstrings of `modules` in a fixed order: the module's, then each public class / function defined in it."""
    parts = []
    for name in modules:
        mod = importlib.import_module(name)
        doc = inspect.getdoc(mod)
        parts.append(f"Module {name}\n\n{doc}" if doc else f"Module {name}")
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj)
            if doc:
                parts.append(f"{name}.{attr}\n\n{doc}")
    return "\n\n".join(parts)


def licenses_text(folder: Path = LICENSE_DIR, names=LICENSES) -> str:
    missing = [n for n in names if not (Path(folder) / n).is_file()]
    if missing:
        raise DataError(f"license texts {', '.join(missing)} not found in {folder} (Debian's base-files package "
                        "ships them)")
    return "\n\n".join((Path(folder) / n).read_text(encoding="utf-8").strip("\n") for n in names)


def sotu_test_text() -> str:
    from winq.data import load_documents

    return "\n\n".join(d.strip() for d in load_documents("sotu", "test"))


def raw_text(name: str) -> str:
    builders = {"stdlib-docs": stdlib_docs_text, "licenses": licenses_text, "sotu-test": sotu_test_text}
    if name not in builders:
        raise DataError(f"unknown text {name!r}: choose from {', '.join(builders)}")
    return builders[name]()


def calibration_text(tokenizer, n_tokens: int = CALIB_CHUNKS * N_CTX) -> tuple[str, dict]:
    """Training text for llama-imatrix / GPTQ calibration: the first n_tokens/2 (+ margin) tokens of PTB train, a
    blank line, then as many of SOTU train (its oldest addresses first)."""
    from winq.data import load_documents

    half = n_tokens // 2 + CUT_MARGIN
    pieces, meta = [], {}
    for spec in ("ptb", "sotu"):
        text = "\n\n".join(d.strip() for d in load_documents(spec, "train")[:200])
        piece, n = cut_text(text, tokenizer, half, margin=0, what=f"{spec} train")
        pieces.append(piece)
        meta[spec] = n
    return "\n\n".join(pieces), {"tokens_per_source": meta, "sources": "ptb train, then sotu train (winq.data)"}


def cut_text(text: str, tokenizer, n_tokens: int, margin: int = CUT_MARGIN, what: str = "text") -> tuple[str, int]:
    """(the text up to its first n_tokens + margin tokens, that count); DataError when the text is shorter, or when
    re-tokenising the cut text does not give back the same first n_tokens ids."""
    want = n_tokens + margin
    text = text[: 16 * want]  # far more than `want` tokens (~4-5 characters a token): spares tokenising it all
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < want:
        raise DataError(f"{what}: {len(ids)} tokens, fewer than the {want} needed")
    cut = tokenizer.decode(ids[:want])
    again = tokenizer(cut, add_special_tokens=False)["input_ids"]
    if again[:n_tokens] != ids[:n_tokens]:
        raise DataError(f"{what}: the cut text does not tokenise back to the same {n_tokens} ids")
    return cut, want


def _tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def build_texts(work=None, model_dir=None, force: bool = False, names=tuple(TEXTS)) -> dict:
    """Write <work>/texts/{name}.txt for each text and calibration.txt; returns (and writes texts.json) their
    record: file, domain, source, characters, tokens (model tokenizer), sha256."""
    from winq.fsutil import atomic_file

    model_dir = _model_dir(model_dir)
    folder = work_dir(work) / "texts"
    folder.mkdir(parents=True, exist_ok=True)
    rec_path = folder / "texts.json"
    record = json.loads(rec_path.read_text()) if rec_path.is_file() and not force else {}
    tok = _tokenizer(model_dir)
    todo = [n for n in names if n not in record or not (folder / record[n]["file"]).is_file()]
    for name in todo:
        spec = TEXTS[name]
        t0 = time.perf_counter()
        cut, n = cut_text(raw_text(name), tok, TEXT_TOKENS, what=name)
        path = folder / f"{name}.txt"
        with atomic_file(path) as tmp:
            tmp.write_text(cut, encoding="utf-8")
        record[name] = {**asdict(spec), "file": path.name, "chars": len(cut), "tokens_in_file": n,
                        "tokens_scored_from": TEXT_TOKENS, "sha256": _sha256_text(cut), "tokenizer": str(model_dir),
                        "python": platform.python_version(), "written_at": _now()}
        _log(f"text {name}: {len(cut)} characters, {n} tokens -> {path} ({time.perf_counter() - t0:.1f} s)")
    if "calibration" not in record or not (folder / "calibration.txt").is_file():
        cut, meta = calibration_text(tok)
        path = folder / "calibration.txt"
        with atomic_file(path) as tmp:
            tmp.write_text(cut, encoding="utf-8")
        record["calibration"] = {"name": "calibration", "domain": "training data", "file": path.name,
                                 "chars": len(cut), **meta, "sha256": _sha256_text(cut), "written_at": _now()}
        _log(f"calibration text: {len(cut)} characters, {meta['tokens_per_source']} tokens -> {path}")
    with atomic_file(rec_path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return record


@dataclass(frozen=True)
class TextFile:
    name: str
    path: Path
    record: dict

    def ids(self, tokenizer, n: int = TEXT_TOKENS) -> np.ndarray:
        ids = tokenizer(self.path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        if len(ids) < n:
            raise DataError(f"{self.path}: {len(ids)} tokens, fewer than {n}")
        return np.asarray(ids[:n], dtype=np.int64)


def load_texts(work=None, names=None) -> dict[str, TextFile]:
    """The held-out texts written by `texts` (all of TEXTS unless `names`); DataError naming the phase when missing."""
    folder = work_dir(work) / "texts"
    rec_path = folder / "texts.json"
    if not rec_path.is_file():
        raise DataError(f"no texts in {folder}: write them with `{SCRIPT} texts`")
    record = json.loads(rec_path.read_text())
    names = list(names) if names else list(TEXTS)
    out = {}
    for n in names:
        if n not in record or not (folder / record[n]["file"]).is_file():
            raise DataError(f"text {n!r} missing from {folder}: write it with `{SCRIPT} texts`")
        out[n] = TextFile(n, folder / record[n]["file"], record[n])
    return out


# ---------------------------------------------------------------------------------------------------------------
# 3. sizes


def _model_dir(model_dir=None) -> Path:
    from winq.models import default_model_dir

    return Path(model_dir) if model_dir is not None else default_model_dir()


def n_model_weights(model_dir=None) -> int:
    """Weights of the float model, a tied embedding counted once (the denominator of bits per weight)."""
    from safetensors import safe_open

    folder = _model_dir(model_dir)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise DataError(f"{folder}: no safetensors files")
    n = 0
    for f in files:
        with safe_open(str(f), "np") as sf:
            for k in sf.keys():
                n += int(np.prod(sf.get_slice(k).get_shape()))
    return n


def gguf_size(path) -> dict:
    """File size and bits per weight of a GGUF over all its tensors: 8 * tensor bytes / tensor elements."""
    from gguf import GGUFReader

    path = Path(path)
    r = GGUFReader(str(path))
    nbytes = sum(int(t.n_bytes) for t in r.tensors)
    nel = sum(int(t.n_elements) for t in r.tensors)
    types: dict[str, int] = {}
    for t in r.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + int(t.n_elements)
    size = path.stat().st_size
    return {"size_bytes": size, "size_mb": round(size / 1e6, 2), "tensor_bytes": nbytes, "n_weights": nel,
            "bits_per_weight": round(8 * nbytes / nel, 4), "weights_by_type": dict(sorted(types.items()))}


def folder_size(folder, n_weights: int, weight_suffixes=(".safetensors", ".onnx", ".data", ".bin")) -> dict:
    """Size of an ONNX or GPTQ folder (its graph and weight files) and bits per weight over `n_weights`."""
    files = [p for p in Path(folder).iterdir() if p.is_file() and p.name.endswith(weight_suffixes)]
    size = sum(p.stat().st_size for p in files)
    return {"size_bytes": size, "size_mb": round(size / 1e6, 2), "n_weights": n_weights,
            "bits_per_weight": round(8 * size / n_weights, 4), "files": sorted(p.name for p in files)}


# ---------------------------------------------------------------------------------------------------------------
# 4. llama-perplexity: run, parse

_NUM = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
_PM = r"\s*(?:±|\+/-|\S{1,3})\s*"  # llama.cpp prints "±" (UTF-8); tolerate a mis-decoded sign
_PATTERNS = {
    "ppl_final": re.compile(r"Final estimate: PPL = " + _NUM + r" \+/- " + _NUM),
    "ppl": re.compile(r"Mean PPL\(Q\)\s*:\s*" + _NUM + _PM + _NUM),
    "ppl_base": re.compile(r"Mean PPL\(base\)\s*:\s*" + _NUM + _PM + _NUM),
    "ln_ppl_ratio": re.compile(r"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*" + _NUM + _PM + _NUM),
    "kld": re.compile(r"Mean\s+KLD:\s*" + _NUM + _PM + _NUM),
    "kld_max": re.compile(r"Maximum KLD:\s*" + _NUM),
    "kld_p99": re.compile(r"99\.0%\s+KLD:\s*" + _NUM),
    "kld_median": re.compile(r"Median\s+KLD:\s*" + _NUM),
    "rms_dp": re.compile(r"RMS \S+\s*:\s*" + _NUM + _PM + _NUM + r"\s*%"),
    "top1": re.compile(r"Same top p:\s*" + _NUM + _PM + _NUM + r"\s*%"),
    "chunks": re.compile(r"(?:calculating perplexity|computing) over (\d+) chunks, n_ctx=(\d+)"),
}


def parse_perplexity(out: str) -> dict:
    """The figures of one llama-perplexity run: perplexity mode ("Final estimate: PPL = x +/- e") or KL mode (its
    statistics block). top1 is a fraction (llama.cpp prints percent). ConfigError when nothing parses."""
    res: dict = {}
    m = _PATTERNS["chunks"].search(out)
    if m:
        res["n_chunks"], res["n_ctx"] = int(m.group(1)), int(m.group(2))
    m = _PATTERNS["ppl_final"].search(out)
    if m:
        res["ppl"], res["ppl_err"] = float(m.group(1)), float(m.group(2))
    for key in ("ppl", "ppl_base", "ln_ppl_ratio", "kld", "top1", "rms_dp"):
        m = _PATTERNS[key].search(out)
        if m:
            res[key], res[f"{key}_err"] = float(m.group(1)), float(m.group(2))
    for key in ("kld_max", "kld_p99", "kld_median"):
        m = _PATTERNS[key].search(out)
        if m:
            res[key] = float(m.group(1))
    if "top1" in res:
        res["top1"], res["top1_err"] = res["top1"] / 100, res["top1_err"] / 100
    if "rms_dp" in res:
        res["rms_dp"], res["rms_dp_err"] = res["rms_dp"] / 100, res["rms_dp_err"] / 100
    if "ppl" not in res:
        raise ConfigError("could not parse llama-perplexity's output (no 'Final estimate: PPL' nor 'Mean PPL(Q)'):\n"
                          + out[-1000:])
    if "n_chunks" in res:
        res["n_scored"] = res["n_chunks"] * (res["n_ctx"] - 1 - res["n_ctx"] // 2)
    return res


_CHUNK_ROW = re.compile(r"^\s*(\d+)\s+" + _NUM + _PM + _NUM + r"\s+" + _NUM + _PM + _NUM + r"\s+" + _NUM + _PM + _NUM
                        + r"\s+" + _NUM + _PM + _NUM + r"\s*%\s+" + _NUM + _PM + _NUM + r"\s*%", re.M)


def parse_chunk_table(out: str) -> list[dict]:
    """The running figures llama-perplexity --kl-divergence prints after each chunk (cumulative over chunks 1..i):
    [{chunk, ppl, kld, top1}], top1 a fraction."""
    return [{"chunk": int(m.group(1)), "ppl": float(m.group(2)), "kld": float(m.group(6)),
             "top1": float(m.group(10)) / 100} for m in _CHUNK_ROW.finditer(out)]


def read_kld_base(path) -> dict:
    """Header of a llama-perplexity logits file (--kl-divergence-base): n_ctx, n_vocab, n_chunk and the token ids."""
    with open(path, "rb") as f:
        magic = f.read(8)
        if magic != b"_logits_":
            raise ConfigError(f"{path} is not a llama-perplexity logits file (magic {magic!r})")
        n_ctx, n_vocab, n_chunk = (int(x) for x in np.frombuffer(f.read(12), dtype="<i4"))
        tokens = np.frombuffer(f.read(4 * n_ctx * n_chunk), dtype="<i4").astype(np.int64)
    return {"n_ctx": n_ctx, "n_vocab": n_vocab, "n_chunk": n_chunk, "tokens": tokens}


def perplexity_cmd(model, threads: int = THREADS, text=None, base=None, kl: bool = False) -> list:
    cmd = [find_tool("llama-perplexity"), "-m", model, "-c", N_CTX, "-b", N_CTX, "--chunks", N_CHUNKS,
           "-t", threads, "-fa", "off"]
    if text is not None:
        cmd += ["-f", text]
    if base is not None:
        cmd += ["--kl-divergence-base", base]
    if kl:
        cmd += ["--kl-divergence"]
    return [str(c) for c in cmd]


def _nice(n: int | None) -> list[str]:
    return ["nice", "-n", str(n)] if n and shutil.which("nice") else []


def f16_path(work=None) -> Path:
    return work_dir(work) / "gguf" / "f16.gguf"


def ensure_f16(work=None, model_dir=None) -> Path:
    """<work>/gguf/f16.gguf: the float model, every weight F16 (norms F32), by winq's GGUF writer."""
    from winq.exporters.gguf import GGUFOptions, write_gguf
    from winq.fsutil import atomic_file
    from winq.models import load_base_model

    out = f16_path(work)
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, tok, folder = load_base_model(str(_model_dir(model_dir)))
    with atomic_file(out) as tmp:
        write_gguf(tmp, model, {}, tok, Path(folder), GGUFOptions(keep="f16"), float_weights=True)
    _log(f"F16 GGUF of {folder} -> {out} ({out.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s)")
    return out


def kld_base(text: TextFile, work=None, threads: int = THREADS, nice: int | None = 5) -> dict:
    """llama-perplexity on the F16 file over `text`, saving its log-probs (<work>/kld/<text>.kld) for every later
    --kl-divergence run; the record (F16 ppl, command, llama.cpp's token ids vs the tokenizer's) is cached beside."""
    w = work_dir(work)
    base = w / "kld" / f"{text.name}.kld"
    with _locked(base):  # another process (a `measure` beside `baselines`) may be writing the same file: wait
        return _kld_base(text, w, base, threads, nice)


def _kld_base(text: TextFile, w: Path, base: Path, threads: int, nice: int | None) -> dict:
    meta_path = base.with_suffix(".json")
    while base.is_file() and not meta_path.is_file() and time.time() - base.stat().st_mtime < 60:
        _log(f"{base} is being written by another process: waiting")  # one that did not take the lock
        time.sleep(15)
    if base.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("text_sha256") == text.record["sha256"]:
            return meta
    f16 = f16_path(w)
    if not f16.is_file():
        raise ConfigError(f"{f16} missing: `{SCRIPT} baselines` writes it")
    cmd = perplexity_cmd(f16, threads, text=text.path, base=base)
    t0 = time.perf_counter()
    out = run_tool(_nice(nice) + cmd, w / "logs" / f"kld-base-{text.name}.log", "llama-perplexity (F16 base)")
    res = parse_perplexity(out)
    hdr = read_kld_base(base)
    if hdr["n_chunk"] != N_CHUNKS or hdr["n_ctx"] != N_CTX:
        raise ConfigError(f"{base}: {hdr['n_chunk']} chunks of {hdr['n_ctx']}, expected {N_CHUNKS} of {N_CTX}: "
                          f"the text {text.path} is too short for llama.cpp's tokenizer")
    meta = {"text": text.name, "text_sha256": text.record["sha256"], "file": str(base), "command": _cmd_str(cmd),
            "f16": res, "seconds": round(time.perf_counter() - t0, 1), "tokens_sha256":
            hashlib.sha256(hdr["tokens"].tobytes()).hexdigest(), "created_at": _now()}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    _log(f"KLD base {text.name}: F16 ppl {res['ppl']:.4f} ({meta['seconds']} s)")
    return meta


def measure_gguf(path, texts=None, work=None, threads: int = THREADS, nice: int | None = 5,
                 tag: str | None = None) -> dict:
    """Score one GGUF with llama-perplexity on every held-out text against the F16 file (--kl-divergence).

    Returns {"file", "format": "gguf", "runtime": "llama.cpp", "size_mb", "bits_per_weight", "tensor_bytes",
    "n_weights", "weights_by_type", "texts": {text: {"ppl", "kld", "top1", ...}}, "commands"}; ppl is the file's
    perplexity on the scored positions, kld the mean KL(F16 || file), top1 the fraction of positions whose argmax
    agrees with F16's. `texts`: names or TextFiles (default: all of TEXTS)."""
    w = work_dir(work)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"GGUF file {path} not found")
    find_tool("llama-perplexity")
    if texts is None or all(isinstance(t, str) for t in texts):
        texts = load_texts(w, texts).values()
    ensure_f16(w)
    res = {"file": str(path), "format": "gguf", "runtime": "llama.cpp", "reference": "f16", **gguf_size(path),
           "texts": {}, "commands": []}
    tag = tag or re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem)
    for text in texts:
        base = kld_base(text, w, threads, nice)
        cmd = perplexity_cmd(path, threads, base=base["file"], kl=True)
        t0 = time.perf_counter()
        out = run_tool(_nice(nice) + cmd, w / "logs" / f"kld-{tag}-{text.name}.log", f"llama-perplexity on {path}")
        r = parse_perplexity(out)
        for need in ("kld", "top1"):
            if need not in r:
                raise ConfigError(f"llama-perplexity printed no {need} for {path} (see {w / 'logs'})")
        r["seconds"] = round(time.perf_counter() - t0, 1)
        res["texts"][text.name] = r
        res["commands"].append(_cmd_str(cmd))
        res.setdefault("logs", {})[text.name] = str(w / "logs" / f"kld-{tag}-{text.name}.log")
        _log(f"  {path.name} on {text.name}: ppl {r['ppl']:.4f}, KLD {r['kld']:.5f}, top-1 {100 * r['top1']:.2f}% "
             f"({r['seconds']} s)")
    return res


# ---------------------------------------------------------------------------------------------------------------
# 5. the Python scorer (ONNX, GPTQ, and the cross-check of llama-perplexity)


def windows(ids, n_ctx: int = N_CTX, n_chunks: int = N_CHUNKS, bos: int | None = None) -> list[np.ndarray]:
    """llama-perplexity's windows: consecutive n_ctx tokens, the first replaced by BOS when the vocabulary adds one."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size < n_ctx * n_chunks:
        raise DataError(f"{ids.size} tokens: {n_chunks} windows of {n_ctx} need {n_ctx * n_chunks}")
    out = []
    for c in range(n_chunks):
        w = ids[c * n_ctx:(c + 1) * n_ctx].copy()
        if bos is not None:
            w[0] = bos
        out.append(w)
    return out


def _mean_err(s: float, s2: float, n: int) -> tuple[float, float]:
    """Mean and its standard error, as llama-perplexity's mean_and_uncertainty."""
    f = s / n
    var = s2 / n - f * f
    return f, (float(np.sqrt(var / (n - 1))) if var > 0 and n > 10 else 0.0)


@dataclass
class Tally:
    """Running sums over scored positions: nll, KL to a reference, top-1 agreement."""

    n: int = 0
    nll: float = 0.0
    nll2: float = 0.0
    kld: float = 0.0
    kld2: float = 0.0
    same_top: int = 0
    with_ref: bool = False

    def add(self, logp, targets, ref_logp=None) -> None:
        """logp, ref_logp: float64 torch (P, V) log-probabilities; targets (P,) int64."""
        import torch

        nll = -logp.gather(1, torch.as_tensor(targets).view(-1, 1)).squeeze(1)
        self.n += int(nll.numel())
        self.nll += float(nll.sum())
        self.nll2 += float((nll * nll).sum())
        if ref_logp is not None:
            self.with_ref = True
            kl = (ref_logp.exp() * (ref_logp - logp)).sum(1)
            self.kld += float(kl.sum())
            self.kld2 += float((kl * kl).sum())
            self.same_top += int((ref_logp.argmax(1) == logp.argmax(1)).sum())

    def result(self) -> dict:
        mean_nll, nll_err = _mean_err(self.nll, self.nll2, self.n)
        ppl = float(np.exp(mean_nll))
        out = {"ppl": ppl, "ppl_err": ppl * nll_err, "n_scored": self.n}
        if self.with_ref:
            kld, kld_err = _mean_err(self.kld, self.kld2, self.n)
            top = self.same_top / self.n
            out.update(kld=kld, kld_err=kld_err, top1=top, top1_err=float(np.sqrt(top * (1 - top) / (self.n - 1))))
        return out


def _scored(logits, window):
    """(float64 log-probs of the scored positions, their target ids) of one window's logits (T, V)."""
    import torch

    first = len(window) // 2
    lp = torch.log_softmax(torch.as_tensor(logits)[first:len(window) - 1].double(), dim=-1)
    return lp, window[first + 1:]


class RefStore:
    """A reference model's log-probs of the scored positions of one text, float32 on disk (chunks, 255, V)."""

    def __init__(self, path: Path, n_chunks: int, n_pos: int, n_vocab: int):
        self.path, self.shape = Path(path), (n_chunks, n_pos, n_vocab)
        self.done = self.path.with_suffix(".done")

    def ready(self) -> bool:
        return self.path.is_file() and self.done.is_file()

    def write(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done.unlink(missing_ok=True)
        return np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=self.shape)

    def read(self):
        if not self.ready():
            raise DataError(f"reference log-probs {self.path} incomplete")
        return np.load(self.path, mmap_mode="r")


def score(logits_fn, wins: list[np.ndarray], ref=None, store_into=None, label: str = "") -> dict:
    """Perplexity (and with `ref`: KL(ref || model) and top-1 agreement) over the scored positions of `wins`.

    logits_fn: int64 ids (T,) -> float32 logits (T, V). ref: an array (chunks, P, V) of reference log-probs, or a
    callable like logits_fn (the reference evaluated window by window). store_into: an array to write this
    model's log-probs into (making it a reference)."""
    import torch

    tally = Tally()
    t0 = time.perf_counter()
    with torch.no_grad():
        for c, w in enumerate(wins):
            lp, targets = _scored(logits_fn(torch.from_numpy(w)), w)
            if ref is None:
                ref_lp = None
            elif callable(ref):
                ref_lp, _ = _scored(ref(torch.from_numpy(w)), w)
            else:
                ref_lp = torch.from_numpy(np.array(ref[c], dtype=np.float64))
            tally.add(lp, targets, ref_lp)
            if store_into is not None:
                store_into[c] = lp.float().numpy()
            if label and (c + 1) % 4 == 0:
                _log(f"    {label}: window {c + 1}/{len(wins)} ({time.perf_counter() - t0:.0f} s)")
    out = tally.result()
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def bos_id(work=None) -> int | None:
    """BOS id when the F16 GGUF's vocabulary adds one (llama-perplexity then puts it first in every window)."""
    from gguf import GGUFReader

    path = f16_path(work)
    if not path.is_file():
        raise ConfigError(f"{path} missing: `{SCRIPT} baselines` writes it")
    r = GGUFReader(str(path))

    def field_value(key):
        f = r.fields.get(key)
        return None if f is None else f.parts[f.data[0]].tolist()[0]

    return int(field_value("tokenizer.ggml.bos_token_id")) if field_value("tokenizer.ggml.add_bos_token") else None


def python_windows(texts: dict[str, TextFile], model_dir=None, work=None) -> dict[str, list[np.ndarray]]:
    tok = _tokenizer(_model_dir(model_dir))
    bos = bos_id(work)
    return {n: windows(t.ids(tok), bos=bos) for n, t in texts.items()}


def measure_python(name: str, logits_fn, wins: dict, ref_name: str, work=None, n_vocab: int | None = None,
                   write_ref: bool = False, ref_fn=None) -> dict:
    """Score a model (logits_fn) on every text's windows against the stored reference `ref_name`; write_ref=True
    makes this model that reference (its KL is then 0 by definition and not reported)."""
    w = work_dir(work)
    out = {}
    for text, ws in wins.items():
        n_pos = N_CTX - 1 - N_CTX // 2
        if write_ref:
            if n_vocab is None:
                raise ConfigError("write_ref needs n_vocab")
            store = RefStore(w / "ref" / ref_name / f"{text}.npy", len(ws), n_pos, n_vocab)
            arr = store.write()
            r = score(logits_fn, ws, store_into=arr, label=f"{name} {text}")
            arr.flush()
            del arr
            store.done.write_text(_now() + "\n")
        else:
            store = RefStore(w / "ref" / ref_name / f"{text}.npy", len(ws), n_pos, 0)
            ref = ref_fn if ref_fn is not None else store.read()
            r = score(logits_fn, ws, ref=ref, label=f"{name} {text}")
        out[text] = r
        _log(f"  {name} on {text}: ppl {r['ppl']:.4f}" + (f", KLD {r['kld']:.5f}, top-1 {100 * r['top1']:.2f}%"
                                                        if "kld" in r else "") + f" ({r['seconds']} s)")
    return out


def ref_ready(ref_name: str, texts, work=None) -> bool:
    w = work_dir(work)
    return all(RefStore(w / "ref" / ref_name / f"{t}.npy", 0, 0, 0).ready() for t in texts)


# ---------------------------------------------------------------------------------------------------------------
# 6. results: merge by point name (under a lock: other processes may add points at the same time)


def machine() -> dict:
    cpu = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("winq", "torch", "transformers", "gguf", "onnx", "onnxruntime", "onnx-ir", "optimum", "gptqmodel",
                "llama-cpp-python", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


@contextlib.contextmanager
def _locked(out: Path):
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def load_results(out=RESULTS) -> dict:
    out = Path(out)
    if out.is_file():
        return json.loads(out.read_text())
    return {"benchmark": "quality", "description": __doc__.split("\n\n")[2].strip(), "points": {}}


def _settings() -> dict:
    return {"n_ctx": N_CTX, "n_chunks": N_CHUNKS, "tokens_per_text": TEXT_TOKENS,
            "scored_per_text": N_CHUNKS * (N_CTX - 1 - N_CTX // 2), "threads": THREADS, "calibration_chunks":
            CALIB_CHUNKS, "kld": "mean over scored positions of KL(p_float || p_quant)", "top1":
            "fraction of scored positions where argmax(p_quant) == argmax(p_float)", "size_mb": "bytes / 1e6",
            "bits_per_weight": "8 * bytes of every tensor (GGUF) / weights of the model; ONNX/GPTQ: of the folder's "
                               "graph and weight files"}


def update_results(fn, out=RESULTS, plot_png: bool = True, work=None) -> dict:
    """Apply fn(report) to the results file under its lock and write it (and the plot) back atomically."""
    from winq.fsutil import atomic_file

    out = Path(out)
    with _locked(out):
        report = load_results(out)
        fn(report)
        report["settings"] = _settings()
        report["machine"] = machine()
        report["versions"] = versions()
        report["llama_tools"] = tools_record()
        rec = work_dir(work) / "texts" / "texts.json"
        if rec.is_file():
            report["texts"] = json.loads(rec.read_text())
        report["updated_at"] = _now()
        with atomic_file(out) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
        if plot_png:
            with atomic_file(out.with_suffix(".png")) as tmp:
                plot(report, tmp)
    return report


def add_point(name: str, measurements: dict, meta: dict | None = None, out=RESULTS, plot_png: bool = True,
              work=None) -> dict:
    """Merge one point into results/quality.json (replacing a point of the same name) and redraw the plot.

    measurements: what measure_gguf (or measure_onnx / measure_gptq) returns: size_mb, bits_per_weight and
    texts {text: {ppl, kld, top1, ...}}; or {"status": "failed", "error": ...}. meta: anything to keep with it
    (family: one of FAMILIES, default "winq"; command, training budget, seed, ...)."""
    meta = dict(meta or {})
    family = meta.pop("family", measurements.get("family", "winq"))
    if family not in FAMILIES:
        raise ConfigError(f"family {family!r}: choose one of {', '.join(FAMILIES)}")
    if measurements.get("status", "ok") == "ok" and not measurements.get("texts"):
        raise ConfigError(f"point {name!r} has no per-text measurements")
    point = {"family": family, "status": measurements.get("status", "ok"), **measurements, "meta": meta,
             "measured_at": _now()}

    def put(report):
        report.setdefault("points", {})[name] = point

    update_results(put, out, plot_png, work)
    return point


def done(name: str, out=RESULTS) -> bool:
    """Is point `name` in the results, measured on every text? (A failed or partial point is measured again.)"""
    p = load_results(out).get("points", {}).get(name)
    return bool(p) and p.get("status") == "ok" and set(TEXTS) <= set(p.get("texts", {}))


# ---------------------------------------------------------------------------------------------------------------
# 7. baselines


def ensure_imatrix(work=None, threads: int = THREADS, nice: int | None = 5) -> dict:
    """<work>/imatrix/imatrix.gguf: llama-imatrix of the F16 model on CALIB_CHUNKS chunks of the calibration text."""
    w = work_dir(work)
    out = w / "imatrix" / "imatrix.gguf"
    meta_path = out.with_suffix(".json")
    if out.is_file() and meta_path.is_file():
        return json.loads(meta_path.read_text())
    calib = w / "texts" / "calibration.txt"
    if not calib.is_file():
        raise DataError(f"{calib} missing: write it with `{SCRIPT} texts`")
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(find_tool("llama-imatrix")), "-m", str(ensure_f16(w)), "-f", str(calib), "-o", str(out),
           "--chunks", str(CALIB_CHUNKS), "-c", str(N_CTX), "-b", str(N_CTX), "-t", str(threads), "-fa", "off"]
    _log(f"imatrix: {CALIB_CHUNKS} chunks of {N_CTX} tokens of training text (a few minutes)")
    t0 = time.perf_counter()
    log = run_tool(_nice(nice) + cmd, w / "logs" / "imatrix.log", "llama-imatrix")
    chunks = re.findall(r"\[(\d+)\]", log)
    ptb = json.loads((w / "texts" / "texts.json").read_text())["calibration"]["tokens_per_source"]["ptb"]
    meta = {"file": str(out), "command": _cmd_str(cmd), "calibration": str(calib),
            "sources": "ptb train only" if CALIB_CHUNKS * N_CTX <= ptb else "ptb train, then sotu train",
            "chunks_processed": int(chunks[-1]) if chunks else None, "seconds": round(time.perf_counter() - t0, 1),
            "created_at": _now()}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    _log(f"imatrix written in {meta['seconds']} s: {out}")
    return meta


def quantize_gguf(qtype: str, imatrix: dict | None, work=None, nice: int | None = 5, threads: int = THREADS) -> tuple:
    """(path, command) of llama-quantize's `qtype` of the F16 file, with the importance matrix when given."""
    w = work_dir(work)
    name = f"{qtype}{'-imat' if imatrix else ''}"
    out = w / "gguf" / f"{name}.gguf"
    cmd = [str(find_tool("llama-quantize"))]
    if imatrix:
        cmd += ["--imatrix", imatrix["file"]]
    cmd += [str(ensure_f16(w)), str(out), qtype.upper(), str(threads)]
    if not out.is_file():
        tmp = out.with_name(out.name + ".tmp")
        cmd_tmp = cmd[:-3] + [str(tmp)] + cmd[-2:]
        run_tool(_nice(nice) + cmd_tmp, w / "logs" / f"quantize-{name}.log", f"llama-quantize {qtype}")
        os.replace(tmp, out)
    return out, _cmd_str(cmd)


def run_llamacpp(work=None, out=RESULTS, force: bool = False, threads: int = THREADS, types=LADDER,
                 imatrix_modes=(False, True)) -> None:
    w = work_dir(work)
    texts = load_texts(w)
    f16 = ensure_f16(w)
    imat = ensure_imatrix(w, threads) if True in imatrix_modes else None
    if force or not done("f16", out):
        _log("F16 (the reference of every GGUF point)")
        bases = {t.name: kld_base(t, w, threads) for t in texts.values()}
        m = {"file": str(f16), "format": "gguf", "runtime": "llama.cpp", "reference": None, **gguf_size(f16),
             "texts": {t: b["f16"] for t, b in bases.items()}, "commands": [b["command"] for b in bases.values()]}
        add_point("f16", m, {"family": "reference", "what": "the float model (dequantized Q4_1 values) as F16, "
                             "written by winq's GGUF writer (exporters.gguf.write_gguf, float_weights); ppl from "
                             "the --kl-divergence-base runs (KLD 0 and top-1 1 by definition)"}, out, work=w)
    for qt in types:  # type by type, without then with the imatrix
        for with_imat in imatrix_modes:
            name = f"llamacpp-{qt}{'-imat' if with_imat else ''}"
            if done(name, out) and not force:
                _log(f"{name}: in {out} already (--force re-measures)")
                continue
            _log(f"{name}")
            try:
                path, qcmd = quantize_gguf(qt, imat if with_imat else None, w, threads=threads)
                m = measure_gguf(path, list(texts.values()), w, threads, tag=name)
                meta = {"family": "llama.cpp+imatrix" if with_imat else "llama.cpp", "type": qt.upper(),
                        "quantize_command": qcmd}
                if with_imat:
                    meta["imatrix"] = imat
                add_point(name, m, meta, out, work=w)
            except WinqError as e:
                add_point(name, {"status": "failed", "error": str(e)[:2000]},
                          {"family": "llama.cpp+imatrix" if with_imat else "llama.cpp"}, out, work=w)
                _log(f"{name} failed: {str(e)[:300]}")


def cross_check(work=None, out=RESULTS, point: str = "llamacpp-q4_0", text: str = "licenses",
                threads: int = THREADS, n_windows: int = 4) -> dict:
    """KLD and top-1 of one GGUF on one text by winq's Python path (llama-cpp-python logits of the file and of the
    F16 file, runtime/llamacpp.py, on llama-perplexity's own token windows) next to llama-perplexity's figures over
    the same first `n_windows` windows (its running per-chunk table, read from the run's log)."""
    from winq.runtime.llamacpp import LlamaCppSession
    from winq.runtime.session import LoadOptions

    w = work_dir(work)
    report = load_results(out)
    p = report.get("points", {}).get(point)
    if not p or p.get("status") != "ok" or text not in p.get("texts", {}):
        raise ConfigError(f"point {point!r} with text {text!r} not in {out}: run `{SCRIPT} baselines` first")
    base = json.loads((w / "kld" / f"{text}.json").read_text())
    hdr = read_kld_base(base["file"])
    bos = bos_id(w)
    wins = windows(hdr["tokens"], hdr["n_ctx"], hdr["n_chunk"], bos)[:n_windows]
    log = Path(p.get("logs", {}).get(text, w / "logs" / f"kld-{point}-{text}.log"))
    rows = {r["chunk"]: r for r in parse_chunk_table(log.read_text(encoding="utf-8", errors="replace"))}
    if len(wins) not in rows:
        raise ConfigError(f"{log}: no per-chunk row {len(wins)} of llama-perplexity's table")
    lp = {**rows[len(wins)], "source": f"{log}: the running row after chunk {len(wins)}"}
    opts = LoadOptions(threads=threads, context=N_CTX)
    _log(f"cross-check: {point} on {text} through llama-cpp-python (F32 KV cache) against F16")
    model = LlamaCppSession(p["file"], opts)
    ref = LlamaCppSession(str(f16_path(w)), opts)
    r = score(model.logits, wins, ref=ref.logits, label=f"cross-check {point}")
    tok = _tokenizer(_model_dir())
    hf_ids = load_texts(w, [text])[text].ids(tok)
    res = {"point": point, "text": text, "n_windows": len(wins), "python": r, "llama_perplexity": lp,
           "kld_rel_diff": abs(r["kld"] - lp["kld"]) / lp["kld"], "windows": f"the first {len(wins)} windows of the "
           f"token ids stored in {base['file']} (llama.cpp's tokenization of the text), BOS first: {bos is not None}",
           "llama_tokens_equal_hf_tokens": bool(np.array_equal(hdr["tokens"], hf_ids)),
           "runtime": "runtime/llamacpp.py LlamaCppSession (llama-cpp-python, F32 KV cache, logits_all); "
                      "llama-perplexity: F16 KV cache, base log-probs stored as uint16",
           "measured_at": _now()}

    def put(rep):
        rep.setdefault("cross_checks", {})[f"{point}/{text}"] = res

    update_results(put, out, plot_png=False, work=w)
    _log(f"cross-check {point} / {text}: KLD python {r['kld']:.5f} vs llama-perplexity {lp['kld']:.5f}; top-1 "
         f"{100 * r['top1']:.2f}% vs {100 * lp['top1']:.2f}%; ppl {r['ppl']:.4f} vs {lp['ppl']:.4f}")
    return res


# --- onnxruntime


@dataclass(frozen=True)
class OrtVariant:
    name: str
    algorithm: str  # DEFAULT | HQQ | RTN | k_quant | GPTQ
    bits: int
    block_size: int = 32

    @property
    def packed(self) -> bool:
        """Does ORT write MatMulNBits (packed bits) for it? Its neural-compressor path falls back to float."""
        if self.algorithm in ("DEFAULT", "HQQ"):
            return True
        return self.bits == 4 or (self.bits == 8 and self.algorithm != "GPTQ")


ORT_VARIANTS = [OrtVariant(f"ort-{a.lower()}-{b}bit-b{bs}", a, b, bs) for a, b, bs in (
    ("DEFAULT", 4, 32), ("DEFAULT", 2, 32), ("HQQ", 4, 32), ("HQQ", 2, 32), ("RTN", 4, 32), ("k_quant", 4, 32),
    ("GPTQ", 4, 32), ("DEFAULT", 4, 128), ("DEFAULT", 2, 128), ("RTN", 2, 32), ("k_quant", 2, 32), ("GPTQ", 2, 32))]
GPTQ_ORT_SAMPLES = 8  # calibration windows of N_CTX tokens for ORT's GPTQ (it runs the model once per MatMul input)


def ort_fp32(work=None, model_dir=None) -> Path:
    from winq.exporters.onnx import export_fp32

    out = work_dir(work) / "onnx" / "fp32"
    if not (out / "model.onnx").is_file():
        t0 = time.perf_counter()
        export_fp32(_model_dir(model_dir), out)
        _log(f"fp32 ONNX -> {out} ({time.perf_counter() - t0:.0f} s)")
    return out


class _Calib:
    """onnxruntime CalibrationDataReader over fixed windows (empty KV cache), for ORT's GPTQ."""

    def __init__(self, wins, kv: dict):
        self.feeds = []
        for w in wins:
            T = len(w)
            f = {"input_ids": w[None].astype(np.int64), "attention_mask": np.ones((1, T), dtype=np.int64),
                 "position_ids": np.arange(T, dtype=np.int64)[None]}
            f.update({n: np.zeros((1, h, 0, d), dtype=np.float32) for n, (h, d) in kv.items()})
            self.feeds.append(f)
        self.i = 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def __iter__(self):
        self.i = 0
        while (f := self.get_next()) is not None:
            yield f

    def rewind(self):
        self.i = 0


def quantize_onnx(v: OrtVariant, src: Path, dest: Path, calib_wins=None) -> str:
    """Quantize the fp32 ONNX folder `src` into `dest` with onnxruntime's MatMulNBitsQuantizer; returns the call."""
    import logging

    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as Q

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # it logs a line per node at INFO
    Q.logger.setLevel(logging.WARNING)

    from winq.formats.onnx import OrtDecoder, save_model
    from winq.fsutil import atomic_dir

    if v.algorithm == "DEFAULT":
        cfg = Q.DefaultWeightOnlyQuantConfig(block_size=v.block_size, is_symmetric=False, bits=v.bits)
        call = f"DefaultWeightOnlyQuantConfig(block_size={v.block_size}, is_symmetric=False, bits={v.bits})"
    elif v.algorithm == "HQQ":
        cfg = Q.HQQWeightOnlyQuantConfig(block_size=v.block_size, bits=v.bits)
        call = f"HQQWeightOnlyQuantConfig(block_size={v.block_size}, bits={v.bits})"
    elif v.algorithm in ("RTN", "k_quant"):
        cls = Q.RTNWeightOnlyQuantConfig if v.algorithm == "RTN" else Q.KQuantWeightOnlyQuantConfig
        cfg = cls()
        call = f"{cls.__name__}()"
    elif v.algorithm == "GPTQ":
        kv = OrtDecoder(src, threads=THREADS).kv
        cfg = Q.GPTQWeightOnlyQuantConfig(calibration_data_reader=_Calib(calib_wins, kv), block_size=128)
        call = (f"GPTQWeightOnlyQuantConfig(calibration_data_reader={len(calib_wins)} windows of {N_CTX} tokens of "
                f"the calibration text, block_size=128 (its GPTQ column block))")
    else:
        raise ConfigError(f"unknown ORT algorithm {v.algorithm}")
    kw = dict(block_size=v.block_size, is_symmetric=False, bits=v.bits, algo_config=cfg)
    if v.algorithm in ("RTN", "k_quant", "GPTQ"):
        # the neural-compressor path takes bits / group size per node (its template says 4 bits): set them
        model = onnx.load(str(src / "model.onnx"))
        cfg.customized_weight_config = {n.name: {"bits": v.bits, "group_size": v.block_size}
                                        for n in model.graph.node if n.op_type == "MatMul"}
        q = Q.MatMulNBitsQuantizer(str(src / "model.onnx"), **kw)
        q.algo_config.customized_weight_config = cfg.customized_weight_config
    else:
        q = Q.MatMulNBitsQuantizer(str(src / "model.onnx"), **kw)
    q.process()
    m = q.model.model if hasattr(q.model, "model") else q.model
    # the neural-compressor path (RTN, k_quant, GPTQ) leaves the tensors it did not touch (the embedding) as
    # references into src's model.onnx.data: read them in before writing a folder of our own
    from onnx.external_data_helper import load_external_data_for_model

    load_external_data_for_model(m, str(src))
    with atomic_dir(dest) as tmp:
        save_model(m, tmp)
        for f in src.iterdir():
            if f.suffix == ".json" or f.name.startswith("tokenizer"):
                shutil.copy2(f, tmp / f.name)
    return f"MatMulNBitsQuantizer(fp32 model.onnx, bits={v.bits}, block_size={v.block_size}, algo_config={call})"


def _nbits_layers(folder: Path) -> dict:
    from winq.formats.onnx import load_graph

    m = load_graph(folder)
    ops: dict[str, int] = {}
    bits: dict[str, int] = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
        if n.op_type == "MatMulNBits":
            b = next((a.i for a in n.attribute if a.name == "bits"), None)
            bits[str(b)] = bits.get(str(b), 0) + 1
    return {"MatMul": ops.get("MatMul", 0), "MatMulNBits": ops.get("MatMulNBits", 0), "MatMulNBits_bits": bits,
            "GatherBlockQuantized": ops.get("GatherBlockQuantized", 0)}


def run_ort(work=None, out=RESULTS, force: bool = False, threads: int = THREADS, variants=None) -> None:
    import torch

    from winq.formats.onnx import OrtDecoder

    torch.set_num_threads(threads)
    w = work_dir(work)
    texts = load_texts(w)
    ensure_f16(w)
    wins = python_windows(texts, work=w)
    nw = n_model_weights()
    fp32 = ort_fp32(w)
    if force or not done("ort-fp32", out) or not ref_ready("ort-fp32", texts, w):
        _log("ort-fp32 (the reference of every ONNX point)")
        dec = OrtDecoder(fp32, threads=threads)
        vocab = int(dec.prefill(np.array([0], dtype=np.int64)).shape[-1])
        r = measure_python("ort-fp32", dec.prefill, wins, "ort-fp32", w, n_vocab=vocab, write_ref=True)
        add_point("ort-fp32", {"file": str(fp32), "format": "onnx", "runtime": "onnxruntime", "reference": None,
                               **folder_size(fp32, nw), "texts": r, "graph": _nbits_layers(fp32)},
                  {"family": "reference", "what": "fp32 ONNX of the float model (winq.exporters.onnx.export_fp32)"},
                  out, work=w)
    calib = None
    for v in ORT_VARIANTS if variants is None else variants:
        if done(v.name, out) and not force:
            _log(f"{v.name}: in {out} already (--force re-measures)")
            continue
        _log(f"{v.name}")
        dest = w / "onnx" / v.name
        meta = {"family": "onnxruntime", "algorithm": v.algorithm, "bits": v.bits, "block_size": v.block_size,
                "packed": v.packed}
        try:
            t0 = time.perf_counter()
            call = None
            if force or not (dest / "model.onnx").is_file():
                if v.algorithm == "GPTQ" and calib is None:
                    tok = _tokenizer(_model_dir())
                    calib_ids = tok((w / "texts" / "calibration.txt").read_text(encoding="utf-8"),
                                    add_special_tokens=False)["input_ids"]
                    calib = windows(calib_ids, N_CTX, GPTQ_ORT_SAMPLES, None)
                call = quantize_onnx(v, fp32, dest, calib)
            meta["quantize_seconds"] = round(time.perf_counter() - t0, 1)
            meta["quantize_call"] = call or "(reused the quantized folder already in the work dir)"
            dec = OrtDecoder(dest, threads=threads)
            r = measure_python(v.name, dec.prefill, wins, "ort-fp32", w)
            graph = _nbits_layers(dest)
            m = {"file": str(dest), "format": "onnx", "runtime": "onnxruntime", "reference": "ort-fp32",
                 **folder_size(dest, nw), "texts": r, "graph": graph, "packed": v.packed and graph["MatMulNBits"] > 0}
            if not m["packed"]:
                meta["note"] = ("onnxruntime's neural-compressor path writes MatMulNBits only for 4 bits (GPTQ) or 4/8 "
                                "bits (RTN, k_quant): these weights are quantize-dequantized and stored as float32, "
                                "so the size is the float file's; the point is left off the size plot")
            add_point(v.name, m, meta, out, work=w)
        except Exception as e:  # record any failure of a third-party quantizer as the point's result
            add_point(v.name, {"status": "failed", "error": f"{type(e).__name__}: {str(e)[:1500]}"}, meta, out,
                      work=w)
            _log(f"{v.name} failed: {type(e).__name__}: {str(e)[:300]}")


# --- gptqmodel

GPTQ_BITS = (2, 4, 3)  # 2 bits first: the size the 2-bit goal compares at
GPTQ_GROUP = 128
GPTQ_SAMPLES = 32  # calibration windows of N_CTX tokens (16,384 tokens)


def _hf_logits_fn(model):
    import torch

    def fn(ids):
        with torch.no_grad():
            return model(input_ids=ids.view(1, -1).long()).logits[0].float()

    return fn


def quantize_gptqmodel(bits: int, dest: Path, calib_ids: list[int], model_dir=None, group: int = GPTQ_GROUP) -> dict:
    """gptqmodel GPTQ of the float model on CPU into `dest`; returns what was called."""
    import torch

    # gptqmodel 7.6 sizes its CPU pool (cpu_count + 1) // 2 = 1 on 2 CPUs, then asks it for a 2-worker model loader:
    # "ValueError: Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1". Its own override:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, ((os.cpu_count() or 1) + 1) // 2)))
    with contextlib.redirect_stdout(sys.stderr):
        from gptqmodel import GPTQModel, QuantizeConfig
    from winq.fsutil import atomic_dir

    src = _model_dir(model_dir)
    cal = [{"input_ids": calib_ids[i * N_CTX:(i + 1) * N_CTX], "attention_mask": [1] * N_CTX}
           for i in range(GPTQ_SAMPLES)]
    qc = QuantizeConfig(bits=bits, group_size=group, desc_act=False, sym=True)
    with contextlib.redirect_stdout(sys.stderr):
        model = GPTQModel.load(str(src), qc, device="cpu", dtype=torch.float32)
        model.quantize(cal, batch_size=1)
        with atomic_dir(dest) as tmp:
            model.save(str(tmp))
    return {"env": {"GPTQMODEL_CPU_WORKERS": os.environ["GPTQMODEL_CPU_WORKERS"]},
            "without_env": "ValueError: Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1 "
                           "(gptqmodel/__init__.py _default_cpu_workers on a 2-CPU machine)",
            "call": f"GPTQModel.load({src}, QuantizeConfig(bits={bits}, group_size={group}, desc_act=False, "
                    f"sym=True), device='cpu', dtype=torch.float32).quantize({GPTQ_SAMPLES} windows of {N_CTX} "
                    f"tokens of the calibration text, batch_size=1); .save()"}


def run_gptq(work=None, out=RESULTS, force: bool = False, threads: int = THREADS, bits_list=GPTQ_BITS) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    w = work_dir(work)
    texts = load_texts(w)
    ensure_f16(w)
    wins = python_windows(texts, work=w)
    nw = n_model_weights()
    ref_checked = False

    def reference():
        if not (force or not done("hf-fp32", out) or not ref_ready("hf-fp32", texts, w)):
            return
        from winq.models import load_base_model

        _log("hf-fp32 (the reference of every GPTQ point: the float model in transformers)")
        model, _, folder = load_base_model(str(_model_dir()))
        r = measure_python("hf-fp32", _hf_logits_fn(model), wins, "hf-fp32", w, n_vocab=int(model.config.vocab_size),
                           write_ref=True)
        add_point("hf-fp32", {"file": str(folder), "format": "hf", "runtime": "transformers", "reference": None,
                              **folder_size(folder, nw), "texts": r},
                  {"family": "reference", "what": "the float model (float32 safetensors) in transformers"}, out,
                  work=w)
        del model

    tok = _tokenizer(_model_dir())
    calib_ids = tok((w / "texts" / "calibration.txt").read_text(encoding="utf-8"),
                    add_special_tokens=False)["input_ids"]
    for bits in bits_list:
        name = f"gptqmodel-{bits}bit-g{GPTQ_GROUP}"
        if done(name, out) and not force:
            _log(f"{name}: in {out} already (--force re-measures)")
            continue
        _log(f"{name} (gptqmodel on CPU)")
        dest = w / "gptq" / name
        meta = {"family": "gptqmodel", "bits": bits, "group_size": GPTQ_GROUP, "samples": GPTQ_SAMPLES}
        try:
            t0 = time.perf_counter()
            if force or not (dest / "config.json").is_file():
                meta.update(quantize_gptqmodel(bits, dest, calib_ids))
            meta["quantize_seconds"] = round(time.perf_counter() - t0, 1)
        except Exception as e:  # gptqmodel on CPU: record exactly why it did not run
            import traceback

            tb = traceback.format_exc().splitlines()
            add_point(name, {"status": "failed", "stage": "quantize", "error": f"{type(e).__name__}: {str(e)[:1500]}",
                             "traceback_tail": tb[-12:]}, meta, out, work=w)
            _log(f"{name}: gptqmodel failed on CPU: {type(e).__name__}: {str(e)[:300]}")
            continue
        if not ref_checked:  # the reference only once a quantization has worked
            reference()
            ref_checked = True
        try:
            from winq.runtime.gptq import load_gptq

            model = load_gptq(dest)
            r = measure_python(name, _hf_logits_fn(model), wins, "hf-fp32", w)
            add_point(name, {"file": str(dest), "format": "gptq", "runtime": "transformers+gptqmodel",
                             "reference": "hf-fp32", **folder_size(dest, nw), "texts": r}, meta, out, work=w)
            del model
        except Exception as e:
            add_point(name, {"status": "failed", "stage": "load/measure", "error":
                             f"{type(e).__name__}: {str(e)[:1500]}"}, meta, out, work=w)
            _log(f"{name}: loading/measuring failed: {type(e).__name__}: {str(e)[:300]}")


def measure_onnx(folder, work=None, threads: int = THREADS, accuracy_level: int | None = None) -> dict:
    """Score an ONNX export (e.g. winq's) with onnxruntime against the fp32 ONNX reference (`baselines --only ort`
    must have run); same return shape as measure_gguf."""
    from winq.formats.onnx import OrtDecoder

    w = work_dir(work)
    texts = load_texts(w)
    if not ref_ready("ort-fp32", texts, w):
        raise ConfigError(f"the ort-fp32 reference is missing: run `{SCRIPT} baselines --only ort` first")
    dec = OrtDecoder(folder, threads=threads, accuracy_level=accuracy_level)
    r = measure_python(Path(folder).name, dec.prefill, python_windows(texts, work=w), "ort-fp32", w)
    return {"file": str(folder), "format": "onnx", "runtime": "onnxruntime", "reference": "ort-fp32",
            "accuracy_level": accuracy_level, **folder_size(folder, n_model_weights()), "texts": r,
            "graph": _nbits_layers(Path(folder))}


def measure_gptq(folder, work=None, threads: int = THREADS) -> dict:
    """Score a GPTQ folder (e.g. winq's export) with transformers + gptqmodel against the float model."""
    import torch

    from winq.runtime.gptq import load_gptq

    torch.set_num_threads(threads)
    w = work_dir(work)
    texts = load_texts(w)
    if not ref_ready("hf-fp32", texts, w):
        raise ConfigError(f"the hf-fp32 reference is missing: run `{SCRIPT} baselines --only gptq` first")
    model = load_gptq(folder)
    r = measure_python(Path(folder).name, _hf_logits_fn(model), python_windows(texts, work=w), "hf-fp32", w)
    return {"file": str(folder), "format": "gptq", "runtime": "transformers+gptqmodel", "reference": "hf-fp32",
            **folder_size(folder, n_model_weights()), "texts": r}


# ---------------------------------------------------------------------------------------------------------------
# 8. report: plot and table

PPL_CAP = 3.0  # the perplexity panels stop at this multiple of F16's perplexity
_STYLE = {"reference": ("#555555", "D"), "llama.cpp": ("#3b75af", "o"), "llama.cpp+imatrix": ("#1b3f6b", "s"),
          "onnxruntime": ("#c44e52", "^"), "gptqmodel": ("#55a868", "v"), "winq": ("#000000", "*")}


def plot(report: dict, png) -> None:
    """KLD (log) and perplexity against file size (MB), one column per text. F16's perplexity is dashed; the
    perplexity axis stops at PPL_CAP x F16's, points above it sit on the top edge (hollow, their value written)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from winq.benchmarks.edge import _place_labels

    points = {n: p for n, p in report.get("points", {}).items() if p.get("status") == "ok" and p.get("texts")}
    texts = [t for t in TEXTS if any(t in p["texts"] for p in points.values())] or list(TEXTS)
    fig, axes = plt.subplots(2, len(texts), figsize=(5.8 * len(texts), 8.8), squeeze=False)
    for j, text in enumerate(texts):
        f16 = points.get("f16", {}).get("texts", {}).get(text, {}).get("ppl")
        for i, metric in enumerate(("kld", "ppl")):
            ax = axes[i][j]
            seen, labels = set(), []
            cap = PPL_CAP * f16 if (metric == "ppl" and f16) else None
            for name, p in points.items():
                r = p["texts"].get(text)
                if r is None or p.get("packed") is False or metric not in r:
                    continue
                if p["family"] == "reference":
                    if metric == "ppl" and name == "f16":
                        ax.axhline(r["ppl"], color="#555555", lw=0.8, ls="--", label=f"F16 ({r['ppl']:.2f})")
                    continue
                color, mk = _STYLE.get(p["family"], ("#999999", "x"))
                y, off = r[metric], cap is not None and r[metric] > cap
                short = name.replace("llamacpp-", "").replace("gptqmodel-", "gptq-").replace("-imat", "+i")
                if off:
                    y, short = cap, f"{short} (ppl {r[metric]:.3g})"
                ax.scatter(p["size_mb"], y, color=color, marker=mk, s=70 if mk == "*" else 28, zorder=3,
                           facecolors="none" if off else color,
                           label=p["family"] if p["family"] not in seen else None)
                seen.add(p["family"])
                labels.append((short, p["size_mb"], y))
            ax.set_yscale("log")
            if metric == "kld":
                ax.set_title(f"{text}: KL divergence to the float model", fontsize=9)
                ax.set_ylabel("mean KLD (nats, log)")
            else:
                ax.set_title(f"{text}: perplexity (axis cut at {PPL_CAP:g}x F16)", fontsize=9)
                ax.set_ylabel("perplexity (log)")
                if cap:
                    ax.set_ylim(0.95 * f16, cap * 1.08)
            ax.set_xlabel("file size (MB)")
            ax.grid(alpha=0.3, which="both")
            if labels:
                _place_labels(ax, labels, height=7.0, width=5.5)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="center right")
    fig.suptitle(f"winq quality benchmark: the built-in model's float weights, {TEXT_TOKENS} tokens a text, "
                 f"{N_CHUNKS} windows of {N_CTX} (second halves scored); GGUF in llama.cpp, ONNX in onnxruntime, "
                 "GPTQ in transformers+gptqmodel", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110, format="png")
    plt.close(fig)


def table(report: dict) -> str:
    texts = [t for t in TEXTS]
    head = "| point | family | MB | bits/w | " + " | ".join(f"{t} ppl / KLD / top-1" for t in texts) + " |"
    lines = [head, "|---" * (4 + len(texts)) + "|"]
    for name, p in report.get("points", {}).items():
        if p.get("status") != "ok":
            lines.append(f"| {name} | {p.get('family')} | failed: {str(p.get('error'))[:120]} |")
            continue
        cells = []
        for t in texts:
            r = p["texts"].get(t)
            if r is None:
                cells.append("-")
            elif "kld" in r:
                cells.append(f"{r['ppl']:.3f} / {r['kld']:.4f} / {100 * r['top1']:.1f}%")
            else:
                cells.append(f"{r['ppl']:.3f} / (ref) / -")
        flag = "" if p.get("packed", True) else " (float-stored)"
        lines.append(f"| {name}{flag} | {p['family']} | {p['size_mb']:.1f} | {p['bits_per_weight']:.2f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# CLI

PHASES = ("build-tools", "texts", "baselines", "measure", "cross-check", "plot", "table")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=SCRIPT, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=PHASES)
    ap.add_argument("--work", default=None, help="work folder (default $WINQ_CACHE/quality)")
    ap.add_argument("--out", default=str(RESULTS), help="results JSON (default results/quality.json)")
    ap.add_argument("--threads", "-t", type=int, default=THREADS)
    ap.add_argument("--force", action="store_true", help="rebuild / re-measure what is already there")
    ap.add_argument("--jobs", "-j", type=int, default=2, help="build-tools: parallel compile jobs")
    ap.add_argument("--nice", type=int, default=10, help="build-tools: niceness of the compile (default 10)")
    ap.add_argument("--only", default="llamacpp,ort,gptq", help="baselines: families, comma-separated "
                                                                "(llamacpp, ort, gptq; default all, in that order)")
    ap.add_argument("--points", default=None, help="baselines: only these ORT / llama.cpp types, comma-separated "
                                                     "(e.g. ort-rtn-4bit-b32,q4_0)")
    ap.add_argument("--gguf", help="measure: the GGUF file")
    ap.add_argument("--onnx", help="measure: an ONNX folder (scored by onnxruntime against ort-fp32)")
    ap.add_argument("--gptq", help="measure: a GPTQ folder (scored by transformers+gptqmodel against hf-fp32)")
    ap.add_argument("--name", help="measure: the point's name in the results")
    ap.add_argument("--family", default="winq", choices=FAMILIES, help="measure: the point's family (default winq)")
    ap.add_argument("--note", default=None, help="measure: free text kept in the point's meta (e.g. the command)")
    ap.add_argument("--point", default="llamacpp-q4_0", help="cross-check: the GGUF point")
    ap.add_argument("--text", default="licenses", help="cross-check: the text")
    ap.add_argument("--windows", type=int, default=4, help="cross-check: windows compared (default 4 of 16)")
    a = ap.parse_args(argv)
    try:
        if a.phase == "build-tools":
            build_tools(a.jobs, a.force, a.nice)
        elif a.phase == "texts":
            build_texts(a.work, force=a.force)
        elif a.phase == "baselines":
            fams = [f.strip() for f in a.only.split(",") if f.strip()]
            bad = [f for f in fams if f not in ("llamacpp", "ort", "gptq")]
            if bad:
                raise ConfigError(f"--only {bad[0]!r}: choose from llamacpp, ort, gptq")
            load_texts(a.work)  # a clear error before anything heavy
            sel = [x.strip() for x in a.points.split(",") if x.strip()] if a.points else None
            for f in fams:
                if f == "llamacpp":
                    run_llamacpp(a.work, a.out, a.force, a.threads, [t for t in LADDER if t in sel] if sel else LADDER)
                elif f == "ort":
                    run_ort(a.work, a.out, a.force, a.threads, [v for v in ORT_VARIANTS if v.name in sel] if sel
                            else None)
                else:
                    run_gptq(a.work, a.out, a.force, a.threads)
            print(table(load_results(a.out)))
        elif a.phase == "measure":
            given = [x for x in (a.gguf, a.onnx, a.gptq) if x]
            if len(given) != 1 or not a.name:
                raise ConfigError("measure needs --name and exactly one of --gguf FILE, --onnx DIR, --gptq DIR")
            if a.gguf:
                m = measure_gguf(a.gguf, work=a.work, threads=a.threads, tag=a.name)
            elif a.onnx:
                m = measure_onnx(a.onnx, a.work, a.threads)
            else:
                m = measure_gptq(a.gptq, a.work, a.threads)
            add_point(a.name, m, {"family": a.family, "note": a.note}, a.out, work=a.work)
            print(table({"points": {a.name: load_results(a.out)["points"][a.name]}}))
        elif a.phase == "cross-check":
            cross_check(a.work, a.out, a.point, a.text, a.threads, a.windows)
        elif a.phase == "plot":
            report = update_results(lambda r: None, a.out, work=a.work)
            _log(f"plot: {Path(a.out).with_suffix('.png')} ({len(report.get('points', {}))} points)")
        else:
            print(table(load_results(a.out)))
    except WinqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


__all__ = ["measure_gguf", "measure_onnx", "measure_gptq", "add_point", "build_tools", "build_texts", "load_texts",
           "parse_perplexity", "gguf_size", "score", "windows", "cross_check", "TEXTS", "LADDER"]

if __name__ == "__main__":
    sys.exit(main())
