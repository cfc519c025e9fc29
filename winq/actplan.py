"""Install runtime activation quantizers (winq.actquant) on a model: per-layer plans for eval and training.

    from winq.actplan import ActQuant, ActPlan, apply_plan, set_act_quant
    set_act_quant(model, "q8_0")                    # every QuantLinear: q8_0 inputs (training: straight-through)
    plan = ActPlan({"model.layers.0.mlp.down_proj": ActQuant("q8_k"), ...}, floats={"lm_head": "F16"})
    with emulating(model, plan):                    # per-layer schemes + llama.cpp's float path, undone on exit
        logits = model(ids).logits

A QuantLinear's `act_quant` (an `ActQuant`) quantizes the layer's input in both forward paths
(winq/qlinear.py); while training with gradients it is the straight-through form. `ActPlan.floats`
covers the layers a runtime keeps in float but still rounds: llama.cpp stores embeddings and an
untied lm_head as F16 (or Q8_0 with `--keep q8_0`) and converts the activations of an F16 matmul
to fp16 (docs/activations.md), so an F16 output head means fp16-rounded weights *and* inputs.
Which scheme each layer gets is the runtime's decision from the export's tensor types: `ggml_act_quants`
turns GGUF types into llama.cpp's schemes; the eval plans are built in winq.runtime.act (from winq-export.json
or the exporters' own type choice).

`TrainConfig.act_quant` / `winq train --act-quant` use `parse_act_quant`: none | q8_0 | q8_k | ort_int8 (MatMulNBits
block 32, the ONNX exporter's default) | ort_int8:<block>, one scheme for every layer; or `llamacpp`, a per-layer
plan: each layer gets the scheme llama.cpp uses for the GGUF type `winq export --format gguf` picks for it by
default (`llamacpp_quant`: winq.formats.gguf.auto_types, the exporter's own type choice; e.g. 2-bit seq on the
default model: q8_0 for the 576-wide rows in Q4_0 containers, q8_k for down_proj in Q2_K). `train_act_plan` resolves
a setting to {layer: ActQuant | None}; training stores a per-layer plan in winq.json as {"plan": "llamacpp",
"layers": {layer: scheme}} (`plan_record`), so resuming and the exporters' check see the exact per-layer schemes it
trained with.
`act_mismatch` is the exporters' check of a runtime's per-layer schemes against that setting.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .actquant import ACT_QUANTIZERS, ORT_BLOCK_SIZES, fake_quantize_activation, ggml_activation_scheme, q8_0
from .errors import ConfigError

TRAIN_SCHEMES = ("none", "q8_0", "q8_k", "ort_int8")  # what `winq train --act-quant` accepts (ort_int8[:block])
PER_LAYER_PLANS = ("llamacpp",)  # `--act-quant` values that pick a scheme per layer (train_act_plan)
ORT_DEFAULT_BLOCK = 32  # the ONNX exporter's default MatMulNBits block_size
# ggml types a float tensor (embedding, untied lm_head) may be stored as, and the values a reader gets
FLOAT_TYPES = ("F32", "F16", "BF16", "Q8_0")
# activations whose dequantized values are identical (q8_1 adds only a per-block sum for the weights' min term)
_SAME_VALUES = {"q8_1": "q8_0"}


@dataclass(frozen=True)
class ActQuant:
    """One activation quantizer: a winq.actquant scheme and, for ort_int8, the MatMulNBits block_size."""

    scheme: str
    block_size: int | None = None

    def __post_init__(self):
        if self.scheme not in ACT_QUANTIZERS:
            raise ConfigError(f"unknown activation quantizer {self.scheme!r}: choose one of "
                              f"{', '.join(ACT_QUANTIZERS)}")
        if (self.scheme == "ort_int8") != (self.block_size is not None):
            raise ConfigError(f"{self.scheme}: block_size applies to ort_int8 only (and ort_int8 needs one)")
        if self.block_size is not None and self.block_size not in ORT_BLOCK_SIZES:
            raise ConfigError(f"ort_int8 block_size {self.block_size}: choose one of "
                              f"{', '.join(map(str, ORT_BLOCK_SIZES))}")

    def __call__(self, x: torch.Tensor, ste: bool = False) -> torch.Tensor:
        return fake_quantize_activation(x, self.scheme, block_size=self.block_size, ste=ste)

    def __str__(self) -> str:
        return self.scheme if self.block_size is None else f"{self.scheme}:{self.block_size}"

    def same_values(self, other: ActQuant | None) -> bool:
        """Do both quantize activations to the same values (q8_1 == q8_0: only its block sums differ)?"""
        if other is None:
            return False
        return (_SAME_VALUES.get(self.scheme, self.scheme), self.block_size) == (
            _SAME_VALUES.get(other.scheme, other.scheme), other.block_size)


def parse_act_quant(text: str | None) -> ActQuant | None:
    """`--act-quant` / TrainConfig.act_quant: none | q8_0 | q8_k | ort_int8 | ort_int8:<block> -> ActQuant or None."""
    if text is None or text == "none":
        return None
    name, _, block = str(text).partition(":")
    if name not in TRAIN_SCHEMES:
        raise ConfigError(f"act_quant={text!r}: choose one of {', '.join(TRAIN_SCHEMES)} (ort_int8:<block> for a "
                          f"MatMulNBits block other than {ORT_DEFAULT_BLOCK})")
    if name != "ort_int8":
        if block:
            raise ConfigError(f"act_quant={text!r}: only ort_int8 takes a block size ({name} has a fixed block)")
        return ActQuant(name)
    try:
        size = int(block) if block else ORT_DEFAULT_BLOCK
    except ValueError:
        raise ConfigError(f"act_quant={text!r}: the block after ':' must be an integer") from None
    return ActQuant("ort_int8", size)


def _is_record(value) -> bool:
    return isinstance(value, dict) and value.get("plan") in PER_LAYER_PLANS and isinstance(value.get("layers"), dict)


def check_act_quant(value) -> None:
    """Validate a TrainConfig.act_quant: a parse_act_quant string, a PER_LAYER_PLANS name, or a stored plan record
    ({"plan": "llamacpp", "layers": {layer: scheme}}, see plan_record). ConfigError otherwise."""
    if isinstance(value, str) and value in PER_LAYER_PLANS:
        return
    if isinstance(value, dict):
        if not _is_record(value):
            raise ConfigError(f"act_quant={value!r}: a per-layer plan is {{'plan': one of {PER_LAYER_PLANS}, "
                              "'layers': {layer: scheme}}")
        for v in value["layers"].values():
            parse_act_quant(v)
        return
    try:
        parse_act_quant(value)
    except ConfigError as e:
        raise ConfigError(f"{e} (or a per-layer plan: {', '.join(PER_LAYER_PLANS)})") from None


def train_act_plan(model: nn.Module, value) -> dict[str, ActQuant | None]:
    """{QuantLinear name: ActQuant | None} for a TrainConfig.act_quant: one scheme for all layers, `llamacpp`'s
    per-layer choice for this (prepared) model, or a stored plan record (every quantized layer must be listed)."""
    check_act_quant(value)
    layers = _quant_layers(model)
    if isinstance(value, dict):
        missing = [n for n in layers if n not in value["layers"]]
        if missing:
            raise ConfigError(f"act_quant plan lists no scheme for {len(missing)} quantized layers (first: "
                              f"{missing[0]})")
        return {n: parse_act_quant(value["layers"][n]) for n in layers}
    if isinstance(value, str) and value in PER_LAYER_PLANS:  # "llamacpp", the only one
        return llamacpp_quant(model)
    one = parse_act_quant(value)
    return dict.fromkeys(layers, one)


def ggml_act_quants(types: dict[str, str]) -> dict[str, ActQuant | None]:
    """{layer: ActQuant | None} from {layer: GGUF type}: the activation quantizer llama.cpp's CPU matmul applies in
    front of a weight of that type (winq.actquant.ggml_activation_scheme; None for F32)."""
    out = {}
    for name, t in types.items():
        scheme = ggml_activation_scheme(t)
        out[name] = ActQuant(scheme) if scheme is not None else None
    return out


def llamacpp_quant(model: nn.Module) -> dict[str, ActQuant | None]:
    """llama.cpp's input quantizer for every QuantLinear of a prepared `model`, for the GGUF type `winq export
    --format gguf` stores it in by default (--type auto). The type choice is the GGUF format's own
    (winq.formats.gguf.auto_types, which encodes each layer): the one place the core asks a format, inside this
    function, so `import winq` stays light and the plan never depends on what else was imported."""
    from .formats.gguf import auto_types

    layers = _quant_layers(model)
    if not layers:
        raise ConfigError("--act needs a fake-quant model (a winq checkpoint): this model has no quantized layers")
    return ggml_act_quants(auto_types({n: m.quantized_weight() for n, m in layers.items()}))


def plan_record(value, plan: dict) -> str | dict:
    """What training stores as act_quant: `value` itself for one scheme, {"plan": value, "layers": {layer: scheme
    or "none"}} for a PER_LAYER_PLANS name resolved to `plan` (train_act_plan)."""
    if isinstance(value, str) and value in PER_LAYER_PLANS:
        return {"plan": value, "layers": {n: str(a) if a is not None else "none" for n, a in plan.items()}}
    return value


def describe_act_quant(value) -> str:
    """A TrainConfig.act_quant for messages: "q8_0", "none", "llamacpp (q8_0 x180, q8_k x30)"."""
    if _is_record(value):
        counts: dict[str, int] = {}
        for v in value["layers"].values():
            k = str(parse_act_quant(v) or "none")
            counts[k] = counts.get(k, 0) + 1
        return f"{value['plan']} ({', '.join(f'{k} x{n}' for k, n in sorted(counts.items()))})"
    if isinstance(value, str) and value in PER_LAYER_PLANS:
        return value
    a = parse_act_quant(value)
    return str(a) if a is not None else "none"


def _quant_layers(model: nn.Module) -> dict:
    from .qlinear import QuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def set_act_quant(model: nn.Module, plan) -> dict[str, object]:
    """Set every QuantLinear's `act_quant`: `plan` is one scheme for all (an ActQuant, a parse_act_quant string, or
    None / "none" to turn it off) or {module name: ActQuant | None} (names not listed are turned off).
    Returns the previous settings ({name: act_quant}), which `set_act_quant(model, previous)` restores."""
    layers = _quant_layers(model)
    if not layers:
        raise ConfigError("model has no QuantLinear layers: activation quantizers go in front of quantized layers")
    if isinstance(plan, dict):
        unknown = sorted(set(plan) - set(layers))
        if unknown:
            raise ConfigError(f"activation plan names {len(unknown)} layers the model does not quantize "
                              f"(first: {unknown[0]})")
        per = {n: plan.get(n) for n in layers}
    else:
        one = parse_act_quant(plan) if plan is None or isinstance(plan, str) else plan
        per = dict.fromkeys(layers, one)
    before = {n: m.act_quant for n, m in layers.items()}
    for n, m in layers.items():
        m.act_quant = per[n]
    return before


def round_float_weight(w: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """The float32 values a ggml reader gets back from `w` stored as `ggml_type` (F32, F16, BF16, Q8_0; the Q8_0 of
    gguf-py's quantizer, i.e. ggml's reference quantize_row_q8_0, which the exporter's --keep q8_0 writes)."""
    t = ggml_type.upper()
    w32 = w.detach().to(torch.float32)
    if t == "F32":
        return w32
    if t == "F16":
        return w32.to(torch.float16).to(torch.float32)
    if t == "BF16":
        return w32.to(torch.bfloat16).to(torch.float32)
    if t == "Q8_0":
        return q8_0(w32, variant="ref")
    raise ConfigError(f"float tensor type {ggml_type!r}: choose one of {', '.join(FLOAT_TYPES)}")


@dataclass
class ActPlan:
    """What a runtime does to a model's activations (and to the float tensors around them).

    quant : {QuantLinear name: ActQuant or None}   the input quantizer in front of each quantized layer
    floats: {module name: ggml type}               nn.Linear / nn.Embedding modules kept in float by the export:
                                                   their weights are read back as that type (F16: fp16-rounded),
                                                   and a Linear's input gets ggml_activation_scheme(type)
    runtime, source: what the plan emulates and where it was read from (for messages and records)
    """

    quant: dict = field(default_factory=dict)
    floats: dict = field(default_factory=dict)
    runtime: str = ""
    source: str = ""

    def counts(self) -> dict[str, int]:
        """{scheme (or "none"): number of quantized layers}."""
        out: dict[str, int] = {}
        for a in self.quant.values():
            k = str(a) if a is not None else "none"
            out[k] = out.get(k, 0) + 1
        return out

    def describe(self) -> str:
        q = ", ".join(f"{k} x{n}" for k, n in sorted(self.counts().items()))
        f = ", ".join(f"{n} {t}" for n, t in self.floats.items())
        return f"{self.runtime} activations ({self.source}): {q}" + (f"; float layers: {f}" if f else "")


def _float_pre_hook(aq: ActQuant):
    def hook(module, args):
        return (aq(args[0], ste=module.training and torch.is_grad_enabled()), *args[1:])

    return hook


def apply_plan(model: nn.Module, plan: ActPlan):
    """Install `plan` on `model` in place; returns an undo function (restores weights, hooks and act_quant)."""
    before = set_act_quant(model, plan.quant)
    saved, hooks = [], []
    done = set()
    try:
        for name, t in plan.floats.items():
            mod = model.get_submodule(name)
            if not isinstance(mod, (nn.Linear, nn.Embedding)):
                raise ConfigError(f"{name} is a {type(mod).__name__}, not a float Linear or Embedding")
            p = mod.weight
            if id(p) not in done:  # tied embedding / lm_head: one tensor, one rounding
                done.add(id(p))
                saved.append((p, p.detach().clone()))
                with torch.no_grad():
                    p.copy_(round_float_weight(p, t).to(p.dtype))
            scheme = ggml_activation_scheme(t)
            if isinstance(mod, nn.Linear) and scheme is not None:
                hooks.append(mod.register_forward_pre_hook(_float_pre_hook(ActQuant(scheme))))
    except Exception:
        _undo(model, before, saved, hooks)
        raise

    def undo():
        _undo(model, before, saved, hooks)

    return undo


def _undo(model, before, saved, hooks):
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for p, v in saved:
            p.copy_(v)
    set_act_quant(model, before)


@contextmanager
def emulating(model: nn.Module, plan: ActPlan):
    """apply_plan for the duration of a `with` block."""
    undo = apply_plan(model, plan)
    try:
        yield model
    finally:
        undo()


def act_mismatch(trained, runtime: dict, runtime_name: str) -> tuple[dict, str | None]:
    """Compare what a checkpoint was trained with (TrainConfig.act_quant: one scheme, or a per-layer plan record)
    with a runtime's per-layer activation quantizers ({layer: ActQuant | None}). Returns (record for the export
    manifest, warning or None).

    Warns only when the checkpoint was trained with an activation quantizer (a model trained on float activations
    runs everywhere as it always did) and some layer's runtime quantizer gives different values. A per-layer plan is
    compared layer by layer; a layer the plan does not list counts as trained without one."""
    check_act_quant(trained)
    if _is_record(trained):
        want = {n: parse_act_quant(trained["layers"].get(n)) for n in runtime}
        quantized = any(a is not None for a in want.values())
    elif isinstance(trained, str) and trained in PER_LAYER_PLANS:  # a plan name without its layers: never stored
        raise ConfigError(f"act_quant={trained!r} is resolved per layer when training starts; a checkpoint stores "
                          "the resolved plan")
    else:
        one = parse_act_quant(trained)
        want = dict.fromkeys(runtime, one)
        quantized = one is not None
    runtime_counts: dict[str, int] = {}
    differ = []
    for name, a in runtime.items():
        k = str(a) if a is not None else "none"
        runtime_counts[k] = runtime_counts.get(k, 0) + 1
        w = want[name]
        same = a is None if w is None else w.same_values(a)
        if not same:
            differ.append(name)
    record = {"trained": describe_act_quant(trained if trained is not None else "none"), "runtime": runtime_name,
              "runtime_schemes": runtime_counts, "layers_differing": len(differ), "match": not differ}
    if not quantized or not differ:
        return record, None
    got = ", ".join(f"{k} on {n} layers" for k, n in sorted(runtime_counts.items()))
    first = differ[0]
    return record, (f"the checkpoint was trained with {record['trained']} activations (--act-quant), but "
                    f"{runtime_name} quantizes the inputs of {len(differ)} of {len(runtime)} quantized layers "
                    f"differently ({got}; first: {first}, trained {want[first] or 'none'}): its results will not "
                    "match training exactly")


__all__ = ["ActQuant", "ActPlan", "TRAIN_SCHEMES", "PER_LAYER_PLANS", "parse_act_quant", "check_act_quant",
           "train_act_plan", "llamacpp_quant", "ggml_act_quants", "plan_record", "describe_act_quant",
           "set_act_quant", "apply_plan", "emulating", "round_float_weight", "act_mismatch", "FLOAT_TYPES"]
