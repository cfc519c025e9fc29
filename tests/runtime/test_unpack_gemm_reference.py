"""The torch unpack-GEMM reference against QuantizedWeight.dequantize(), its boundary checks, and
the dispatcher on CPU. Needs no triton."""

import subprocess
import sys

import pytest
import torch

from winq import QuantizedWeight
from winq.errors import WinqError
from winq.packing import pack, pad_to_period
from winq.runtime.kernels import dequantize_packed, packed_rows, unpack_gemm, unpack_gemm_torch


def random_qweight(out, inf, grid, bits, group_size, seed=0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (out, inf), generator=g).to(torch.uint8)  # (N, K)
    G = inf // group_size
    scale = (torch.rand(out, G, generator=g) * 0.05 + 0.001).half()  # (N, G)
    if grid == "affine":
        zero = torch.randint(0, 2**bits, (out, G), generator=g).float()
    else:  # lsq: 2^(b-1); seq: 1.5 (half-integer)
        zero = torch.full((out, G), 1.5 if grid == "seq" else 2.0 ** (bits - 1))
    return QuantizedWeight(codes, scale, zero, grid, bits, group_size)


def to_gptq(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QuantizedWeight (out, in) -> GPTQ (qweight (K_pad*b/32, N), scales (G, N), zeros (G, N))."""
    qweight = pack(pad_to_period(qw.codes.T, qw.bits, dim=0), qw.bits, dim=0)  # codes.T (K, N) packed along K
    return qweight, qw.scale.T.contiguous(), qw.zero.T.contiguous()


CASES = [  # (grid, bits, out N, in K, group_size)
    ("affine", 2, 40, 96, 32),
    ("seq", 2, 24, 200, 200),
    ("affine", 3, 72, 160, 32),
    ("lsq", 3, 40, 200, 200),
    ("affine", 4, 40, 192, 64),
    ("lsq", 4, 16, 96, 96),
    ("affine", 8, 24, 160, 32),
    ("lsq", 8, 40, 200, 200),
]


@pytest.mark.parametrize("grid,bits,N,K,group_size", CASES)
def test_reference_equals_quantized_weight_dequantize(grid, bits, N, K, group_size):
    qw = random_qweight(N, K, grid, bits, group_size, seed=bits * 1000 + K)
    qweight, scales, zeros = to_gptq(qw)
    assert qweight.shape == (packed_rows(K, bits), N)
    # the dequantized weight is bit-identical (same float32 ops elementwise)
    assert torch.equal(dequantize_packed(qweight, scales, zeros, bits, group_size, K), qw.dequantize().T)
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(1))
    y = unpack_gemm_torch(x, qweight, scales, zeros, bits, group_size)
    want = x @ qw.dequantize().T
    assert y.dtype == torch.float32 and y.shape == (5, N)
    # same W; only the float32 summation order of the two matmuls may differ
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_computes_in_float32_and_casts_once(dtype):
    qw = random_qweight(24, 96, "affine", 4, 32, seed=3)
    qweight, scales, zeros = to_gptq(qw)
    x = torch.randn(3, 96).to(dtype)
    y = unpack_gemm_torch(x, qweight, scales, zeros, 4, 32)
    assert y.dtype == dtype
    # float32 product of the same (K, N) matrix, rounded to x's dtype once at the end
    assert torch.equal(y, (x.float() @ qw.dequantize().T.contiguous()).to(dtype))


def test_reference_accepts_float16_zeros_and_strided_x():
    qw = random_qweight(40, 160, "affine", 3, 32, seed=4)
    qweight, scales, zeros = to_gptq(qw)
    x = torch.randn(160, 7).T  # (7, 160), strides (1, 7)
    y16 = unpack_gemm_torch(x, qweight, scales, zeros.half(), 3, 32)
    y32 = unpack_gemm_torch(x.contiguous(), qweight, scales, zeros, 3, 32)
    assert torch.equal(y16, y32)  # integer zeros are exact in float16


def test_dispatcher_uses_reference_on_cpu():
    qw = random_qweight(40, 96, "affine", 4, 32, seed=5)
    qweight, scales, zeros = to_gptq(qw)
    x = torch.randn(3, 96).half()
    assert torch.equal(unpack_gemm(x, qweight, scales, zeros, 4, 32), unpack_gemm_torch(x, qweight, scales, zeros, 4,
                                                                                        32))


def test_empty_m():
    qw = random_qweight(8, 32, "affine", 4, 32)
    qweight, scales, zeros = to_gptq(qw)
    assert unpack_gemm_torch(torch.zeros(0, 32), qweight, scales, zeros, 4, 32).shape == (0, 8)


def test_packed_rows():
    assert [packed_rows(200, b) for b in (2, 3, 4, 8)] == [208 * 2 // 32, 224 * 3 // 32, 200 * 4 // 32, 200 * 8 // 32]


def _good():
    qw = random_qweight(40, 96, "affine", 3, 32)
    qweight, scales, zeros = to_gptq(qw)
    return dict(x=torch.randn(3, 96).half(), qweight=qweight, scales=scales, zeros=zeros, bits=3, group_size=32)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(bits=5), r"bits=5 is not supported; valid: 2, 3, 4, 8"),
        (dict(x=torch.randn(3, 96).to(torch.float64)), r"x must be float16, bfloat16 or float32, got torch.float64"),
        (dict(x=torch.randn(3, 4, 96).half()), r"x must be 2-D, got shape \(3, 4, 96\)"),
        (dict(x=torch.randn(3, 100).half()), r"group_size=32 must be a positive divisor of K=100"),
        (dict(x=torch.randn(3, 64).half()), r"qweight has 9 rows but K=64 3-bit codes pack into 6"),
        (dict(group_size=48), r"scales must be \(G, N\) = \(2, 40\) for K=96, group_size=48, N=40 .*got \(3, 40\)"),
        (dict(qweight=torch.zeros(9, 40, dtype=torch.int64)), r"qweight must be int32"),
        (dict(scales=torch.ones(3, 40)), r"scales must be float16, got torch.float32"),
        (dict(zeros=torch.ones(3, 40, dtype=torch.bfloat16)), r"zeros must be float32 or float16"),
        (dict(zeros=torch.ones(3, 41)), r"zeros must be \(G, N\) = \(3, 40\) .*got \(3, 41\)"),
    ],
)
def test_boundary_errors_name_sizes(change, match):
    args = {**_good(), **change}
    with pytest.raises(WinqError, match=match):
        unpack_gemm_torch(**args)


def test_importing_runtime_kernels_does_not_import_triton():
    code = (
        "import sys, winq, winq.runtime, winq.runtime.kernels\n"
        "bad = [m for m in ('triton', 'winq.runtime.kernels.unpack_gemm_kernel') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
