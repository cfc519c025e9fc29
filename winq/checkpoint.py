"""Checkpoints: a Hugging Face model folder + winq.json + trainer_state/ (ARCHITECTURE §6).

    out/
      config.json, generation_config.json, tokenizer files
      model.safetensors      latent weights, learned scales (`*.alpha`) and affine zeros (`*.zero_point`)
      winq.json              format, QuantConfig, TrainConfig, quantized module names, step, git commit
      trainer_state/
        optimizer.safetensors  AdamW moments and step per parameter (keyed by parameter name)
        rng.safetensors        CPU / CUDA generator states (the noise stream's draw counter is in state.json)
        diagnostics.safetensors  the code-flip tracker's reference codes and weights (winq.diagnostics)
        best.safetensors   keep_best: the best evaluated state so far, when it is not the saved one
        state.json             step, scheduler position, data position, metrics so far

Safetensors and JSON only: nothing is unpickled when a checkpoint is read. A checkpoint is
written into a temporary sibling folder and renamed into place when complete, so a killed
run leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import torch

from .config import QuantConfig, TrainConfig
from .errors import CheckpointError
from .prepare import prepare, quant_layers

FORMAT = "winq-checkpoint"
FORMAT_VERSION = 1
CARRIED = ("metrics.jsonl",)  # written live by the trainer, kept across saves


def git_commit() -> str | None:
    try:
        r = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _state_dict_for_save(model) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    out = {}
    seen = {}
    for k, v in sd.items():
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if ptr in seen:  # tied weights (lm_head = embed_tokens): stored once
            continue
        seen[ptr] = k
        out[k] = v.detach().to("cpu").contiguous()
    return out


def is_checkpoint(path) -> bool:
    return (Path(path) / "winq.json").is_file()


def save_checkpoint(
    out,
    model,
    tokenizer,
    qcfg: QuantConfig,
    tcfg: TrainConfig | None,
    meta: dict | None = None,
    trainer_state: dict | None = None,
    state_dict: dict | None = None,
) -> Path:
    """Write a checkpoint folder atomically.

    trainer_state: {"optimizer": {name: tensor}, "rng": {...}, "diagnostics": {...}, "json": {...}}."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} is a file, not a folder; choose another output path")
    if out.exists() and not is_checkpoint(out) and any(p.name not in CARRIED for p in out.iterdir()):
        raise CheckpointError(f"{out} exists and is not a winq checkpoint; refusing to overwrite it")
    from .fsutil import swap_into_place, temp_dir

    with temp_dir(out) as tmp:  # removed whatever happens: a failed save leaves the previous checkpoint, no debris
        sd = state_dict if state_dict is not None else _state_dict_for_save(model)
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt", "winq": FORMAT})
        model.config.save_pretrained(str(tmp))
        if getattr(model, "generation_config", None) is not None:
            try:
                model.generation_config.save_pretrained(str(tmp))
            except Exception:  # noqa: BLE001 - generation config is optional metadata; an odd one is not worth failing
                pass
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        info = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "quant": qcfg.to_dict(),
            "train": tcfg.to_dict() if tcfg is not None else None,
            "quantized_modules": list(quant_layers(model).keys()),
            "git_commit": git_commit(),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **(meta or {}),
        }
        (tmp / "winq.json").write_text(json.dumps(info, indent=2) + "\n")
        if trainer_state is not None:
            ts = tmp / "trainer_state"
            ts.mkdir()
            save_file(trainer_state["optimizer"], str(ts / "optimizer.safetensors"))
            save_file(trainer_state["rng"], str(ts / "rng.safetensors"))
            if trainer_state.get("diagnostics"):
                save_file(trainer_state["diagnostics"], str(ts / "diagnostics.safetensors"))
            if trainer_state.get("best"):  # keep_best: the best evaluated state so far, when it is not this one
                save_file(trainer_state["best"], str(ts / "best.safetensors"))
            (ts / "state.json").write_text(json.dumps(trainer_state["json"], indent=2) + "\n")
        # files that live beside the checkpoint (the live metrics log) are carried over
        for name in CARRIED:
            if (out / name).is_file():
                shutil.copy2(out / name, tmp / name)
        if out.exists() and not is_checkpoint(out) and any(p.name not in CARRIED for p in out.iterdir()):
            raise CheckpointError(f"{out} exists and is not a winq checkpoint; refusing to overwrite it")
        # swap into place: the old folder (if any) is moved aside first, then removed
        return swap_into_place(tmp, out)


def read_info(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found")
    f = path / "winq.json"
    if not f.is_file():
        raise CheckpointError(
            f"{path} is not a winq checkpoint (no winq.json); make one with `winq train --out {path}`"
        )
    from .fsutil import read_json

    info = read_json(f, CheckpointError)
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{f}: format {info.get('format')!r} is not {FORMAT!r}")
    if not isinstance(info.get("version"), int):
        raise CheckpointError(f"{f}: 'version' must be an integer, got {info.get('version')!r}")
    if info["version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{f}: checkpoint version {info['version']} is newer than this winq ({FORMAT_VERSION}); upgrade winq"
        )
    if not isinstance(info.get("quant"), dict):
        raise CheckpointError(f"{f}: 'quant' must be an object with the QuantConfig (bits, grid, group_size, ...)")
    try:
        QuantConfig.from_dict(info["quant"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{f}: invalid 'quant' settings ({e})") from None
    return info


def load_checkpoint(path, device="cpu"):
    """(model, tokenizer, info): the fake-quant model with its trained weights and scales."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    info = read_info(path)
    qcfg = QuantConfig.from_dict(info["quant"])
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}/config.json: cannot be read ({e})") from None
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    prepare(model, qcfg, init=False)
    wfile = path / "model.safetensors"
    if not wfile.is_file():
        raise CheckpointError(f"{path}: model.safetensors is missing")
    try:
        sd = load_file(str(wfile), device=str(device) if str(device) != "cpu" else "cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{wfile}: corrupt or truncated safetensors file ({e})") from None
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # a quantized lm_head has its own weight (prepare() unties it): never re-tie it to the embedding
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) and not qcfg.quantize_lm_head else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise CheckpointError(
            f"{wfile} does not match its config and winq.json: "
            f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}"
        )
    if tied:
        model.tie_weights()
    for n, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise CheckpointError(f"{wfile}: parameter {n} contains NaN or Inf")
    model.to(device)
    model.eval()
    tok = None
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: tokenizer files missing or unreadable ({type(e).__name__}: {e})") from None
    return model, tok, info


def load_trainer_state(path) -> dict | None:
    """The trainer_state of a checkpoint, or None when it has none."""
    from safetensors.torch import load_file

    ts = Path(path) / "trainer_state"
    if not (ts / "state.json").is_file():
        return None
    try:
        return {
            "optimizer": load_file(str(ts / "optimizer.safetensors")),
            "rng": load_file(str(ts / "rng.safetensors")),
            "diagnostics": load_file(str(ts / "diagnostics.safetensors"))
            if (ts / "diagnostics.safetensors").is_file()
            else {},
            "json": json.loads((ts / "state.json").read_text()),
            "best": load_file(str(ts / "best.safetensors")) if (ts / "best.safetensors").is_file() else {},
        }
    except Exception as e:
        raise CheckpointError(f"{ts}: corrupt trainer state ({type(e).__name__}: {e})") from None
