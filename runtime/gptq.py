"""Backend `gptq`: a GPTQ folder (winq's or anyone's) run by transformers + optimum + gptqmodel.

    from winq.runtime.gptq import load_gptq
    model = load_gptq("runs/winq-gptq")           # an HF causal LM, float32 on CPU by default
    logits = model(input_ids=ids).logits

The folder is loaded with `AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
quantization_config=GPTQConfig(bits=b, backend="torch"))`: gptqmodel's torch kernel, the one
that runs on CPU in float32 and accepts every bit width and group size winq writes (its other
CPU kernels cast to bfloat16 and reject per-row groups).

Two things make the result exact (`exact=True`, the default), both measured on gptqmodel 7.6:
- its TorchLinear keeps `scales` (and biases) in float16 and dequantizes in float16, which
  rounds s * (q - z); the scales are upcast to float32 after loading (lossless: every float16
  is a float32), so the dequantized weight is float32(s) * (q - z), exactly winq's.
- it wraps `dequantize_weight` in torch.compile (5-55 s on the first forward on CPU); the
  compiled wrapper is dropped so the eager method runs (set compile=True to keep it).

Needs the extra: `pip install "winq[gptq]"` (optimum 2.3.0 + gptqmodel 7.6.0; gptqmodel 7.7
requires torch >= 2.14.1 and would pull a CUDA build). gptqmodel prints a banner and INFO
lines on stdout while loading; `quiet=True` sends them to stderr so stdout stays clean.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

from winq.errors import ModelError, require
from winq.formats.gptq import read_quant_config


def gptq_layers(model) -> dict:
    """{module name: gptqmodel quant layer} of a loaded model."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "qweight") and hasattr(m, "dequantize_weight")}


def make_exact(model, compile: bool = False) -> int:
    """Upcast gptqmodel's float16 scales/biases to float32 and (compile=False) drop its torch.compile wrapper."""
    import torch

    n = 0
    for m in gptq_layers(model).values():
        for buf in ("scales", "bias"):
            t = getattr(m, buf, None)
            if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16):
                setattr(m, buf, t.to(torch.float32))
        if not compile:
            m.__dict__.pop("dequantize_weight", None)  # the instance attribute set by gptqmodel's optimize()
        for reset in ("_stream_reset_cache", "clear_weight_cache"):  # caches keyed on the old tensors
            if callable(getattr(m, reset, None)):
                getattr(m, reset)()
        n += 1
    return n


def load_gptq(folder, dtype=None, device: str = "cpu", exact: bool = True, compile: bool = False, quiet: bool = True):
    """A transformers causal LM from a GPTQ folder, on gptqmodel's torch kernel (float32 by default)."""
    import torch

    # effective if torch._dynamo is not imported yet
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "0" if compile else "1")
    sink = contextlib.redirect_stdout(sys.stderr) if quiet else contextlib.nullcontext()
    with sink, warnings.catch_warnings():
        require("optimum", "gptqmodel", extra="gptq", purpose="the gptq backend")  # gptqmodel prints a banner
        qc = read_quant_config(folder)
        # expected: the folder's own quantization_config wins, ours only picks the backend
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
        from transformers import AutoModelForCausalLM, GPTQConfig

        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(folder),
                dtype=dtype or torch.float32,
                quantization_config=GPTQConfig(bits=int(qc["bits"]), backend="torch"),
            )
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelError(f"{folder}: transformers + gptqmodel could not load it ({type(e).__name__}: "
                             f"{e})") from None
    if not gptq_layers(model):
        raise ModelError(f"{folder}: loaded, but no GPTQ layers were created (is quantization_config complete?)")
    if exact:
        make_exact(model, compile=compile)
    if str(device) != "cpu":
        model.to(device)
    model.eval()
    return model


__all__ = ["load_gptq", "make_exact", "gptq_layers"]
