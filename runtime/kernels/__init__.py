"""winq.runtime.kernels: low-bit GEMM kernels over GPTQ-packed weights.

Each op comes as a pair with one signature (gemlite style):

    unpack_gemm_reference.unpack_gemm   torch: unpack, dequantize, matmul in float32 (any device)
    unpack_gemm_kernel.unpack_gemm       Triton: reads int32 words directly (CUDA; CPU under
                                        TRITON_INTERPRET=1)

(The Triton file is unpack_gemm_kernel.py, not unpack_gemm.py or unpack_gemm_triton.py: importing
a submodule sets it as an attribute of the package, which would replace the function of that name.)

`unpack_gemm` below dispatches: Triton for CUDA tensors, the torch reference otherwise.
Importing this package does not import triton (ARCHITECTURE §1); the Triton module is imported
on the first CUDA call, and a missing triton raises MissingDependencyError with the pip command (winq.errors.require).
"""

from __future__ import annotations

import torch

from winq.errors import require

from .unpack_gemm_reference import check_inputs, dequantize_packed, packed_rows
from .unpack_gemm_reference import unpack_gemm as unpack_gemm_torch

__all__ = ["unpack_gemm", "unpack_gemm_torch", "unpack_gemm_triton", "check_inputs", "dequantize_packed", "packed_rows"]


def _triton_module():
    require("triton", extra="kernels", purpose="the CUDA unpack-GEMM kernel")
    from . import unpack_gemm_kernel as mod

    return mod


def unpack_gemm_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                       group_size: int) -> torch.Tensor:
    """The Triton kernel (see unpack_gemm_kernel.unpack_gemm); imports triton on first use."""
    return _triton_module().unpack_gemm(x, qweight, scales, zeros, bits, group_size)


def unpack_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                group_size: int) -> torch.Tensor:
    """y = x @ Wt with Wt[k, n] = scales[k // g, n] * (q[k, n] - zeros[k // g, n]) from GPTQ words.

    x        float16 | bfloat16 | float32  (M, K)
    qweight  int32                         (K_pad * bits / 32, N)  GPTQ layout, packed along K
    scales   float16                       (G, N), G = K / group_size
    zeros    float32 | float16             (G, N)
    returns  x.dtype                       (M, N)

    Triton on CUDA tensors, the torch reference on any other device. Both check shapes the same way.
    """
    if x.device.type == "cuda":
        return unpack_gemm_triton(x, qweight, scales, zeros, bits, group_size)
    return unpack_gemm_torch(x, qweight, scales, zeros, bits, group_size)
