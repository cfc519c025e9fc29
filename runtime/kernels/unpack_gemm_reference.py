"""Torch reference of the unpack-GEMM: y = x @ dequant(qweight), the ground truth for the Triton kernel.

The packed weight is GPTQ's `qweight` (winq.packing, ARCHITECTURE §7): integer codes q[k, n]
of the transposed weight Wt (K, N) packed along K into int32 words, lowest bits first, K
padded with zero codes to the packing period P (32 for 3-bit, 32 / bits otherwise). With
g = group_size and G = K / g groups along K:

    Wt[k, n] = float32(scales[k // g, n]) * (q[k, n] - zeros[k // g, n])      # (K, N)
    y        = x @ Wt                                                          # (M, N)

which is `x @ QuantizedWeight.dequantize().T` for the QuantizedWeight whose codes are q.T.
This reference unpacks with winq.packing.unpack, dequantizes and multiplies in float32 and
casts to x's dtype once at the end: the only rounding is float32 accumulation and that cast.

`check_inputs` is the boundary check shared with the Triton wrapper, so both implementations
accept and refuse exactly the same calls with the same messages.
"""

from __future__ import annotations

import torch

from winq.errors import WinqError
from winq.packing import period, unpack

KERNEL_BITS = (2, 3, 4, 8)
X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ZERO_DTYPES = (torch.float32, torch.float16)


def packed_rows(K: int, bits: int) -> int:
    """Rows of int32 words holding K codes of `bits` bits: K padded to the period, times bits / 32."""
    P = period(bits)
    return (K + P - 1) // P * P * bits // 32


def check_inputs(x, qweight, scales, zeros, bits, group_size) -> tuple[int, int, int, int]:
    """Validate an unpack-GEMM call; return (M, N, K, G). Raises WinqError naming the bad sizes."""
    if bits not in KERNEL_BITS:
        raise WinqError(f"unpack_gemm: bits={bits} is not supported; valid: {', '.join(map(str, KERNEL_BITS))}")
    for name, t in (("x", x), ("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if not isinstance(t, torch.Tensor):
            raise WinqError(f"unpack_gemm: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise WinqError(f"unpack_gemm: {name} must be 2-D, got shape {tuple(t.shape)}")
    if x.dtype not in X_DTYPES:
        raise WinqError(f"unpack_gemm: x must be float16, bfloat16 or float32, got {x.dtype}")
    if qweight.dtype != torch.int32:
        raise WinqError(f"unpack_gemm: qweight must be int32 (GPTQ words), got {qweight.dtype}")
    if scales.dtype != torch.float16:
        raise WinqError(f"unpack_gemm: scales must be float16, got {scales.dtype}")
    if zeros.dtype not in ZERO_DTYPES:
        raise WinqError(f"unpack_gemm: zeros must be float32 or float16, got {zeros.dtype}")
    devices = {t.device for t in (x, qweight, scales, zeros)}
    if len(devices) > 1:
        raise WinqError(f"unpack_gemm: all tensors must be on one device, got {', '.join(sorted(map(str, devices)))}")
    M, K = x.shape
    rows, N = qweight.shape
    if K < 1:
        raise WinqError(f"unpack_gemm: x has K={K} columns; need K >= 1")
    if not isinstance(group_size, int) or group_size < 1 or K % group_size:
        raise WinqError(f"unpack_gemm: group_size={group_size} must be a positive divisor of K={K} (use K for per-row)")
    G = K // group_size
    if rows != packed_rows(K, bits):
        raise WinqError(
            f"unpack_gemm: qweight has {rows} rows but K={K} {bits}-bit codes pack into {packed_rows(K, bits)} "
            f"(K padded to a multiple of {period(bits)}, times {bits}/32); qweight is (K_pad * bits / 32, N)"
        )
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != (G, N):
            raise WinqError(
                f"unpack_gemm: {name} must be (G, N) = ({G}, {N}) for K={K}, group_size={group_size}, "
                f"N={N} (qweight columns), got {tuple(t.shape)}"
            )
    return M, N, K, G


def dequantize_packed(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                      K: int) -> torch.Tensor:
    """float32 Wt (K, N) = float32(scales[k // g]) * (q[k] - zeros[k // g]) from GPTQ words."""
    q = unpack(qweight, bits, dim=0)[:K].to(torch.float32)  # (K, N); drops the period padding
    N = q.shape[1]
    G = K // group_size
    q = q.reshape(G, group_size, N)  # (G, g, N)
    lev = q - zeros.to(torch.float32)[:, None, :]  # (G, g, N)
    return (scales.to(torch.float32)[:, None, :] * lev).reshape(K, N)


def unpack_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                group_size: int) -> torch.Tensor:
    """y = x @ Wt, Wt the dequantized GPTQ weight; torch, any device.

    x        float16 | bfloat16 | float32  (M, K)                  activations, any strides
    qweight  int32                         (K_pad * bits / 32, N)  codes q[k, n] packed along K,
                                                                   lowest bits first (winq.packing);
                                                                   K_pad = K rounded up to period(bits)
    scales   float16                       (G, N), G = K / group_size
    zeros    float32 | float16             (G, N)                  zero points (integer or half-integer)
    bits     2 | 3 | 4 | 8
    group_size  codes per group along K (K for per-row)
    returns  x.dtype                       (M, N)                  computed in float32, cast once
    """
    M, N, K, G = check_inputs(x, qweight, scales, zeros, bits, group_size)
    wt = dequantize_packed(qweight, scales, zeros, bits, group_size, K)  # (K, N) float32
    return (x.to(torch.float32) @ wt).to(x.dtype)
