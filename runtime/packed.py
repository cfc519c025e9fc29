"""The runtime's packed model: PackedLinear layers holding GPTQ-packed codes, run by the
unpack-GEMM kernels (Triton on CUDA, the torch reference elsewhere).

    from winq.runtime.packed import load_packed
    model = load_packed("runs/winq")          # a winq checkpoint ...
    model = load_packed("runs/winq-gptq")     # ... or a GPTQ export folder (winq's layout)

PackedLinear buffers (the GPTQ layout, ARCHITECTURE §7):
    qweight  int32   (K_pad * bits / 32, N)  codes packed along the input dim (winq.packing)
    scales   float16 (G, N)                  deployment scale per group
    zeros    float32 (G, N)                  zero points, unpacked (v1's z - 1 already undone)
    bias     float32 (N,) or None
forward(x) = unpack_gemm(x.reshape(-1, K), ...) + bias. In float32 on CPU the reference
dequantizes to exactly float32(scale) * (q - z), the trained fake-quant weight, so the
packed model's logits equal the fake-quant model's up to matmul summation order.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from winq.errors import ModelError
from winq.packing import pack, pad_to_period
from winq.qweight import QuantizedWeight


class PackedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, qweight, scales, zeros,
                 bias=None):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        G = in_features // group_size
        if tuple(scales.shape) != (G, out_features) or tuple(zeros.shape) != (G, out_features):
            raise ModelError(f"PackedLinear: scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)} must be ({G}, "
                             f"{out_features})")
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.to(torch.float16).contiguous())
        self.register_buffer("zeros", zeros.to(torch.float32).contiguous())
        self.register_buffer("bias", bias.to(torch.float32).contiguous() if bias is not None else None)

    @classmethod
    def from_quantized_weight(cls, qw: QuantizedWeight, bias=None) -> "PackedLinear":
        if not qw.spec.uniform:  # nl4: levels from IQ4_NL's table, not scale * (q - z)
            raise ModelError(f"the packed runtime multiplies scale * (q - zero) and cannot run grid {qw.grid!r} "
                             "(IQ4_NL's non-uniform levels): use --backend fakequant, or export --format gguf and "
                             "run --backend llamacpp")
        out, inf = qw.shape
        codes = pad_to_period(qw.codes.T.contiguous(), qw.bits, dim=0)  # (K_pad, N)
        return cls(inf, out, qw.bits, qw.group_size, pack(codes, qw.bits, dim=0), qw.scale.T, qw.zero.T, bias)

    def dequantize(self) -> torch.Tensor:
        """float32 (out, in): the weight this layer multiplies by."""
        from winq.runtime.kernels.unpack_gemm_reference import dequantize_packed

        return dequantize_packed(self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from winq.runtime.kernels import unpack_gemm

        shape = x.shape
        y = unpack_gemm(x.reshape(-1, self.in_features), self.qweight, self.scales, self.zeros, self.bits,
                        self.group_size)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}")


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def pack_model(model: nn.Module) -> nn.Module:
    """Replace every winq QuantLinear of a fake-quant model by a PackedLinear (in place)."""
    from winq.prepare import quant_layers

    layers = quant_layers(model)
    if not layers:
        raise ModelError("model has no quantized layers to pack")
    for name, m in layers.items():
        _swap(model, name, PackedLinear.from_quantized_weight(m.quantized_weight(),
                                                              m.bias.detach() if m.bias is not None else None))
    return model


def _load_gptq_folder(folder: Path) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    from winq.formats.gptq import group_size_of, read_folder, zeros_of

    read = read_folder(folder)
    if read.config.get("desc_act"):
        raise ModelError(f"{folder}: act-order GPTQ (desc_act true) is not supported by the packed runtime")
    config = AutoConfig.from_pretrained(str(folder))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    sd = dict(read.others)
    for p, t in read.layers.items():
        lin = model.get_submodule(p)
        K, N = lin.in_features, lin.out_features
        g = group_size_of(t, K, p)
        bits = read.layer_bits[p] if read.layer_bits else read.bits  # 4-bit containers of `dynamic` layers
        zeros = zeros_of(t, bits, read.checkpoint_format)[:, :N].to(torch.float32)  # (G, N)
        bias = sd.pop(f"{p}.bias", None)
        _swap(model, p, PackedLinear(K, N, bits, g, t["qweight"], t["scales"], zeros,
                                     bias.float() if bias is not None else None))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if not k.endswith(("qweight", "scales", "zeros", "bias")) and k != "lm_head.weight"]
    if missing or unexpected:
        raise ModelError(f"{folder}: weights do not match config.json (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in sd:
        model.tie_weights()
    return model.eval()


def load_packed(path) -> nn.Module:
    """A packed model from a winq checkpoint (packed from its QuantizedWeights) or a GPTQ export folder."""
    from winq.checkpoint import is_checkpoint, load_checkpoint

    path = Path(path)
    if is_checkpoint(path):
        model, _, _ = load_checkpoint(path)
        return pack_model(model).eval()
    if (path / "config.json").is_file():
        return _load_gptq_folder(path)
    raise ModelError(f"{path}: neither a winq checkpoint (winq.json) nor a GPTQ export folder (config.json with "
                     "quantization_config)")
