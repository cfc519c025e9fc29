"""What every backend returns, and what runs on it: the `Session` interface, its `LoadOptions`, the torch
session, the one timing loop and greedy generation. The backends (llamacpp.py, ort.py, and the torch
loaders in backends.py) import this module; backends.py holds the registry and re-exports these names.

    from winq.runtime.session import LoadOptions, Session, time_session, generate
    s.logits(ids)                    # float32 (T, V) for int64 ids (T,), from an empty cache
    s.prefill(ids); s.step(token)    # float32 (V,) each: the next token's logits, with the KV cache
    time_session(s, prompt_ids, n_gen=32, repeats=3)   # prefill / decode tokens per second (medians)
"""

from __future__ import annotations

import statistics
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from winq.errors import ConfigError


class Session(ABC):
    """A loaded artifact that computes next-token logits (batch 1)."""

    @abstractmethod
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 (T, V): every position's logits for int64 ids (T,), from an empty cache."""

    @abstractmethod
    def prefill(self, ids: list[int]):
        """float32 (V,) (a tensor or an array): the last position's logits; starts a fresh KV cache."""

    @abstractmethod
    def step(self, token: int):
        """float32 (V,): the logits after one more token, through the KV cache."""


class TorchSession(Session):
    """A Hugging Face causal LM (fake-quant, packed, gptq or float) on CPU or `device`."""

    def __init__(self, model, device="cpu"):
        import inspect

        self.model = model.eval()
        self.device = device
        self.past = None
        # only the last position's logits where the model allows it, as a generation loop would
        self._keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids.reshape(1, -1).to(self.device)).logits[0].float().cpu()

    @torch.inference_mode()
    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids.to(self.device), past_key_values=self.past, use_cache=True, **self._keep)
        self.past = out.past_key_values
        return out.logits[0, -1]

    def prefill(self, ids):
        self.past = None
        return self._run(torch.as_tensor(ids, dtype=torch.long).reshape(1, -1))  # (1, T)

    def step(self, token: int):
        return self._run(torch.tensor([[int(token)]]))  # (1, 1)


@dataclass(frozen=True)
class LoadOptions:
    threads: int | None = None  # CPU threads (None: the library's default)
    context: int = 2048  # the longest sequence the session will see (tokens)
    purpose: str = "eval"  # eval: exact settings (llama.cpp's F32 KV cache); bench: as deployed (its F16 cache)
    accuracy_level: int | None = None  # ort: override MatMulNBits' accuracy_level (0 exact, 4 int8 activations)
    act: str | None = None  # fakequant: emulate a runtime's activation quantizers (runtime/act.py): llamacpp | ort4
    act_artifact: Path | str | None = None  # the export whose winq-export.json gives act's per-layer types (or None)



# ---------------------------------------------------------------------------------------------
# one timing loop, greedy generation


def _argmax(logits) -> int:
    return int(logits.argmax())


def percentile(xs, q: float) -> float:
    """The q-th percentile (0..100) of xs, linear between the closest ranks (numpy's default method)."""
    xs = sorted(xs)
    if not xs:
        raise ValueError("percentile of no values")
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def latency_ms(step_s) -> dict:
    """Per-token decode latency in ms over every timed step: p50, p90, p99, mean, min, max and the count."""
    ms = [1000.0 * x for x in step_s]
    return {"p50": percentile(ms, 50), "p90": percentile(ms, 90), "p99": percentile(ms, 99),
            "mean": statistics.fmean(ms), "min": min(ms), "max": max(ms), "n": len(ms)}


def time_session(session: Session, prompt_ids, n_gen: int, repeats: int = 3, prefill_lengths=None,
                 warmup_gen: int | None = None) -> dict:
    """Prefill and greedy-decode speed of a session: a warm-up run (allocator, thread pools, lazy kernels),
    then `repeats` timed runs; rates are medians over the runs. Prefill = one call over the prompt from an
    empty cache, including the argmax of its last logits; decode = n_gen steps of one token each, feeding back
    the argmax, each step timed on its own (per-token latency percentiles over all timed steps).

    prefill_lengths: prompt lengths to time prefill at (each a prefix of prompt_ids; default: all of it); the
    decode follows the prefill of the first one, and the warm-up run prefills only that one.
    warmup_gen: decode steps of the warm-up run (default n_gen).

    Returns prefill_tok_s, decode_tok_s, prefill_s, decode_s (medians, for the first length), prefill
    {length: {tok_s, s}}, decode_ms (latency percentiles), n_prompt, n_gen and the generated ids of the last
    run."""
    prompt = [int(t) for t in (prompt_ids.tolist() if hasattr(prompt_ids, "tolist") else prompt_ids)]
    if not prompt:
        raise ConfigError("bench needs at least one prompt token")
    lengths = list(dict.fromkeys(int(n) for n in (prefill_lengths or [len(prompt)])))
    if any(n < 1 or n > len(prompt) for n in lengths):
        raise ConfigError(f"prefill lengths {lengths} must lie in 1..{len(prompt)} (the prompt's tokens)")
    main = lengths[0]
    pre = {n: [] for n in lengths}
    dec, steps, generated = [], [], []
    for r in range(repeats + 1):
        for n in lengths[1:] if r else ():  # the other lengths first, so the decode follows the main prefill
            t0 = time.perf_counter()
            _argmax(session.prefill(prompt[:n]))
            if r:
                pre[n].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        nxt = _argmax(session.prefill(prompt[:main]))
        t1 = time.perf_counter()
        toks, ts = [], []
        for _ in range(n_gen if r else (n_gen if warmup_gen is None else min(warmup_gen, n_gen))):
            a = time.perf_counter()
            nxt = _argmax(session.step(nxt))
            ts.append(time.perf_counter() - a)
            toks.append(nxt)
        t2 = time.perf_counter()
        if r:
            pre[main].append(t1 - t0)
            dec.append(t2 - t1)
            steps.extend(ts)
            generated = toks
    prefill = {n: {"tok_s": n / statistics.median(v), "s": statistics.median(v)} for n, v in pre.items()}
    p, d = prefill[main]["s"], statistics.median(dec)
    return {"prefill_tok_s": main / p, "decode_tok_s": n_gen / d if n_gen else None, "prefill_s": p,
            "decode_s": d, "prefill": prefill, "decode_ms": latency_ms(steps) if steps else None,
            "n_prompt": main, "n_gen": n_gen, "repeats": repeats, "generated": generated}


def generate(session: Session, prompt_ids, n_new: int, eos_token_id: int | None = None) -> list[int]:
    """Greedy continuation: up to n_new new ids after the prompt (stops after eos_token_id)."""
    prompt = [int(t) for t in (prompt_ids.tolist() if hasattr(prompt_ids, "tolist") else prompt_ids)]
    if not prompt:
        raise ConfigError("generate needs at least one prompt token")
    nxt = _argmax(session.prefill(prompt))
    out = []
    for i in range(n_new):
        out.append(nxt)
        if nxt == eos_token_id or i == n_new - 1:
            break
        nxt = _argmax(session.step(nxt))
    return out
