"""Backends behind one interface: a registry of `Backend`s whose `load(path, options)` returns a
`Session` (session.py: the interface, `LoadOptions`, the one timing loop, re-exported here), one
tokenizer lookup. `winq eval`, `winq bench` and `winq inspect` iterate this registry; `NAMES` is
the one list of backend names.

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

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from winq.errors import ConfigError

from .session import (LoadOptions, Session, TorchSession, generate, latency_ms, percentile,  # noqa: F401 (re-exported)
                      time_session)


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


def float_model_for(given: dict) -> Path | None:
    """The float model behind the artifacts of `winq eval` (what "KL to the float model" compares with): --model,
    else the base model that --checkpoint (or an export's source checkpoint) records, else the built-in default
    when nothing names a checkpoint; None when a checkpoint records no base model (saved outside `winq train`)."""
    from winq.checkpoint import read_info
    from winq.formats.manifest import source_checkpoint
    from winq.models import resolve_model

    if given.get("model"):
        return resolve_model(given["model"])
    cks = [given.get("checkpoint")] + [source_checkpoint(given[k]) for k in ("gguf", "onnx", "gptq", "packed")
                                       if given.get(k)]
    known = [ck for ck in cks if ck is not None and (Path(ck) / "winq.json").is_file()]
    for ck in known:
        base = read_info(ck).get("base_model")
        if base:
            return resolve_model(base)
    return None if known or any(given.get(k) for k in ("gguf", "onnx", "gptq", "packed")) else resolve_model(None)


def backends_for(fmt: str) -> list[str]:
    """Names of the backends that run an artifact of format `fmt` (winq inspect)."""
    return [b.name for b in BACKENDS.values() if fmt in b.format.split("|")]


# ---------------------------------------------------------------------------------------------
# the tokenizer of a set of artifacts


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
