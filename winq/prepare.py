"""prepare / quantized_weights / convert: the module-swap API (after torchao's QAT flow).

    model = AutoModelForCausalLM.from_pretrained(...)
    prepare(model, QuantConfig(bits=2))          # decoder nn.Linear -> QuantLinear, scales initialised
    ... train ...
    qws = quantized_weights(model)               # {module name: QuantizedWeight}
    convert(model)                               # QuantLinear -> nn.Linear holding the fake-quant weight

Which layers: every nn.Linear of the model except the output embedding (lm_head), unless
QuantConfig.quantize_lm_head. Embeddings and norms are not Linear and stay as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import QuantConfig
from .errors import ConfigError, ModelError
from .grids import check_group
from .qlinear import QuantLinear
from .qweight import QuantizedWeight
from .recipes import layer_plan


def _output_embedding_names(model: nn.Module) -> set[str]:
    names = set()
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    if out is not None:
        names |= {n for n, m in model.named_modules() if m is out}
    return names


def target_linears(model: nn.Module, cfg: QuantConfig) -> list[str]:
    """Names of the nn.Linear modules prepare() would quantize."""
    skip_out = set() if cfg.quantize_lm_head else _output_embedding_names(model)
    names = []
    for name, m in model.named_modules():
        if type(m) is nn.Linear and name not in skip_out and not any(s in name for s in cfg.skip):
            names.append(name)
    return names


def prepare(model: nn.Module, cfg: QuantConfig, init: bool = True) -> nn.Module:
    """Swap the decoder's nn.Linear layers for QuantLinear in place and return the model.

    init=False leaves alpha at 1 (use when a checkpoint's state dict is loaded next).
    """
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ModelError("model is already prepared (it contains QuantLinear layers)")
    names = target_linears(model, cfg)
    if not names:
        kinds = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "weight")})[:8]
        raise ModelError(
            "found no torch.nn.Linear layers to quantize; winq supports models built from nn.Linear "
            f"(Llama, Qwen2, Mistral, ...). This model's weight-bearing modules: {', '.join(kinds)}"
        )
    widths = {n: model.get_submodule(n).in_features for n in names}
    plan = layer_plan(cfg, widths)  # per layer: the config's grid, a recipe's mix, a K grid's fallback
    for n in names:  # nl4 takes groups of 32 only: refuse before swapping anything
        check_group(plan[n].grid, plan[n].group_size, widths[n])
    bad = [(n, k) for n, k in widths.items() if plan[n].group_size != -1 and k % plan[n].group_size]
    if bad:
        n, k = bad[0]
        raise ConfigError(
            f"group_size={plan[n].group_size} does not divide in_features={k} of {n} "
            f"({len(bad)} layers affected); use -1 (per row) or a divisor of every in_features"
        )
    for name in names:  # validate everything before swapping anything: a failure leaves the model as it was
        w = model.get_submodule(name).weight
        if not torch.isfinite(w).all():
            raise ModelError(f"{name}.weight contains NaN or Inf; cannot quantize this model")
    tables = embedding_tables(model, cfg)
    if cfg.embed == "q8_0":
        for n, p in tables.items():
            if p.shape[-1] % Q8_0_BLOCK:
                raise ConfigError(f"embed='q8_0' stores rows in blocks of {Q8_0_BLOCK}, but {n} has rows of "
                                  f"{p.shape[-1]}: use embed='float'")
    for name in names:
        lin = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lq = plan[name]
        setattr(parent, child, QuantLinear.from_linear(lin, lq.grid, lq.bits, lq.group_size, init=init))
    if cfg.embed == "q8_0":
        for p in tables.values():
            if init:
                with torch.no_grad():
                    p.copy_(snap_q8_0(p.detach()))
            p.requires_grad_(False)
    model.winq_quant_config = cfg
    return model


Q8_0_BLOCK = 32


def snap_q8_0(t: torch.Tensor) -> torch.Tensor:
    """t (..., n) on Q8_0's lattice: per 32 values d = max|x| / 127, x -> float32(fp16(d)) * round(x / d).
    Idempotent under llama.cpp's / gguf-py's Q8_0 quantizer (the block's largest value is fp16(d) * 127, so
    they find the same d and the same integers): a snapped table is stored as Q8_0 exactly."""
    x = t.detach().float().reshape(*t.shape[:-1], t.shape[-1] // Q8_0_BLOCK, Q8_0_BLOCK)  # (..., n / 32, 32)
    d = x.abs().amax(-1, keepdim=True) / 127.0
    q = torch.round(x / torch.where(d > 0, d, torch.ones_like(d)))
    return (d.to(torch.float16).to(torch.float32) * q).reshape(t.shape).to(t.dtype)


def embedding_tables(model: nn.Module, cfg: QuantConfig) -> dict:
    """{name: parameter} of the float tables embed= governs: the input embeddings and an output embedding
    that stays float (tied: one parameter)."""
    out = {}
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        out[next(n for n, p in model.named_parameters(remove_duplicate=False) if p is emb.weight)] = emb.weight
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and not cfg.quantize_lm_head and not any(p is head.weight for p in out.values()):
        out[next(n for n, p in model.named_parameters() if p is head.weight)] = head.weight
    return out


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def quantized_weights(model: nn.Module) -> dict[str, QuantizedWeight]:
    """{module name: QuantizedWeight} for every quantized layer, in module order."""
    layers = quant_layers(model)
    if not layers:
        raise ModelError("model has no quantized layers: call winq.prepare(model, QuantConfig(...)) first")
    return {n: m.quantized_weight() for n, m in layers.items()}


def convert(model: nn.Module) -> nn.Module:
    """Replace every QuantLinear by an nn.Linear holding its fake-quant weight (in place)."""
    for name, m in list(quant_layers(model).items()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, m.to_linear())
    return model
