"""Runtime activation quantizers: what llama.cpp and onnxruntime do to a Linear's input.

Weights leave winq bit-exact, but the runtimes' fast integer dot products also quantize the
*activations* to 8 bits, block by block, just before every matmul. These functions reproduce
that arithmetic in torch, so fake-quant eval and training can see it. Each returns
the dequantized float32 tensor that the runtime's integer dot product effectively multiplies
(scale * code); the `*_blocks` forms also return codes and scales, the `*_ste` forms pass the
gradient straight through (identity) for training.

| function | runtime: the C function it reproduces                   | block      | scale            | codes           |
|----------|---------------------------------------------------------|------------|------------------|-----------------|
| q8_0     | ggml-cpu arch/x86/quants.c quantize_row_q8_0 (AVX/AVX2) | 32         | fp16(amax / 127) | RNE(x*127/amax) |
|   "ref"  | ggml-quants.c quantize_row_q8_0_ref (= gguf-py's Q8_0)  | 32         | fp16(amax / 127) | roundf(x * 1/d) |
| q8_1     | arch/x86/quants.c quantize_row_q8_1 (+ fp16(d * sum q)) | 32         | fp16(amax / 127) | as q8_0         |
| q8_k     | ggml-quants.c quantize_row_q8_K_ref (x86 calls it)      | 256        | fp32 1 / iscale  | RNE(x * iscale) |
|          |   iscale = -127 / max, max: the x of largest |x|       |            |                  |                 |
| ort_int8 | onnxruntime mlas/lib/sqnbitgemm_kernel_avx2.cpp         | the node's | fp32 amax / 127  | RNE(x*127/amax) |
|          |   QuantizeARow_CompInt8_avx2 (MatMulNBits acc. level 4) | block_size |                  |                 |
| f16/bf16 | ggml_cpu_fp32_to_fp16 / _bf16 (F16 / BF16 weights)      | -          | -                | RNE             |

All are symmetric (no activation zero point), codes in [-127, 127] (int8). amax is max |x|
over the block; an all-zero block gets scale 0 and codes 0. Details worth knowing:

- q8_0: the x86 build (AVX or AVX2, which is what llama-cpp-python compiles here, and also
  the repacked Q4_0 path ggml_quantize_mat_q8_0_4x8) multiplies by 127/amax and rounds half
  to even (_mm256_round_ps), while the reference multiplies by 1/d and rounds half away from
  zero (roundf). They differ on a small fraction of values; the ARM NEON path is a third mix
  (1/d, half to even). `variant` picks one: "x86" (default), "ref", "arm". The stored d is
  fp16, so the value multiplied is fp16(d) * q (exact in fp32).
- q8_k: d is float32 and negative when the block's largest-|x| value is positive
  (iscale = -127/max, d = 1/iscale), so codes carry the opposite sign; d * q is the same
  either way. The x86 build has no SIMD quantize_row_q8_K (it calls the reference), and the
  repacked Q4_K path (ggml_quantize_mat_q8_K_4x8) gives the same d * q.
- q8_1 (the activation type of Q4_1/Q5_1 weights): as q8_0 plus s = fp16(d_fp32 * sum q),
  which the dot product uses for the weight's min term: y = sum d_w d_a (q_w . q_a) + m_w s.
- ort_int8: block = the MatMulNBits node's block_size; the fp32 scale is not rounded to
  fp16; the tail block (K % block_size) is quantized with the amax of its real values and
  zero-padded. ORT 1.32 on x86 does this for 4- and 8-bit weights at every block size and
  for 2-bit at blocks 32..128 (ORT_INT8_BLOCKS); elsewhere it stays in float. ggml never
  sees a tail (quantized rows are multiples of 32 / 256); for K not a multiple of the block
  these functions treat the tail the same way ORT does.
- Non-finite products (a block whose amax is so small, below about 3.7e-37, that 127/amax
  overflows) follow the x86 conversions: code -128 for q8_0 / ort_int8 (cvtps_epi32's
  "integer indefinite", saturated), 0 for q8_k (nearest_int's bit trick).

What stays inexact is not the activations but the runtimes' summation order: they
accumulate sum(d_w * d_a * int_dot) per block in float32, which is not the order of a torch
matmul on the dequantized tensors (see docs/activations.md for measured residues).
Inputs of any float dtype are quantized in float32 (the runtimes' activation dtype) and the
result is cast back to the input dtype: equality with the runtime holds for float32 inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import ConfigError

QK8_0 = 32  # ggml block of Q8_0 / Q8_1
QK_K = 256  # ggml super-block of the K types and Q8_K
Q8_0_VARIANTS = ("x86", "ref", "arm")
ORT_BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits block sizes (powers of two, 16..256)
# Where onnxruntime 1.32 (x86 AVX2, CPU EP, B a constant initializer) quantizes activations at
# accuracy_level=4, by weight bits: measured by tests/winq/test_actquant.py. Other combinations
# (2-bit with block 16 or 256) run the float path: activations stay float32.
ORT_INT8_BLOCKS = {2: (32, 64, 128), 4: ORT_BLOCK_SIZES, 8: ORT_BLOCK_SIZES}
# ggml's vec_dot_type (ggml-cpu.c type_traits_cpu): what llama.cpp converts a Linear's
# activations to for each weight type on the CPU. None: float32, untouched.
GGML_ACT_TYPE = {
    "F32": None, "F16": "f16", "BF16": "bf16",
    "Q4_0": "q8_0", "Q5_0": "q8_0", "Q8_0": "q8_0", "IQ4_NL": "q8_0", "MXFP4": "q8_0",
    "Q4_1": "q8_1", "Q5_1": "q8_1",
    "Q2_K": "q8_k", "Q3_K": "q8_k", "Q4_K": "q8_k", "Q5_K": "q8_k", "Q6_K": "q8_k",
    "TQ1_0": "q8_k", "TQ2_0": "q8_k", "IQ4_XS": "q8_k",
}


@dataclass(frozen=True)
class QuantizedActivation:
    """One quantized activation tensor x of shape (..., K), in blocks of `block` along K.

    values: float32 (..., K)          scale * code, what the runtime's dot product multiplies
    codes : int8    (..., K)          the integer codes (the tail of a partial block included)
    scales: float32 (..., n_blocks)   the scale as the runtime uses it (fp16-rounded for q8_0 / q8_1)
    sums  : float32 (..., n_blocks)   q8_1 only: fp16(d * sum(codes)), else None
    """

    values: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    block: int
    sums: torch.Tensor | None = None


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """x (..., K) -> float32 (..., n_blocks, block), zero-padded; returns K too."""
    if x.dim() == 0:
        raise ConfigError("activation quantizers take a tensor (..., K), got a scalar")
    if not x.is_floating_point():
        raise ConfigError(f"activation quantizers take a float tensor, got {x.dtype}")
    k = x.shape[-1]
    if k == 0:
        raise ConfigError(f"activation tensor has an empty last dimension: shape {tuple(x.shape)}")
    xf = x.detach().to(torch.float32)
    pad = (-k) % block
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))  # zeros: change neither amax nor the codes
    return xf.reshape(*xf.shape[:-1], -1, block), k  # (..., n_blocks, block)


def _unblock(t: torch.Tensor, k: int) -> torch.Tensor:
    """(..., n_blocks, block) -> (..., K), dropping the padding."""
    return t.reshape(*t.shape[:-2], -1)[..., :k]


def _to_int8(v: torch.Tensor, nonfinite: int) -> torch.Tensor:
    """Rounded float codes -> int8 as the x86 conversions do: non-finite -> `nonfinite`, then saturate."""
    v = torch.where(torch.isfinite(v), v, torch.full_like(v, float(nonfinite)))
    return v.clamp(-128, 127).to(torch.int8)


def _div(num: float, den: torch.Tensor) -> torch.Tensor:
    """num / den, correctly rounded in float32 (IEEE division, as the C code's `127.f / amax`).

    torch computes `scalar / tensor` as reciprocal(tensor) * scalar (two roundings: 1 ulp off
    for a quarter of the values), and CUDA turns `tensor / scalar` into a multiplication by
    the reciprocal; a full-shape tensor operand on both sides avoids both.
    """
    return torch.full_like(den, num) / den


def _divide(t: torch.Tensor, den: float) -> torch.Tensor:
    """t / den correctly rounded (see _div)."""
    return t / torch.full_like(t, den)


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C roundf: half away from zero (exact: v - trunc(v) is exact in float32)."""
    t = torch.trunc(v)
    return t + torch.sign(v) * ((v - t).abs() >= 0.5).to(v.dtype)


def _absmax_int8(xb: torch.Tensor, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared by q8_0, q8_1, ort_int8: d = amax / 127 (fp32) and the int8 codes.

    x86 / ORT: q = RNE(x * (127 / amax)); ref: q = roundf(x * (1 / d)); arm: q = RNE(x * (1 / d)).
    """
    amax = xb.abs().amax(dim=-1, keepdim=True)  # (..., nb, 1)
    d = _divide(amax, 127.0)
    zero = torch.zeros((), dtype=torch.float32, device=xb.device)
    if variant == "x86":
        inv = torch.where(amax != 0, _div(127.0, amax), zero)
    else:
        inv = torch.where(d != 0, _div(1.0, d), zero)
    v = xb * inv
    q = _roundf(v) if variant == "ref" else torch.round(v)  # torch.round: half to even
    return d, _to_int8(q, -128)


def _check_variant(variant: str) -> None:
    if variant not in Q8_0_VARIANTS:
        raise ConfigError(f"unknown q8_0 variant {variant!r}: choose one of {', '.join(Q8_0_VARIANTS)}")


def q8_0_blocks(x: torch.Tensor, *, variant: str = "x86") -> QuantizedActivation:
    """ggml Q8_0 activations (llama.cpp's CPU input for Q4_0 / Q5_0 / Q8_0 weights), with codes and scales.

    Reproduces ggml-cpu/arch/x86/quants.c `quantize_row_q8_0` (AVX/AVX2) by default:
    blocks of 32, d = amax / 127 stored as fp16, q = round_half_even(x * (127 / amax)).
    variant="ref": ggml-quants.c `quantize_row_q8_0_ref` (q = roundf(x * (1 / d))), which is
    also gguf-py's Q8_0; variant="arm": arch/arm/quants.c (1 / d, half to even).
    scales are fp16(d) as float32; values = scales * codes exactly.
    """
    _check_variant(variant)
    xb, k = _blocks(x, QK8_0)
    d, q = _absmax_int8(xb, variant)
    d16 = d.to(torch.float16).to(torch.float32)  # GGML_CPU_FP32_TO_FP16: round to nearest even
    values = d16 * q.to(torch.float32)
    return QuantizedActivation(_unblock(values, k), _unblock(q, k), d16.squeeze(-1), QK8_0)


def q8_1_blocks(x: torch.Tensor, *, variant: str = "x86") -> QuantizedActivation:
    """ggml Q8_1 activations (llama.cpp's CPU input for Q4_1 / Q5_1 weights).

    Reproduces arch/x86/quants.c `quantize_row_q8_1`: the codes and d of q8_0_blocks plus
    sums = fp16(d * sum(q)) per block with the unrounded fp32 d (the reference
    quantize_row_q8_1_ref computes the same s). The Q4_1 dot product is
    sum_blocks d_w * d_a * (q_w . q_a) + m_w * s: `values` alone covers only the first term.
    """
    _check_variant(variant)
    xb, k = _blocks(x, QK8_0)
    d, q = _absmax_int8(xb, variant)
    d16 = d.to(torch.float16).to(torch.float32)
    qsum = q.to(torch.int32).sum(dim=-1, keepdim=True).to(torch.float32)  # exact: |sum| <= 4064
    sums = (d * qsum).to(torch.float16).to(torch.float32)
    values = d16 * q.to(torch.float32)
    return QuantizedActivation(_unblock(values, k), _unblock(q, k), d16.squeeze(-1), QK8_0, sums.squeeze(-1))


def q8_k_blocks(x: torch.Tensor) -> QuantizedActivation:
    """ggml Q8_K activations (llama.cpp's CPU input for the K and TQ weight types), with codes and scales.

    Reproduces ggml-quants.c `quantize_row_q8_K_ref`, which the x86 `quantize_row_q8_K` calls:
    blocks of 256; max = the first value of largest |x| (signed); iscale = -127 / max;
    q = min(127, nearest_int(iscale * x)) (round half to even); d = 1 / iscale, float32.
    d < 0 when max > 0 (codes then carry the opposite sign); an all-zero block has d = 0.
    """
    xb, k = _blocks(x, QK_K)
    idx = xb.abs().argmax(dim=-1, keepdim=True)  # first occurrence, as the C loop's strict `>`
    mx = xb.gather(-1, idx)  # (..., nb, 1) signed
    zero = torch.zeros((), dtype=torch.float32, device=xb.device)
    iscale = torch.where(mx != 0, _div(-127.0, mx), zero)
    d = torch.where(mx != 0, _div(1.0, iscale), zero)
    q = _to_int8(torch.round(xb * iscale), 0)  # non-finite -> 0 (nearest_int's bits), then MIN(127, v)
    values = d * q.to(torch.float32)
    return QuantizedActivation(_unblock(values, k), _unblock(q, k), d.squeeze(-1), QK_K)


def ort_int8_blocks(x: torch.Tensor, block_size: int) -> QuantizedActivation:
    """onnxruntime MatMulNBits accuracy_level=4 activations (MLAS CompInt8), with codes and scales.

    Reproduces onnxruntime/core/mlas/lib/sqnbitgemm_kernel_avx2.cpp `QuantizeARow_CompInt8_avx2`
    (the AVX-512 `QuantizeARow_CompInt8_avx512` does the same arithmetic): blocks of the node's
    block_size along K, symmetric, scale = amax / 127 in float32 (not fp16),
    q = round_half_even(x * (127 / amax)); the last, partial block uses its own amax and is
    zero-padded. The per-block sum scale * sum(q) that MLAS keeps serves the weights' zero
    point (sum_blocks s_a s_b (q_a . q_b) - (s_a sum q_a)(s_b zp)); it changes no value.
    """
    if block_size not in ORT_BLOCK_SIZES:
        ok = ", ".join(map(str, ORT_BLOCK_SIZES))
        raise ConfigError(f"MatMulNBits block_size {block_size} is not supported: choose one of {ok}")
    xb, k = _blocks(x, block_size)
    d, q = _absmax_int8(xb, "x86")
    values = d * q.to(torch.float32)
    return QuantizedActivation(_unblock(values, k), _unblock(q, k), d.squeeze(-1), block_size)


def _cast_back(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return values if x.dtype == torch.float32 else values.to(x.dtype)


def q8_0(x: torch.Tensor, *, variant: str = "x86") -> torch.Tensor:
    """Dequantized ggml Q8_0 activations, shape and dtype of x (see q8_0_blocks)."""
    return _cast_back(q8_0_blocks(x, variant=variant).values, x)


def q8_1(x: torch.Tensor, *, variant: str = "x86") -> torch.Tensor:
    """Dequantized ggml Q8_1 activations d * q (identical to q8_0's; the block sums are in q8_1_blocks)."""
    return _cast_back(q8_1_blocks(x, variant=variant).values, x)


def q8_k(x: torch.Tensor) -> torch.Tensor:
    """Dequantized ggml Q8_K activations, shape and dtype of x (see q8_k_blocks)."""
    return _cast_back(q8_k_blocks(x).values, x)


def ort_int8(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Dequantized onnxruntime MatMulNBits accuracy-level-4 activations (see ort_int8_blocks)."""
    return _cast_back(ort_int8_blocks(x, block_size).values, x)


def f16(x: torch.Tensor) -> torch.Tensor:
    """ggml F16 weights: llama.cpp converts the activations to fp16 (ggml_cpu_fp32_to_fp16, round to nearest even)."""
    return _cast_back(x.detach().to(torch.float32).to(torch.float16).to(torch.float32), x)


def bf16(x: torch.Tensor) -> torch.Tensor:
    """ggml BF16 weights: activations go to bf16 (ggml_cpu_fp32_to_bf16, round to nearest even)."""
    return _cast_back(x.detach().to(torch.float32).to(torch.bfloat16).to(torch.float32), x)


class _StraightThrough(torch.autograd.Function):
    """fn(x) in the forward (bit for bit), identity gradient in the backward."""

    @staticmethod
    def forward(ctx, x, fn, kwargs):
        return fn(x, **kwargs)

    @staticmethod
    def backward(ctx, g):
        return g, None, None


def q8_0_ste(x: torch.Tensor, *, variant: str = "x86") -> torch.Tensor:
    """q8_0 in the forward, straight-through (identity) gradient."""
    return _StraightThrough.apply(x, q8_0, {"variant": variant})


def q8_1_ste(x: torch.Tensor, *, variant: str = "x86") -> torch.Tensor:
    """q8_1 in the forward, straight-through (identity) gradient."""
    return _StraightThrough.apply(x, q8_1, {"variant": variant})


def q8_k_ste(x: torch.Tensor) -> torch.Tensor:
    """q8_k in the forward, straight-through (identity) gradient."""
    return _StraightThrough.apply(x, q8_k, {})


def ort_int8_ste(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """ort_int8 in the forward, straight-through (identity) gradient."""
    return _StraightThrough.apply(x, ort_int8, {"block_size": block_size})


def f16_ste(x: torch.Tensor) -> torch.Tensor:
    """f16 in the forward, straight-through (identity) gradient."""
    return _StraightThrough.apply(x, f16, {})


def bf16_ste(x: torch.Tensor) -> torch.Tensor:
    """bf16 in the forward, straight-through (identity) gradient."""
    return _StraightThrough.apply(x, bf16, {})


# name -> (quantizer, its straight-through form, needs block_size)
ACT_QUANTIZERS: dict[str, tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor], bool]] = {
    "q8_0": (q8_0, q8_0_ste, False),
    "q8_1": (q8_1, q8_1_ste, False),
    "q8_k": (q8_k, q8_k_ste, False),
    "ort_int8": (ort_int8, ort_int8_ste, True),
    "f16": (f16, f16_ste, False),
    "bf16": (bf16, bf16_ste, False),
}


def fake_quantize_activation(x: torch.Tensor, scheme: str | None, *, block_size: int | None = None,
                             ste: bool = False) -> torch.Tensor:
    """Apply the named runtime activation quantizer (ACT_QUANTIZERS; None or "none": x unchanged).

    ste=True uses the straight-through form (for training). block_size is required by
    "ort_int8" (the MatMulNBits node's block_size) and refused by the others.
    """
    if scheme is None or scheme == "none":
        return x
    if scheme not in ACT_QUANTIZERS:
        raise ConfigError(f"unknown activation quantizer {scheme!r}: choose one of none, {', '.join(ACT_QUANTIZERS)}")
    fn, fn_ste, blocked = ACT_QUANTIZERS[scheme]
    f = fn_ste if ste else fn
    if blocked:
        if block_size is None:
            raise ConfigError(f"{scheme} needs block_size (the MatMulNBits node's block_size, one of "
                              f"{', '.join(map(str, ORT_BLOCK_SIZES))})")
        return f(x, block_size)
    if block_size is not None:
        raise ConfigError(f"{scheme} has a fixed block ({QK_K if scheme == 'q8_k' else QK8_0} or none); "
                          f"block_size={block_size} applies only to ort_int8")
    return f(x)


def ggml_activation_scheme(weight_type: str) -> str | None:
    """The activation quantizer llama.cpp's CPU backend applies in front of a weight of this GGUF type
    (its vec_dot_type in ggml-cpu.c): "q8_0", "q8_1", "q8_k", "f16", "bf16", or None for F32."""
    key = weight_type.upper()
    if key not in GGML_ACT_TYPE:
        raise ConfigError(f"unknown GGUF weight type {weight_type!r}: known types are {', '.join(GGML_ACT_TYPE)}")
    return GGML_ACT_TYPE[key]


def ort_activation_scheme(bits: int, block_size: int, accuracy_level: int) -> str | None:
    """The activation quantizer onnxruntime 1.32 (x86, CPU) applies in front of a MatMulNBits node:
    "ort_int8" at accuracy_level 4 where measured (ORT_INT8_BLOCKS), else None (float32)."""
    if accuracy_level != 4:
        return None
    return "ort_int8" if block_size in ORT_INT8_BLOCKS.get(bits, ()) else None
