"""Which activation quantizer a runtime applies in front of each layer: the plans `--act` installs on fake-quant.

    from winq.runtime.act import plan_for, emulate
    plan = plan_for(model, "llamacpp", artifact="runs/winq-gguf/model.gguf")   # read from winq-export.json
    plan = plan_for(model, "ort4")                                             # decided as the exporter would
    emulate(model, "llamacpp", gguf_path)                                      # install it (winq.actplan)

| --act     | runtime                                   | per quantized layer                                     |
|-----------|-------------------------------------------|---------------------------------------------------------|
| llamacpp  | llama.cpp CPU (ggml vec_dot_type)         | the GGUF tensor type's scheme: Q4_0/Q8_0 q8_0, Q4_1      |
|           |                                           | q8_1, K and TQ types q8_k; F16 embeddings / lm_head:    |
|           |                                           | fp16 weights and fp16 inputs to the head                |
| ort4      | onnxruntime MatMulNBits, accuracy_level 4 | ort_int8 at the node's block_size where ORT quantizes   |
|           |                                           | (winq.actquant.ort_activation_scheme), else float       |
| none      | -                                         | nothing                                                  |

With an artifact, the types come from its winq-export.json (GGUF: each tensor's type and the float tensors'
dtypes; ONNX: each layer's container bits and the export's block_size; ort4 always means accuracy level 4,
whatever the export's own level). Without one they are decided the way the exporter would decide them with its
default options (GGUF `--type auto --keep f16`: winq.formats.gguf.choose; ONNX block_size 32, containers of
winq.formats.onnx.container_for).

Not modelled: Q4_1 / Q5_1 weights use Q8_1 activations, whose dot product adds m_w * fp16(d * sum q) per
block where the dequantized values give m_w * fp16(d) * sum q (a rounding of the min term only); and the
runtimes' float32 summation order, which flips an occasional 8-bit activation code (README, docs/activations.md).
"""

from __future__ import annotations

from pathlib import Path

from winq.actplan import ActPlan, ActQuant, apply_plan, ggml_act_quants, llamacpp_quant
from winq.actquant import ort_activation_scheme
from winq.errors import ConfigError, FormatError

ACT_CHOICES = ("none", "llamacpp", "ort4")
GGUF_FLOAT_NAMES = {"token_embd.weight": "embed", "output.weight": "head"}


def _float_modules(model) -> dict[str, str]:
    """{"embed": input embedding module name, "head": output embedding module name} (where the model has them)."""
    out = {}
    for key, get in (("embed", "get_input_embeddings"), ("head", "get_output_embeddings")):
        fn = getattr(model, get, None)
        mod = fn() if callable(fn) else None
        if mod is not None:
            name = next((n for n, m in model.named_modules() if m is mod), None)
            if name is not None:
                out[key] = name
    return out


def _head_is_quantized(model) -> bool:
    from winq.qlinear import QuantLinear

    fn = getattr(model, "get_output_embeddings", None)
    return isinstance(fn() if callable(fn) else None, QuantLinear)


def _layers(model) -> dict:
    from winq.prepare import quant_layers

    layers = quant_layers(model)
    if not layers:
        raise ConfigError("--act needs a fake-quant model (a winq checkpoint): this model has no quantized layers")
    return layers


def _ggml_floats(model, embed_type: str, head_type: str | None) -> dict[str, str]:
    mods = _float_modules(model)
    floats = {}
    if "embed" in mods:
        floats[mods["embed"]] = embed_type
    if "head" in mods and not _head_is_quantized(model):
        floats[mods["head"]] = head_type or embed_type  # no `output` tensor: llama.cpp reuses token_embd
    return floats


def llamacpp_plan(model, artifact=None) -> ActPlan:
    """llama.cpp's activation quantizers for the fake-quant `model` (see the module docstring)."""
    layers = _layers(model)
    if artifact is not None:
        rec, where = _record(artifact, "gguf")
        types = {}
        for t in rec.get("tensors") or []:
            types[t["name"]] = str(t["container"]).split(":")[0].strip().upper()
        missing = [n for n in layers if n not in types]
        if missing:
            raise FormatError(f"{where} lists no GGUF type for {len(missing)} quantized layers of this model "
                              f"(first: {missing[0]}): was it exported from this checkpoint?")
        fl = {f["name"]: str(f["dtype"]).upper() for f in rec.get("float_tensors") or []}
        embed = fl.get("token_embd.weight", "F16")
        head = fl.get("output.weight")
        quant = ggml_act_quants({n: types[n] for n in layers})
        source = str(where)
    else:
        quant = llamacpp_quant(model)
        embed, head, source = "F16", None, "decided as `winq export --format gguf` would (--type auto, --keep f16)"
    return ActPlan(quant=quant, floats=_ggml_floats(model, embed, head), runtime="llama.cpp", source=source)


def ort_plan(model, artifact=None, accuracy_level: int = 4) -> ActPlan:
    """onnxruntime's MatMulNBits activation quantizers at `accuracy_level` for the fake-quant `model`."""
    layers = _layers(model)
    if artifact is not None:
        rec, where = _record(artifact, "onnx")
        info = rec.get("info") or {}
        block = int(info.get("block_size", 32))
        bits = {t["name"]: int(t["container_bits"]) for t in rec.get("tensors") or []}
        missing = [n for n in layers if n not in bits]
        if missing:
            raise FormatError(f"{where} lists no MatMulNBits layer for {len(missing)} quantized layers of this model "
                              f"(first: {missing[0]}): was it exported from this checkpoint?")
        source = f"{where}, block_size {block}, accuracy_level {accuracy_level}"
    else:
        from winq.formats import onnx as F

        block = 32
        bits = {n: F.container_for(m.spec.grid, m.spec.bits).bits for n, m in layers.items()}
        source = f"decided as `winq export --format onnx` would (block_size 32), accuracy_level {accuracy_level}"
    quant = {}
    for n in layers:
        scheme = ort_activation_scheme(bits[n], block, accuracy_level)
        quant[n] = ActQuant(scheme, block) if scheme == "ort_int8" else None
    return ActPlan(quant=quant, floats={}, runtime="onnxruntime", source=source)


def _record(artifact, fmt: str) -> tuple[dict, Path]:
    from winq.formats.manifest import read, record_path

    where = record_path(artifact)
    rec = read(where)
    if rec.get("format") != fmt:
        raise FormatError(f"{where} describes a {rec.get('format')!r} export, not {fmt}")
    return rec, where


def plan_for(model, act: str, artifact=None) -> ActPlan | None:
    """The plan of `act` (ACT_CHOICES) for `model`; None for "none"."""
    if act is None or act == "none":
        return None
    if act == "llamacpp":
        return llamacpp_plan(model, artifact)
    if act == "ort4":
        return ort_plan(model, artifact, accuracy_level=4)
    raise ConfigError(f"--act {act!r}: choose one of {', '.join(ACT_CHOICES)}")


def emulate(model, act: str, artifact=None) -> ActPlan | None:
    """Install plan_for(model, act, artifact) on `model` in place (for good: the model is the caller's copy)."""
    plan = plan_for(model, act, artifact)
    if plan is not None:
        apply_plan(model, plan)
    return plan


__all__ = ["ACT_CHOICES", "plan_for", "llamacpp_plan", "ort_plan", "emulate"]
