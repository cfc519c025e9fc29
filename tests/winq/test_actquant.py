"""winq.actquant against the runtimes' own activation quantizers, bit for bit.

How each comparison reaches the real thing:
- ggml (llama.cpp): llama-cpp-python ships libggml-base.so / libggml-cpu.so; ctypes calls the
  exported C functions of that very build: quantize_row_q8_0 / _q8_1 / _q8_K (the x86 CPU
  path), quantize_row_q8_0_ref, and ggml_quantize_mat_q8_0_4x8 / _q8_K_4x8 (the repacked
  Q4_0 / Q4_K path that llama.cpp takes on AVX2), byte for byte. Then whole matmuls through
  ggml's own graph (ggml_mul_mat + ggml_graph_compute_with_ctx) with identity weights in
  Q8_0, Q4_0, Q2_K, F16 and BF16: the output row *is* the quantized activation, so it must
  equal ours with atol 0. This was chosen over a tiny GGUF model (a full llama graph adds
  norms and attention in front of every matmul) and over compiling C (no toolchain needed).
- gguf-py (a core dependency): its Q8_0 is ggml's reference quantizer; compared too.
- onnxruntime: a one-node MatMulNBits model (accuracy_level=4, B a constant initializer)
  whose weights are the identity (code 1 on the diagonal, 0 elsewhere, scale 1, explicit
  zero point 0), so every output column is scale_a * code_a exactly.
Where float summation order makes a comparison inexact (random weights), the residue is
measured against a float64 product and bounded in that test's docstring.
Tests needing llama_cpp or onnxruntime skip with the reason when they are absent.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from winq import actquant as aq
from winq.errors import ConfigError

EPS32 = 2.0**-24


# ----------------------------------------------------------------------------- activations


def activations(seed: int, rows: int, k: int) -> np.ndarray:
    """Real-looking float32 activations (rows, k): each row is one of
    - heavy-tailed (Student t, 2.5 dof) at a random scale 1e-3..1e2,
    - an RMS-normalised residual stream with a few massive outlier channels (x50..x500),
    - a SiLU-gated MLP intermediate silu(g) * u (many near-zero, long tails),
    - values on exact rounding ties (k + 0.5) * d, where half-to-even and half-away differ,
    with some all-zero 32- and 256-blocks and an exact-zero row."""
    rng = np.random.default_rng(seed)
    out = np.empty((rows, k), np.float32)
    outliers = rng.choice(k, size=max(1, k // 200), replace=False)
    for r in range(rows):
        kind = r % 4
        if kind == 0:
            x = rng.standard_t(2.5, k) * 10.0 ** rng.uniform(-3, 2)
        elif kind == 1:
            x = rng.standard_normal(k)
            x = x / np.sqrt((x**2).mean()) * rng.uniform(0.5, 2, k)
            x[outliers] *= rng.uniform(50, 500, outliers.size) * rng.choice([-1, 1], outliers.size)
        elif kind == 2:
            g, u = rng.standard_normal(k) * 2, rng.standard_normal(k)
            x = g / (1 + np.exp(-g)) * u
        else:
            d = 2.0 ** rng.integers(-7, 4)  # a power of two: 127 d, 127 / amax and 1 / d are all exact
            x = (rng.integers(-126, 127, k) + 0.5) * d
            x[::32] = 127 * d  # block amax 127 d, so x * 127 / amax is exactly k + 0.5
        out[r] = x
    if k >= 64:
        out[1 % rows, 32:64] = 0.0
    if k >= 512:
        out[2 % rows, 256:512] = 0.0
    if rows > 5:
        out[5] = 0.0
    return out


def t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


# ----------------------------------------------------------------------------- plain torch


@pytest.mark.parametrize("k", [32, 40, 256, 300, 1000])
def test_values_are_scale_times_code_and_within_half_a_step(k):
    """|x - d q| <= d / 2 with d = amax / 127, plus 127 |scale - d| for a scale stored rounded (fp16)."""
    x = t(activations(0, 12, k))
    for qa in (aq.q8_0_blocks(x), aq.q8_0_blocks(x, variant="ref"), aq.q8_1_blocks(x), aq.q8_k_blocks(x),
               aq.ort_int8_blocks(x, 64)):
        b = qa.block
        nb = -(-k // b)
        assert qa.values.shape == x.shape and qa.codes.shape == x.shape and qa.scales.shape == (12, nb)
        assert qa.codes.dtype == torch.int8 and qa.values.dtype == torch.float32
        assert int(qa.codes.abs().max()) <= 127
        s = qa.scales.repeat_interleave(b, dim=-1)[..., :k]  # (12, K)
        assert torch.equal(qa.values, s * qa.codes.float())
        xp = torch.nn.functional.pad(x.double(), (0, nb * b - k)).reshape(12, nb, b)  # (12, nb, b)
        d = (xp.abs().amax(-1) / 127).repeat_interleave(b, dim=-1)[..., :k]  # (12, K)
        bound = 0.5 * d * (1 + 1e-6) + 127 * (s.double().abs() - d).abs() + 1e-30
        assert bool(((qa.values.double() - x.double()).abs() <= bound).all())


def test_all_zero_blocks_give_zero_scale_and_codes():
    x = torch.zeros(3, 512)
    x[0, 300] = 15.875  # 127 / 8: every scale is exact, so the value comes back exactly
    for qa in (aq.q8_0_blocks(x), aq.q8_k_blocks(x), aq.ort_int8_blocks(x, 128)):
        zero_blocks = qa.scales == 0
        assert int(zero_blocks.sum()) == qa.scales.numel() - 1
        assert torch.equal(qa.values, x)
        assert int(qa.codes.abs().sum()) == 127


@pytest.mark.parametrize("k", [1, 31, 33, 100, 255, 257, 300])
def test_tail_block_equals_zero_padding(k):
    """K not a multiple of the block: the tail is quantized with its own amax, as if zero-padded
    (what ORT does; ggml never gets such rows)."""
    x = t(activations(1, 8, k))
    cases = [(aq.q8_0, 32), (aq.q8_k, 256), (lambda v: aq.ort_int8(v, 16), 16), (lambda v: aq.ort_int8(v, 128), 128)]
    for fn, b in cases:
        kp = -(-k // b) * b
        padded = torch.nn.functional.pad(x, (0, kp - k))
        assert torch.equal(fn(x), fn(padded)[:, :k])


def test_rounding_variants_on_ties():
    """Block amax 127 -> d = 1, x * 127/amax = x: 2.5 -> 2 (x86, arm: half to even), 3 (ref: roundf)."""
    x = torch.zeros(32)
    x[0], x[1], x[2], x[3] = 127.0, 2.5, -3.5, 0.5
    assert aq.q8_0_blocks(x).codes[:4].tolist() == [127, 2, -4, 0]
    assert aq.q8_0_blocks(x, variant="arm").codes[:4].tolist() == [127, 2, -4, 0]
    assert aq.q8_0_blocks(x, variant="ref").codes[:4].tolist() == [127, 3, -4, 1]
    y = torch.zeros(256)
    y[7], y[8] = 127.0, 2.5
    qk = aq.q8_k_blocks(y)  # largest |x| positive: iscale = -1, d = -1, codes negated
    assert qk.scales.tolist() == [-1.0] and qk.codes[7:9].tolist() == [-127, -2] and qk.values[8] == 2.0


def test_q8_k_sign_convention_follows_the_first_largest_value():
    x = torch.zeros(256)
    x[3], x[9] = -4.0, 4.0
    assert aq.q8_k_blocks(x).scales.item() > 0  # max = -4 (first), iscale = 127/4 > 0
    x[3], x[9] = 4.0, -4.0
    assert aq.q8_k_blocks(x).scales.item() < 0
    assert torch.equal(aq.q8_k(x), x)


def test_q8_0_ref_matches_gguf_py():
    """gguf-py's Q8_0 (quantize_row_q8_0_ref's port) gives the same bytes as variant="ref"."""
    gguf = pytest.importorskip("gguf")
    x = activations(2, 16, 1024)
    blocks = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0).reshape(16, -1, 34)  # (rows, nb, 34)
    d = blocks[..., :2].copy().view(np.float16).astype(np.float32)[..., 0]
    q = blocks[..., 2:].copy().view(np.int8).reshape(16, 1024)
    qa = aq.q8_0_blocks(t(x), variant="ref")
    assert np.array_equal(qa.codes.numpy(), q) and np.array_equal(qa.scales.numpy(), d)
    deq = gguf.quants.dequantize(blocks.reshape(16, -1), gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(qa.values.numpy(), deq)


def test_x86_and_ref_differ_only_on_near_ties():
    """The x86 path (127/amax, half to even) and the reference (1/d, roundf) differ by one code,
    where x * scale is (within an ulp of) k + 0.5: half of the exact ties (32091 of 65536 values of
    the tie rows: those with k even), and 0 of the 196608 other values here (3 of 1.6M random t values)."""
    x = t(activations(3, 64, 4096))
    a, b = aq.q8_0_blocks(x), aq.q8_0_blocks(x, variant="ref")
    diff = a.codes.int() - b.codes.int()
    assert int(diff.abs().max()) == 1
    ties = torch.arange(64) % 4 == 3
    assert int((diff[~ties] != 0).sum()) <= 8
    assert int((diff[ties] != 0).sum()) > 30000


@pytest.mark.parametrize("scheme", ["q8_0", "q8_1", "q8_k", "ort_int8", "f16", "bf16"])
def test_straight_through_gradient_and_bitwise_forward(scheme):
    bs = 64 if scheme == "ort_int8" else None
    x = t(activations(4, 6, 300)).requires_grad_(True)
    y = aq.fake_quantize_activation(x, scheme, block_size=bs, ste=True)
    y_plain = aq.fake_quantize_activation(x.detach(), scheme, block_size=bs)
    assert torch.equal(y.detach(), y_plain)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, g)


def test_shapes_and_dtypes():
    x = t(activations(5, 12, 96)).reshape(2, 6, 96)
    assert aq.q8_0(x).shape == (2, 6, 96)
    assert torch.equal(aq.q8_0(x).reshape(12, 96), aq.q8_0(x.reshape(12, 96)))
    xb = x.to(torch.bfloat16)
    y = aq.q8_k(xb)
    assert y.dtype == torch.bfloat16 and torch.equal(y, aq.q8_k(xb.float()).to(torch.bfloat16))
    assert aq.fake_quantize_activation(x, None) is x and aq.fake_quantize_activation(x, "none") is x


def test_tiny_block_follows_x86_conversions():
    """amax 2e-37: 127/amax overflows to inf; x86 converts inf/NaN to the integer indefinite
    (q8_0, ORT: code -128), ggml's nearest_int bit trick gives 0 (q8_k); fp16(d) is 0."""
    x = torch.zeros(256)
    x[0], x[1] = 2e-37, -1e-37
    qa = aq.q8_0_blocks(x)
    assert qa.codes[:32].tolist() == [-128] * 32 and qa.scales[0] == 0 and bool((qa.values == 0).all())
    qk = aq.q8_k_blocks(x)
    assert int(qk.codes.abs().sum()) == 0 and bool((qk.values == 0).all())


def test_errors_name_the_valid_choices():
    x = torch.randn(4, 64)
    with pytest.raises(ConfigError, match="choose one of x86, ref, arm"):
        aq.q8_0(x, variant="avx")
    with pytest.raises(ConfigError, match="block_size 48 is not supported: choose one of 16, 32, 64, 128, 256"):
        aq.ort_int8(x, 48)
    with pytest.raises(ConfigError, match="ort_int8 needs block_size"):
        aq.fake_quantize_activation(x, "ort_int8")
    with pytest.raises(ConfigError, match="applies only to ort_int8"):
        aq.fake_quantize_activation(x, "q8_0", block_size=32)
    with pytest.raises(ConfigError, match="unknown activation quantizer 'q4'.*q8_0, q8_1, q8_k, ort_int8"):
        aq.fake_quantize_activation(x, "q4")
    with pytest.raises(ConfigError, match="unknown GGUF weight type 'Q9_0'"):
        aq.ggml_activation_scheme("Q9_0")
    with pytest.raises(ConfigError, match="float tensor"):
        aq.q8_0(torch.ones(32, dtype=torch.int32))


def test_scheme_tables():
    assert aq.ggml_activation_scheme("q4_0") == "q8_0" and aq.ggml_activation_scheme("Q4_1") == "q8_1"
    assert {aq.ggml_activation_scheme(w) for w in ("Q2_K", "Q3_K", "Q4_K", "Q6_K", "TQ1_0", "TQ2_0")} == {"q8_k"}
    assert aq.ggml_activation_scheme("F32") is None and aq.ggml_activation_scheme("F16") == "f16"
    assert aq.ort_activation_scheme(4, 32, 4) == "ort_int8" and aq.ort_activation_scheme(4, 32, 0) is None
    assert aq.ort_activation_scheme(2, 16, 4) is None and aq.ort_activation_scheme(2, 64, 4) == "ort_int8"


def test_import_pulls_no_optional_package():
    code = ("import sys, winq.actquant; bad = [m for m in ('onnxruntime', 'llama_cpp', 'triton', 'gptqmodel', 'onnx') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- ggml via ctypes


class _InitParams(ctypes.Structure):  # struct ggml_init_params
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q8_0, GGML_Q2_K, GGML_BF16 = 0, 1, 2, 8, 10, 30


@pytest.fixture(scope="module")
def ggml():
    """The ggml libraries of the installed llama-cpp-python build, with the functions used here typed."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (winq[llamacpp])")
    libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    paths = [os.path.join(libdir, f"libggml-{n}.so") for n in ("base", "cpu")]
    if not all(os.path.exists(p) for p in paths):
        pytest.skip(f"llama-cpp-python has no {' / '.join(paths)} (not a Linux shared-library build)")
    base, cpu = (ctypes.CDLL(p, mode=ctypes.RTLD_GLOBAL) for p in paths)
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    for lib, names in [(cpu, ["quantize_row_q8_0", "quantize_row_q8_1", "quantize_row_q8_K",
                              "ggml_quantize_mat_q8_0_4x8", "ggml_quantize_mat_q8_K_4x8"]),
                       (base, ["quantize_row_q8_0_ref", "quantize_row_q8_K_ref"])]:
        for n in names:
            getattr(lib, n).argtypes, getattr(lib, n).restype = [vp, vp, i64], None
    base.ggml_init.argtypes, base.ggml_init.restype = [_InitParams], vp
    base.ggml_new_tensor_2d.argtypes, base.ggml_new_tensor_2d.restype = [vp, ctypes.c_int, i64, i64], vp
    base.ggml_mul_mat.argtypes, base.ggml_mul_mat.restype = [vp, vp, vp], vp
    base.ggml_new_graph.argtypes, base.ggml_new_graph.restype = [vp], vp
    base.ggml_build_forward_expand.argtypes, base.ggml_build_forward_expand.restype = [vp, vp], None
    base.ggml_get_data.argtypes, base.ggml_get_data.restype = [vp], vp
    base.ggml_free.argtypes, base.ggml_free.restype = [vp], None
    cpu.ggml_graph_compute_with_ctx.argtypes = [vp, vp, ctypes.c_int]
    cpu.ggml_graph_compute_with_ctx.restype = ctypes.c_int
    cpu.ggml_cpu_init.argtypes, cpu.ggml_cpu_init.restype = [], None
    cpu.ggml_cpu_init()
    if not (cpu.ggml_cpu_has_avx() or cpu.ggml_cpu_has_avx2()):
        pytest.skip("this ggml build is not x86 AVX/AVX2: winq.actquant.q8_0 follows the x86 path")
    return base, cpu


def _rows_q8_0(fn, x: np.ndarray, with_sum: bool = False):
    """Call quantize_row_q8_0 / _q8_1 / _ref on float32 rows (R, K): codes (R, K), d (R, nb)[, s (R, nb)]."""
    x = np.ascontiguousarray(x, np.float32)
    r, k = x.shape
    bsz = 36 if with_sum else 34  # block_q8_1 {fp16 d, fp16 s, qs[32]}, block_q8_0 {fp16 d, qs[32]}
    buf = np.zeros(r * k // 32 * bsz, np.uint8)
    fn(x.ctypes.data, buf.ctypes.data, x.size)
    b = buf.reshape(r, k // 32, bsz)
    d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = b[..., bsz - 32:].copy().view(np.int8).reshape(r, k)
    if with_sum:
        return q, d, b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    return q, d


def _rows_q8_k(fn, x: np.ndarray):
    """Call quantize_row_q8_K(_ref) on rows (R, K): codes (R, K) and float32 d (R, nb).
    block_q8_K = {f32 d, qs[256], int16 bsums[16]}."""
    x = np.ascontiguousarray(x, np.float32)
    r, k = x.shape
    buf = np.zeros(r * k // 256 * 292, np.uint8)
    fn(x.ctypes.data, buf.ctypes.data, x.size)
    b = buf.reshape(r, k // 256, 292)
    return b[..., 4:260].copy().view(np.int8).reshape(r, k), b[..., :4].copy().view(np.float32)[..., 0]


def _mat_4x8(fn, x: np.ndarray, block: int, dsize: int, ddtype) -> np.ndarray:
    """ggml_quantize_mat_q8_{0,K}_4x8 on 4 rows: dequantized (4, K). Layout (repack.h block_q8_0x4 /
    block_q8_Kx4): d[4], then qs where byte 32*j + 8*r + t is row r, element 8*j + t of the block."""
    x = np.ascontiguousarray(x, np.float32)
    k = x.shape[1]
    bsz = 4 * dsize + 4 * block + (128 if block == 256 else 0)  # Q8_Kx4 adds bsums[64] int16
    buf = np.zeros(k // block * bsz, np.uint8)
    fn(x.ctypes.data, buf.ctypes.data, k)
    b = buf.reshape(k // block, bsz)
    d = b[:, : 4 * dsize].copy().view(ddtype).astype(np.float32)  # (nb, 4)
    qs = b[:, 4 * dsize: 4 * dsize + 4 * block].copy().view(np.int8).reshape(-1, block // 8, 4, 8)  # (nb, j, r, t)
    q = qs.transpose(2, 0, 1, 3).reshape(4, -1, block).astype(np.float32)  # (r, nb, block)
    return (q * d.T[:, :, None]).reshape(4, k)


def _mul_mat(ggml, wtype: int, wbytes: np.ndarray, k: int, n: int, a: np.ndarray, threads: int = 1) -> np.ndarray:
    """y = a @ W.T through ggml's own graph: ggml_mul_mat(W [ne0=K, ne1=N], a [K, M]) -> (M, N)."""
    base, cpu = ggml
    m = a.shape[0]
    ctx = base.ggml_init(_InitParams(wbytes.nbytes + 8 * (m + n) * k + (16 << 20), None, False))
    assert ctx
    try:
        w = base.ggml_new_tensor_2d(ctx, wtype, k, n)
        x = base.ggml_new_tensor_2d(ctx, GGML_F32, k, m)
        ctypes.memmove(base.ggml_get_data(w), wbytes.ctypes.data, wbytes.nbytes)
        a = np.ascontiguousarray(a, np.float32)
        ctypes.memmove(base.ggml_get_data(x), a.ctypes.data, a.nbytes)
        y = base.ggml_mul_mat(ctx, w, x)
        gf = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(gf, y)
        assert cpu.ggml_graph_compute_with_ctx(ctx, gf, threads) == 0
        return np.ctypeslib.as_array(ctypes.cast(base.ggml_get_data(y), ctypes.POINTER(ctypes.c_float)), (m, n)).copy()
    finally:
        base.ggml_free(ctx)


def _half_bytes(v: float) -> np.ndarray:
    return np.array([v], np.float16).view(np.uint8)


def _eye(wtype: int, k: int) -> np.ndarray:
    """The K x K identity in a GGUF weight type, bytes (K, row bytes); every block's scale is exactly 1."""
    if wtype == GGML_Q8_0:  # {fp16 d, int8 qs[32]}
        b = np.zeros((k, k // 32, 34), np.uint8)
        b[..., :2] = _half_bytes(1.0)
        for i in range(k):
            b[i, i // 32, 2 + i % 32] = 1
    elif wtype == GGML_Q4_0:  # {fp16 d, qs[16]}: element j low nibble of byte j, j + 16 high; x = d (q - 8)
        b = np.zeros((k, k // 32, 18), np.uint8)
        b[..., :2] = _half_bytes(1.0)
        b[..., 2:] = 0x88
        for i in range(k):
            j = i % 32
            b[i, i // 32, 2 + j % 16] = 0x89 if j < 16 else 0x98
    elif wtype == GGML_Q2_K:  # {scales[16] (sc | m << 4), qs[64], fp16 d, fp16 dmin}; x = d sc q - dmin m
        b = np.zeros((k, k // 256, 84), np.uint8)
        b[..., :16] = 0x01
        b[..., 80:82] = _half_bytes(1.0)  # dmin stays 0
        for i in range(k):
            h, r = divmod(i % 256, 128)
            j, l = divmod(r, 32)
            b[i, i // 256, 16 + 32 * h + l] |= 1 << (2 * j)  # dequantize_row_q2_K's layout
    elif wtype == GGML_F16:
        b = np.eye(k, dtype=np.float16).view(np.uint8)
    elif wtype == GGML_BF16:
        b = (np.eye(k, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    else:
        raise AssertionError(wtype)
    return np.ascontiguousarray(b.reshape(k, -1))


def test_q8_0_equals_ggml_quantize_row_q8_0(ggml):
    base, cpu = ggml
    x = activations(10, 32, 2048)
    q, d = _rows_q8_0(cpu.quantize_row_q8_0, x)
    qa = aq.q8_0_blocks(t(x))
    assert np.array_equal(qa.codes.numpy(), q) and np.array_equal(qa.scales.numpy(), d)
    assert np.array_equal(qa.values.numpy(), (q.reshape(32, -1, 32) * d[..., None]).reshape(32, 2048))
    qr, dr = _rows_q8_0(base.quantize_row_q8_0_ref, x)
    ref = aq.q8_0_blocks(t(x), variant="ref")
    assert np.array_equal(ref.codes.numpy(), qr) and np.array_equal(ref.scales.numpy(), dr)
    assert not np.array_equal(q, qr)  # the tie rows tell the x86 path from the reference


@pytest.mark.parametrize("seed", range(4))
def test_q8_0_and_q8_k_equal_ggml_on_random_rows(ggml, seed):
    base, cpu = ggml
    rng = np.random.default_rng(100 + seed)
    x = (rng.standard_t(2.5, (16, 4096)) * 10.0 ** rng.uniform(-4, 3, (16, 1))).astype(np.float32)
    assert np.array_equal(aq.q8_0_blocks(t(x)).codes.numpy(), _rows_q8_0(cpu.quantize_row_q8_0, x)[0])
    ref_codes = _rows_q8_0(base.quantize_row_q8_0_ref, x)[0]
    assert np.array_equal(aq.q8_0_blocks(t(x), variant="ref").codes.numpy(), ref_codes)
    qk, dk = _rows_q8_k(cpu.quantize_row_q8_K, x)
    ka = aq.q8_k_blocks(t(x))
    assert np.array_equal(ka.codes.numpy(), qk) and np.array_equal(ka.scales.numpy(), dk)


def test_q8_1_equals_ggml_quantize_row_q8_1(ggml):
    _, cpu = ggml
    x = activations(11, 16, 1024)
    q, d, s = _rows_q8_0(cpu.quantize_row_q8_1, x, with_sum=True)
    qa = aq.q8_1_blocks(t(x))
    assert np.array_equal(qa.codes.numpy(), q) and np.array_equal(qa.scales.numpy(), d)
    assert np.array_equal(qa.sums.numpy(), s)


def test_q8_k_equals_ggml_quantize_row_q8_K(ggml):
    base, cpu = ggml
    x = activations(12, 32, 2048)
    for fn in (cpu.quantize_row_q8_K, base.quantize_row_q8_K_ref):
        q, d = _rows_q8_k(fn, x)
        qa = aq.q8_k_blocks(t(x))
        assert np.array_equal(qa.codes.numpy(), q) and np.array_equal(qa.scales.numpy(), d)  # signs included
        assert np.array_equal(qa.values.numpy(), (q.reshape(32, -1, 256) * d[..., None]).reshape(32, 2048))


def test_repacked_paths_quantize_the_same(ggml):
    """On AVX2, Q4_0 / Q4_K weights are repacked (q4_0_8x8, q4_K_8x8) and activations go through
    ggml_quantize_mat_q8_0_4x8 / ggml_quantize_mat_q8_K_4x8, four rows at a time."""
    _, cpu = ggml
    x = activations(13, 8, 1024)
    for rows in (slice(0, 4), slice(4, 8)):
        xr = np.ascontiguousarray(x[rows])
        assert np.array_equal(_mat_4x8(cpu.ggml_quantize_mat_q8_0_4x8, xr, 32, 2, np.float16), aq.q8_0(t(xr)).numpy())
        assert np.array_equal(_mat_4x8(cpu.ggml_quantize_mat_q8_K_4x8, xr, 256, 4, np.float32), aq.q8_k(t(xr)).numpy())


def test_tiny_block_equals_ggml(ggml):
    _, cpu = ggml
    x = np.zeros((1, 256), np.float32)
    x[0, 0], x[0, 1], x[0, 40] = 2e-37, -1e-37, 3.0
    q, d = _rows_q8_0(cpu.quantize_row_q8_0, x)
    qa = aq.q8_0_blocks(t(x))
    assert np.array_equal(qa.codes.numpy(), q) and np.array_equal(qa.scales.numpy(), d)
    qk, dk = _rows_q8_k(cpu.quantize_row_q8_K, x)
    assert np.array_equal(aq.q8_k_blocks(t(x)).codes.numpy(), qk)


@pytest.mark.parametrize("wtype,scheme", [(GGML_Q8_0, "q8_0"), (GGML_Q4_0, "q8_0"), (GGML_Q2_K, "q8_k"),
                                          (GGML_F16, "f16"), (GGML_BF16, "bf16")])
@pytest.mark.parametrize("m", [1, 4, 13])
def test_ggml_mul_mat_with_identity_weights_returns_our_activations(ggml, wtype, scheme, m):
    """ggml_mul_mat(identity, a) == fake_quantize_activation(a) with atol 0: every output element
    is one block's d_w * d_a * code with d_w = 1 plus exact zeros from the other blocks."""
    k = 512
    a = activations(20 + m, m, k)
    y = _mul_mat(ggml, wtype, _eye(wtype, k), k, k, a, threads=1 if m < 13 else 2)
    assert np.array_equal(y, aq.fake_quantize_activation(t(a), scheme).numpy())
    assert not np.array_equal(y, a)  # the runtime did quantize


def test_ggml_mul_mat_residue_is_float32_summation_order(ggml):
    """Random Q4_0 / Q8_0 weights (gguf-py quantized), K = 1536, M = 1 and 7.

    Residue of llama.cpp's output against float64(q8_0(a)) @ float64(W_deq).T, relative to
    sum_k |a_k w_k| per output: measured 1.6e-8 (M = 1) and 1.1e-7 (M = 7), about 2 float32
    ulps at most: the runtime sums d_w * d_a * int_dot per block in float32, in its own order.
    Bounded here at 2**-21 = 4.8e-7. With the plain (unquantized) activations the same
    measure is 1.5e-3..6.5e-3: emulating the activations removes all but the summation order."""
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(7)
    k, n = 1536, 64
    wf = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    for wtype, gt in [(GGML_Q4_0, gguf.GGMLQuantizationType.Q4_0), (GGML_Q8_0, gguf.GGMLQuantizationType.Q8_0)]:
        wb = gguf.quants.quantize(wf, gt)
        w = gguf.quants.dequantize(wb, gt).astype(np.float64)
        for m in (1, 7):
            a = activations(30 + m, m, k)
            y = _mul_mat(ggml, wtype, wb, k, n, a)
            ae = aq.q8_0(t(a)).numpy().astype(np.float64)
            mag = np.abs(ae) @ np.abs(w).T + 1e-30
            assert (np.abs(y - ae @ w.T) / mag).max() <= 2.0**-21
            assert (np.abs(y - a.astype(np.float64) @ w.T) / mag).max() > 1e-4


# ----------------------------------------------------------------------------- onnxruntime


def _matmulnbits_session(ort, onnx, k: int, n: int, bits: int, block: int, accuracy_level: int,
                         q: np.ndarray | None = None, scales: np.ndarray | None = None, zero_point: bool = True):
    """One MatMulNBits node, B a constant initializer. Default weights: the identity (code 1 at
    [i, i], 0 elsewhere, scale 1, uint8 zero point 0)."""
    from onnx import TensorProto, helper, numpy_helper

    kb = -(-k // block)
    if q is None:
        q = np.zeros((n, kb * block), np.uint8)
        idx = np.arange(min(n, k))
        q[idx, idx] = 1
        scales = np.ones((n, kb), np.float32)
    per = 8 // bits
    qq = q.reshape(n, -1, per).astype(np.uint16)
    packed = np.zeros(qq.shape[:2], np.uint16)
    for j in range(per):  # lowest bits first
        packed |= qq[..., j] << (bits * j)
    inits = [numpy_helper.from_array(packed.astype(np.uint8).reshape(n, kb, block * bits // 8), "B"),
             numpy_helper.from_array(scales, "scales")]
    inputs = ["A", "B", "scales"]
    if zero_point:
        inits.append(numpy_helper.from_array(np.zeros((n, -(-kb * bits // 8)), np.uint8), "zp"))
        inputs.append("zp")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], initializer=inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def onnxrt():
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (winq[onnx])")
    onnx = pytest.importorskip("onnx", reason="onnx is not installed (winq[onnx])")
    return ort, onnx


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("block", [16, 32, 64, 128, 256])
def test_ort_matmulnbits_accuracy_level_4_with_identity_weights(onnxrt, bits, block):
    """Output == ort_int8(a, block_size) with atol 0 where ORT quantizes (ORT_INT8_BLOCKS), and
    == a (float path) where it does not (2-bit with block 16 or 256); K = 256, 100, 300 (tails)."""
    ort, onnx = onnxrt
    scheme = aq.ort_activation_scheme(bits, block, 4)
    for k in (256, 100, 300):
        sess = _matmulnbits_session(ort, onnx, k, k, bits, block, 4)
        for m in (1, 3, 17):
            a = activations(40 + m + k, m, k)
            y = sess.run(None, {"A": a})[0]
            want = aq.fake_quantize_activation(t(a), scheme, block_size=block if scheme else None)
            assert np.array_equal(y, want.numpy())
            if scheme:
                assert not np.array_equal(y, a)


def test_ort_accuracy_level_0_leaves_activations_alone(onnxrt):
    ort, onnx = onnxrt
    a = activations(50, 4, 256)
    assert np.array_equal(_matmulnbits_session(ort, onnx, 256, 256, 4, 32, 0).run(None, {"A": a})[0], a)


def test_ort_tiny_block_equals_ours(onnxrt):
    ort, onnx = onnxrt
    a = np.zeros((1, 64), np.float32)
    a[0, 0], a[0, 1], a[0, 40] = 2e-37, -1e-37, 3.0
    y = _matmulnbits_session(ort, onnx, 64, 64, 4, 32, 4).run(None, {"A": a})[0]
    ours = aq.ort_int8(t(a), 32).numpy()
    # the block of normal values is exact; the block whose int8 scale is subnormal (2e-37 / 127) is ours, or zero
    # where the CPU's MLAS kernel flushes subnormals (seen on an AVX512-VNNI machine: onnxruntime 1.32 gave 0)
    assert np.array_equal(y[:, 32:], ours[:, 32:])
    assert np.array_equal(y[:, :32], ours[:, :32]) or not y[:, :32].any(), y[:, :32]


def test_ort_residue_with_zero_point_weights(onnxrt):
    """Random 4-bit weights with the default zero point 8, K = 1536, blocks 32 and 128, M = 1 and 7.

    Residue of ORT's output against float64(ort_int8(a)) @ float64(W).T relative to
    sum_k |a_k w_k|: measured 2.2e-8..2.8e-8 (M = 1) and 1.9e-7..2.6e-7 (M = 7, about 4 ulps):
    MLAS sums s_a s_b (q_a . q_b) per block with unsigned weight codes and subtracts
    (s_a sum q_a)(s_b zp) in float32, a partly cancelling sum. Bounded here at 2**-21 = 4.8e-7.
    Plain activations: 3.3e-3..1.4e-2."""
    ort, onnx = onnxrt
    rng = np.random.default_rng(9)
    k, n = 1536, 64
    for block in (32, 128):
        kb = k // block
        q = rng.integers(0, 16, (n, k)).astype(np.uint8)
        s = (rng.uniform(0.5, 2, (n, kb)) * 0.01).astype(np.float32)
        w = (q.astype(np.float64) - 8) * np.repeat(s, block, 1)
        sess = _matmulnbits_session(ort, onnx, k, n, 4, block, 4, q=q, scales=s, zero_point=False)
        for m in (1, 7):
            a = activations(60 + m, m, k)
            y = sess.run(None, {"A": a})[0]
            ae = aq.ort_int8(t(a), block).numpy().astype(np.float64)
            mag = np.abs(ae) @ np.abs(w).T + 1e-30
            assert (np.abs(y - ae @ w.T) / mag).max() <= 2.0**-21
            assert (np.abs(y - a.astype(np.float64) @ w.T) / mag).max() > 1e-4
