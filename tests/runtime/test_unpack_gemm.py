"""The Triton unpack-GEMM against the torch reference, side by side.

CPU: the kernel runs under Triton's interpreter. TRITON_INTERPRET=1 must be set before triton
is first imported in the process (triton.language's own jit functions are built then), so this
module sets it at import when there is no GPU and triton is not loaded yet; it stays set for
the session. With a GPU, the `cuda` tests run the compiled kernels (autotuned and with pinned
configs) in this process, and the interpreter tests run in a child pytest with
TRITON_INTERPRET=1 and CUDA_VISIBLE_DEVICES="" (test_cpu_suite_in_child_process).

Tolerance, elementwise: |y - ref| <= u * |ref| + 2^-20 * mag, where ref is the reference in
float32 on the same (already rounded) inputs, u the unit roundoff of the output dtype
(2^-11 float16, 2^-8 bfloat16, 0 float32: y is the float32 accumulator rounded once), and
mag = |x| @ (s * (q + |z|)) the size of the terms the kernel's float32 sums see (dot(x, q)
and z * rowsum(x) before they cancel). Float32 summation error is ~2^-24 per add over a few
dozen sequential adds; measured here <= 1.2e-7 * mag, so 2^-20 (9.5e-7) leaves ~8x margin
while a single wrong code (an error of about s * |x|) is far above it for float32 x, the
cases that pin the unpacking exactly. Tiles that span groups round W to x's dtype: + u * |x| @ |W|.
Under the interpreter bfloat16 x is dotted in float32 (the interpreter cannot cast integers to
bfloat16); the compiled bfloat16 tensor-core path is covered by the `cuda` tests.
"""

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton's first import

triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'winq[kernels]')")

from winq.errors import WinqError  # noqa: E402
from winq.packing import pack, pad_to_period  # noqa: E402
from winq.runtime.kernels import unpack_gemm_kernel as ug  # noqa: E402
from winq.runtime.kernels import unpack_gemm_torch  # noqa: E402

U = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 0.0}

interpreter = pytest.mark.skipif(
    not ug.INTERPRETED, reason="triton loaded without TRITON_INTERPRET=1: these run in test_cpu_suite_in_child_process"
)
compiled = pytest.mark.skipif(ug.INTERPRETED and torch.cuda.is_available(), reason="TRITON_INTERPRET=1: triton runs "
                                                                                   "interpreted in this process")


@pytest.fixture(autouse=True)
def _no_config_override(monkeypatch):
    monkeypatch.delenv("WINQ_UNPACK_GEMM_CONFIG", raising=False)


def make_case(M, K, N, bits, group_size, dtype, *, zero_dtype=torch.float32, half_zero=False, seed=0, device="cpu"):
    """Random codes q (K, N), GPTQ-packed; scales/zeros (G, N); x (M, K)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (K, N), generator=g).to(torch.uint8)  # (K, N)
    qweight = pack(pad_to_period(q, bits, dim=0), bits, dim=0)  # (K_pad * bits / 32, N)
    G = K // group_size
    scales = (torch.rand(G, N, generator=g) * 0.02 + 0.005).half()  # (G, N)
    zeros = torch.randint(0, 2**bits, (G, N), generator=g).float() + (0.5 if half_zero else 0.0)  # (G, N)
    x = torch.randn(M, K, generator=g).to(dtype)  # (M, K)
    t = dict(x=x, qweight=qweight, scales=scales, zeros=zeros.to(zero_dtype), bits=bits, group_size=group_size)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()}, q.to(device)


def check_close(y, case, q, *, w_rounded=False):
    x, s, z, gs = case["x"], case["scales"].float(), case["zeros"].float(), case["group_size"]
    ref = unpack_gemm_torch(x.float(), case["qweight"], case["scales"], case["zeros"], case["bits"], gs)  # (M, N) fp32
    assert y.dtype == x.dtype and y.shape == ref.shape
    s_k, z_k = s.repeat_interleave(gs, 0), z.repeat_interleave(gs, 0)  # (K, N)
    ax = x.float().abs()
    u = U[x.dtype]
    tol = u * ref.abs() + 2.0**-20 * (ax @ (s_k * (q.float() + z_k.abs())))
    if w_rounded:
        tol += u * (ax @ (s_k * (q.float() - z_k)).abs())
    err = (y.float() - ref).abs()
    bad = err > tol
    assert not bad.any(), (
        f"{int(bad.sum())}/{err.numel()} outside tolerance; max |diff| {err.max().item():.3e}, "
        f"mean {err.mean().item():.3e}, max |ref| {ref.abs().max().item():.3e}"
    )
    return err


# ------------------------------------------------------------------ interpreter (CPU)

SHAPES = [  # (M, K, N, group_size): odd M, K not a multiple of the 32-wide tile, N odd-ish
    (1, 96, 40, 32),
    (3, 160, 72, 32),
    (17, 200, 40, 200),  # per-row, K = 200
    (3, 128, 72, 64),
    (17, 192, 40, 64),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("M,K,N,group_size", SHAPES)
@interpreter
def test_interpreter_matches_reference(M, K, N, group_size, bits, dtype):
    case, q = make_case(M, K, N, bits, group_size, dtype, seed=M * 7 + K + bits)
    check_close(ug.unpack_gemm(**case), case, q)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("M,K,N,group_size", [(1, 160, 40, 32), (17, 200, 72, 200)])
@interpreter
def test_interpreter_float32_pins_every_code(M, K, N, group_size, bits):
    """float32 x: no output rounding, so any wrongly unpacked code would show."""
    case, q = make_case(M, K, N, bits, group_size, torch.float32, seed=bits)
    check_close(ug.unpack_gemm(**case), case, q)


@pytest.mark.parametrize(
    "config",
    [
        dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=1),
        dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, SPLIT_K=3),  # 10 K-tiles over 3 splits: 4, 4, 2
        dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, SPLIT_K=8),  # more splits than tiles: some empty
        dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=32, SPLIT_K=2, GROUP_M=1),  # split-K at M > 16
    ],
    ids=["no-split", "split3", "split8-empty", "split-largeM"],
)
@pytest.mark.parametrize("group_size", [32, 160])
@interpreter
def test_interpreter_split_k(config, group_size):
    case, q = make_case(5, 160, 40, 3, group_size, torch.float32, seed=11)
    check_close(ug.launch(**case, config=config), case, q)


@interpreter
def test_interpreter_grouped_tile_order():
    """Many M tiles with GROUP_M = 2 (and a ragged last group): every (M, N) tile written once."""
    case, q = make_case(70, 64, 48, 4, 32, torch.float32, seed=5)
    check_close(ug.launch(**case, config=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2)), case, q)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("bits,K,group_size", [(3, 96, 32), (4, 96, 24), (2, 160, 32)])
@interpreter
def test_interpreter_tiles_spanning_groups(bits, K, group_size, dtype):
    """BLOCK_K > group_size (or a group size that is not a multiple of 16): the dequantize-tile path."""
    mod = ug
    case, q = make_case(3, K, 40, bits, group_size, dtype, seed=K + bits)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=1)
    assert not mod._factored(64, group_size, False)
    check_close(mod.launch(**case, config=cfg), case, q, w_rounded=True)
    if group_size % 16:  # default config cannot fit BLOCK_K to the group: same path
        check_close(mod.unpack_gemm(**case), case, q, w_rounded=True)


@pytest.mark.parametrize("bits", [2, 3])
@interpreter
def test_interpreter_half_integer_and_float16_zeros(bits):
    """seq-style zeros (z = q-level offset + 0.5) stored as float16; x with non-unit strides."""
    case, q = make_case(3, 96, 40, bits, 32, torch.float16, zero_dtype=torch.float16, half_zero=True, seed=bits)
    case["x"] = case["x"].T.contiguous().T  # (3, 96) with strides (1, 3)
    assert case["x"].stride() == (1, 3)
    check_close(ug.unpack_gemm(**case), case, q)


@interpreter
def test_interpreter_env_config_and_empty(monkeypatch):
    case, q = make_case(3, 96, 40, 4, 32, torch.float32, seed=2)
    monkeypatch.setenv("WINQ_UNPACK_GEMM_CONFIG", "BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, SPLIT_K=4")
    check_close(ug.unpack_gemm(**case), case, q)
    monkeypatch.setenv("WINQ_UNPACK_GEMM_CONFIG", "BLOCK_Q=16")
    with pytest.raises(WinqError, match="BLOCK_Q=16"):
        ug.unpack_gemm(**case)
    monkeypatch.delenv("WINQ_UNPACK_GEMM_CONFIG")
    with pytest.raises(WinqError, match="BLOCK_K=24 must be a power of two"):
        ug.launch(**case, config=dict(BLOCK_K=24))
    empty = {**case, "x": case["x"][:0]}
    assert ug.unpack_gemm(**empty).shape == (0, 40)


@interpreter
def test_triton_wrapper_checks_shapes_like_reference():
    case, _ = make_case(3, 96, 40, 3, 32, torch.float16)
    case["qweight"] = case["qweight"][:-3]
    with pytest.raises(WinqError, match=r"qweight has 6 rows but K=96 3-bit codes pack into 9"):
        ug.unpack_gemm(**case)


@interpreter
def test_prune_fits_block_k_to_groups():
    mod = ug
    cfgs = mod.DECODE_CONFIGS + mod.LARGE_CONFIGS
    for straddle in (False, True):
        for gs, one in ((32, False), (128, False), (0, True)):
            pruned = mod._prune(cfgs, {}, GROUP_SIZE=gs, ONE_GROUP=one, STRADDLE=straddle)
            assert len(pruned) >= 4
            for c in pruned:
                assert c.kwargs["FACTORED"] and (one or gs % c.kwargs["BLOCK_K"] == 0)
                assert c.num_stages >= 2 and mod.smem_estimate(c.kwargs, c.num_stages, 2, straddle) <= mod.SMEM_BUDGET
    pruned = mod._prune(cfgs, {}, GROUP_SIZE=24, ONE_GROUP=False, STRADDLE=False)  # no power of two >= 16 divides 24
    assert pruned and not any(c.kwargs["FACTORED"] for c in pruned)


@pytest.mark.skipif(ug.INTERPRETED, reason="the interpreter tests ran in this process")
def test_cpu_suite_in_child_process():
    """triton was loaded compiled here (a GPU, or an earlier import): run the interpreter tests in a child."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-m", "not cuda",
           "-k", "interpreter or triton_wrapper or prune"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and " passed" in r.stdout and " skipped" not in r.stdout, (
        r.stdout[-4000:] + r.stderr[-2000:])


# ------------------------------------------------------------------ compiled (GPU)

CUDA_CASES = [  # (M, K, N, group_size)
    (1, 2048, 512, 128),
    (3, 4096, 1000, 4096),  # per-row, N not a multiple of 128
    (16, 1024, 768, 128),
    (17, 1000, 520, 1000),  # K not a multiple of any BLOCK_K
    (130, 2048, 1024, 128),
    (300, 1024, 2048, 1024),
]


@pytest.mark.cuda
@compiled
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("M,K,N,group_size", CUDA_CASES)
def test_cuda_autotuned_matches_reference(M, K, N, group_size, bits, dtype):
    case, q = make_case(M, K, N, bits, group_size, dtype, seed=M + bits, device="cuda")
    check_close(ug.unpack_gemm(**case), case, q)


@pytest.mark.cuda
@compiled
@pytest.mark.parametrize(
    "config",
    [
        dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, SPLIT_K=1, num_warps=4, num_stages=3),
        dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, SPLIT_K=2),  # spans groups of 128: dequantize-tile path
    ],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("bits", [3, 4])
def test_cuda_pinned_configs(config, dtype, bits):
    case, q = make_case(20, 1024, 200, bits, 128, dtype, half_zero=True, zero_dtype=torch.float16, seed=bits,
                        device="cuda")
    w_rounded = not ug._factored(config["BLOCK_K"], 128, False)
    check_close(ug.launch(**case, config=config), case, q, w_rounded=w_rounded)


@pytest.mark.cuda
@compiled
def test_cuda_dispatcher_uses_triton(monkeypatch):
    from winq.runtime.kernels import unpack_gemm

    calls = []
    real = ug.unpack_gemm
    monkeypatch.setattr(ug, "unpack_gemm", lambda *a: calls.append(a[0].shape) or real(*a))
    case, q = make_case(4, 256, 64, 4, 64, torch.float16, device="cuda")
    check_close(unpack_gemm(**case), case, q)
    assert calls == [(4, 256)]
