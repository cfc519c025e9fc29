"""Backends behind one interface: a registry of `Backend`s whose `load(path, options)` returns a
`Session`, one timing loop, one tokenizer lookup. `winq eval`, `winq bench` and `winq inspect`
iterate this registry; `NAMES` is the one list of backend names.

    from winq.runtime.backends import get_backend, LoadOptions, time_session
    s = get_backend("ort").load("runs/winq-onnx", LoadOptions(threads=2))
    s.logits(ids)                    # float32 (T, V) for int64 ids (T,), from an empty cache
    s.prefill(ids); s.step(token)    # float32 (V,) each: the next token's logits, with the KV cache
    time_session(s, prompt_ids, n_gen=32, repeats=3)   # prefill / decode tokens per second (medians)

| backend   | artifact option        | runs                                                  | float baseline (bench) |
|-----------|------------------------|-------------------------------------------------------|------------------------|
| fakequant | --checkpoint           | the checkpoint's fake-quant model (torch, reference)  | fp                     |
| packed    | --packed, --checkpoint | winq's packed runtime (packed.py)                     | fp                     |
| fp        | --model                | a float Hugging Face model (torch)                    | -                      |
| gptq      | --gptq                 | transformers + gptqmodel (gptq.py)                    | fp                     |
| llamacpp  | --gguf                 | llama-cpp-python (llamacpp.py)                        | llamacpp-f16: F16 GGUF |
| ort       | --onnx                 | onnxruntime (ort.py)                                  | ort-fp32: fp32 ONNX    |

The GGUF and ONNX float baselines are written by the export layer (`write_float`), which this
package may not import: `winq bench` passes that function in (see bench.py).
"""

from __future__ import annotations

import statistics
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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


@dataclass(frozen=True)
class Baseline:
    """The float model a backend is compared with in `winq bench`."""

    name: str  # its result name: fp | llamacpp-f16 | ort-fp32
    backend: str  # the backend that runs it
    format: str | None = None  # export format of the float copy written from the checkpoint (None: fp loads it)
    file: str | None = None  # name of that copy in the bench cache


@dataclass(frozen=True)
class Backend:
    name: str
    artifact: str  # the option that names its artifact: checkpoint | packed | model | gptq | gguf | onnx
    needs: str  # what that option must give, for messages
    load: Callable[..., Session]  # load(path, LoadOptions) -> Session
    format: str  # what the artifact is: checkpoint | model | gptq | gguf | onnx (winq inspect)
    kind: str = "folder"  # the artifact is a "file", a "folder" or "any"
    fallback: str | None = None  # option used when `artifact`'s is not given (packed: checkpoint)
    optional: bool = False  # no artifact is fine (fp: the built-in default model)
    baseline: Baseline | None = None
    extra: str | None = None  # the pip extra it needs


def _fakequant(path, opts: LoadOptions) -> Session:
    from winq.checkpoint import load_checkpoint

    model = load_checkpoint(path)[0]
    plan = None
    if opts.act not in (None, "none"):
        from .act import emulate

        plan = emulate(model, opts.act, opts.act_artifact)
    session = TorchSession(model)
    session.act_plan = plan  # the runtime activation emulation installed (winq.actplan.ActPlan), or None
    return session


def _packed(path, opts: LoadOptions) -> Session:
    from .packed import load_packed

    return TorchSession(load_packed(path))


def _fp(path, opts: LoadOptions) -> Session:
    """A float model: a checkpoint's fake-quant weights dequantized into plain nn.Linear, or a base model."""
    from winq.checkpoint import is_checkpoint, load_checkpoint
    from winq.models import load_base_model
    from winq.prepare import convert

    if path is not None and is_checkpoint(path):
        return TorchSession(convert(load_checkpoint(path)[0]))
    return TorchSession(load_base_model(None if path is None else str(path))[0])


def _gptq(path, opts: LoadOptions) -> Session:
    from .gptq import load_gptq

    return TorchSession(load_gptq(path))


def _llamacpp(path, opts: LoadOptions) -> Session:
    from .llamacpp import LlamaCppSession

    return LlamaCppSession(path, opts)


def _ort(path, opts: LoadOptions) -> Session:
    from .ort import OrtSession

    return OrtSession(path, opts)


FP = Baseline("fp", "fp")
_REGISTRY = [
    Backend("fakequant", "checkpoint", "--checkpoint DIR (a folder written by `winq train`)", _fakequant, "checkpoint",
            baseline=FP),
    Backend("packed", "packed", "--packed PATH (a winq checkpoint or GPTQ export) or --checkpoint DIR", _packed,
            "checkpoint|gptq", fallback="checkpoint", baseline=FP),
    Backend("fp", "model", "--model FOLDER (a Hugging Face model; default: the built-in model)", _fp, "model",
            optional=True),
    Backend("gptq", "gptq", "--gptq FOLDER (a folder written by `winq export --format gptq`)", _gptq, "gptq",
            baseline=FP, extra="gptq"),
    Backend("llamacpp", "gguf", "--gguf FILE (a file written by `winq export --format gguf`)", _llamacpp, "gguf",
            kind="file", baseline=Baseline("llamacpp-f16", "llamacpp", "gguf", "model-f16.gguf"), extra="llamacpp"),
    Backend("ort", "onnx", "--onnx FOLDER (a folder written by `winq export --format onnx`)", _ort, "onnx",
            kind="any", baseline=Baseline("ort-fp32", "ort", "onnx", "onnx-fp32"), extra="onnx"),
]
BACKENDS: dict[str, Backend] = {b.name: b for b in _REGISTRY}
NAMES = tuple(BACKENDS)  # what --backend accepts, in this order


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}: choose from {', '.join(NAMES)}")
    return BACKENDS[name]


def parse_names(text) -> tuple[str, ...]:
    """Backend names from "a,b" (or a sequence), each known and listed once; ConfigError otherwise."""
    names = tuple(b.strip() for b in (text.split(",") if isinstance(text, str) else text) if b.strip())
    bad = [b for b in names if b not in BACKENDS]
    if bad or not names:
        raise ConfigError(f"unknown backend {bad[0] if bad else ''!r}: choose from {', '.join(NAMES)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"backend listed twice in {','.join(names)}")
    return names


def artifact_of(backend: Backend, given: dict) -> tuple[Path | None, str]:
    """(path, option it came from) of a backend's artifact from the options `given` ({option: path or None});
    ConfigError "backend X needs ..." when it has none."""
    for opt in (backend.artifact, backend.fallback):
        if opt is not None and given.get(opt) is not None:
            return Path(given[opt]), opt
    if backend.optional:
        return None, backend.artifact
    raise ConfigError(f"backend {backend.name} needs {backend.needs}")


def resolve_artifact(backend: Backend, given: dict) -> Path:
    """artifact_of, a model spec resolved to its folder (the built-in default model when none is given, as for
    `fp` without --model; aliases such as "smollm2")."""
    path, opt = artifact_of(backend, given)
    if opt == "model":
        from winq.models import resolve_model

        path = resolve_model(given.get("model"))
    return path


def backends_for(fmt: str) -> list[str]:
    """Names of the backends that run an artifact of format `fmt` (winq inspect)."""
    return [b.name for b in BACKENDS.values() if fmt in b.format.split("|")]


# ---------------------------------------------------------------------------------------------
# one timing loop, greedy generation, the tokenizer of a set of artifacts


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


def tokenizer_for(paths):
    """The tokenizer of the model behind `paths` (checkpoints, export folders or files, model folders, in order
    of preference): the first folder with tokenizer files, trying each export's source checkpoint too."""
    from transformers import AutoTokenizer

    from winq.formats.manifest import source_checkpoint

    cands = []
    for p in paths:
        if p is None:
            continue
        p = Path(p)
        cands.append(p if p.is_dir() else p.parent)
        src = source_checkpoint(p)
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
