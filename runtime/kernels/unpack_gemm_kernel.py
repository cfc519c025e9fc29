"""Triton unpack-GEMM: y = x @ dequant(qweight) reading GPTQ-packed int32 words directly.

Same signature and semantics as `unpack_gemm_reference.unpack_gemm` (see its docstring for
the layout): qweight (K_pad * bits / 32, N) int32 holds codes q[k, n] packed along K, lowest
bits first; Wt[k, n] = s[k // g, n] * (q[k, n] - z[k // g, n]); y = x @ Wt.

Unpacking. Code k sits at stream bit k * bits: word row (k * bits) // 32, shift
(k * bits) % 32. For bits 2, 4, 8 that is row k // (32 / bits), shift (k % (32 / bits)) * bits
and no code crosses a word. For 3 bits, codes 10 and 21 of every 32 straddle two words: the
kernel also loads the next word (only where a code straddles: a masked load) and ORs its low
bits in above the first word's top bits, as unsigned 32-bit shifts.

Arithmetic. When a K-tile lies inside one group (BLOCK_K divides group_size, or there is a
single group: per-row), s and z are constant along the tile's K and factor out of the dot:

    sum_k x[m, k] s (q[k, n] - z) = s * (dot(x, q)[m, n] - z * rowsum(x)[m])

q (0..255) is exact in float16 and bfloat16, so tl.dot(x, q) multiplies exactly and
accumulates in float32: the kernel never rounds a weight to 16 bits. Per-row goes further:
dot and rowsum accumulate over all of K and s, z are applied once at the end. A tile that
spans groups (group_size not a multiple of 16) falls back to dequantizing the tile to x's
dtype (one rounding per weight, <= 2^-9 relative for bf16) and tl.dot. float32 x uses
tl.dot with input_precision="ieee" (no TF32).

Decode path (M <= 16) and medium M (<= 256): few (M, N) tiles cannot fill the GPU, so
configs split K across SPLIT_K programs (grid: tiles x SPLIT_K) that atomically add float32
partials into a zeroed float32 buffer, then cast to x's dtype (summation order therefore
varies run to run in the last float32 bit). Large M: SPLIT_K = 1, direct store in x's dtype,
grouped tile order (GROUP_M) for L2 reuse.

Configs are @triton.autotune'd per (M bucket, N, K, bits, group) from three small lists (decode,
medium, large M); a prune step fits BLOCK_K into the group and lowers num_stages until the
pipelined tiles (x tile + int32 word tile, two for 3-bit) fit in ~200 KiB of shared memory. Under
TRITON_INTERPRET=1 (set before this module is imported) a fixed small config is used instead
(autotuning the interpreter would time numpy), overridable with `launch(..., config=...)` or
the env var WINQ_UNPACK_GEMM_CONFIG="BLOCK_M=16,BLOCK_N=32,BLOCK_K=32,SPLIT_K=2".

This module imports triton; `winq.runtime.kernels.unpack_gemm` (the dispatcher) imports it
lazily, so `import winq` and `import winq.runtime` never do.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from winq.errors import WinqError

from .unpack_gemm_reference import check_inputs

INTERPRETED = bool(triton.knobs.runtime.interpret)  # decided once, when @triton.jit ran below

DECODE_MAX_M = 16  # M <= this: decode configs (BLOCK_M = 16, split-K)
MEDIUM_MAX_M = 256  # M <= this: medium configs (split-K allowed); larger: plain tiled GEMM

CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "SPLIT_K", "num_warps", "num_stages")


@triton.jit
def _unpack_gemm_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, y_ptr,
    M, N, K, M_BUCKET,  # M_BUCKET: autotune key only
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn, stride_ym, stride_yn,
    BITS: tl.constexpr,
    CODE_MASK: tl.constexpr,  # 2**BITS - 1
    GROUP_SIZE: tl.constexpr,  # codes per group along K (0 when ONE_GROUP)
    ONE_GROUP: tl.constexpr,  # a single group over K (per-row)
    STRADDLE: tl.constexpr,  # 32 % BITS != 0: codes may cross words (3-bit)
    DOT_F32: tl.constexpr,  # dot in float32 (ieee): float32 x, or bfloat16 x under the interpreter
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
    FACTORED: tl.constexpr,  # every K-tile inside one group: ONE_GROUP or GROUP_SIZE % BLOCK_K == 0
):
    # -- tile of this program: grouped order over (M, N) tiles, axis 1 = K split
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_rows)
    pid_n = (pid % num_pid_in_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    mask_m = offs_m < M
    mask_n = offs_n < N

    # -- K tiles of this split: [t0, t1)
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t0 = pid_k * per_split
    t1 = tl.minimum(t0 + per_split, k_tiles)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rowsum = tl.zeros((BLOCK_M,), dtype=tl.float32)  # per-row path: sum_k x[m, k]

    for t in range(t0, t1):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)  # (BK,)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )  # (BM, BK) x dtype; zero beyond M, K

        # -- unpack codes q (BK, BN) from the bit stream along K
        bitpos = offs_k * BITS
        word = bitpos // 32  # (BK,) word row
        off = (bitpos % 32).to(tl.uint32)  # (BK,) shift inside it
        qmask = mask_k[:, None] & mask_n[None, :]
        w0 = tl.load(q_ptr + word[:, None] * stride_qk + offs_n[None, :] * stride_qn, mask=qmask, other=0)
        q = w0.to(tl.uint32, bitcast=True) >> off[:, None]  # logical shift
        if STRADDLE:  # 3-bit: codes straddling into the next word
            straddle = (off + BITS) > 32  # (BK,)
            w1 = tl.load(
                q_ptr + (word + 1)[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                mask=qmask & straddle[:, None], other=0,
            )
            q = q | (w1.to(tl.uint32, bitcast=True) << ((32 - off) % 32)[:, None])  # w1 = 0 where no straddle
        q = (q & CODE_MASK).to(tl.int32)  # (BK, BN) codes

        if FACTORED:
            if DOT_F32:
                d = tl.dot(x.to(tl.float32), q.to(tl.float32), input_precision="ieee")
            else:
                d = tl.dot(x, q.to(x.dtype))  # (BM, BN) exact products (codes <= 255), float32 accumulate
            rs = tl.sum(x.to(tl.float32), axis=1)  # (BM,)
            if ONE_GROUP:
                acc += d
                rowsum += rs
            else:
                g = (t * BLOCK_K) // GROUP_SIZE
                s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + g * stride_zg + offs_n * stride_zn, mask=mask_n, other=0.0).to(tl.float32)
                acc += s[None, :] * (d - rs[:, None] * z[None, :])
        else:  # the tile spans groups: dequantize it (rounds W to x's dtype)
            g = offs_k // GROUP_SIZE  # (BK,)
            s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=qmask,
                        other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g[:, None] * stride_zg + offs_n[None, :] * stride_zn, mask=qmask,
                        other=0.0).to(tl.float32)
            wt = (s * (q.to(tl.float32) - z)).to(x.dtype)  # (BK, BN)
            if DOT_F32:
                acc += tl.dot(x.to(tl.float32), wt.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(x, wt)

    if ONE_GROUP:
        s = tl.load(s_ptr + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs_n * stride_zn, mask=mask_n, other=0.0).to(tl.float32)
        acc = s[None, :] * (acc - rowsum[:, None] * z[None, :])

    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    y_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:  # y is a zeroed float32 buffer; the splits add into it
        tl.atomic_add(y_ptrs, acc, mask=y_mask, sem="relaxed")


# ---------------------------------------------------------------------------- configs


def _cfg(bm, bn, bk, split_k=1, group_m=8, warps=4, stages=3):
    return triton.Config(
        dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, SPLIT_K=split_k), num_warps=warps, num_stages=stages
    )


# M <= 16: one row of M tiles; parallelism comes from N tiles x K splits.
DECODE_CONFIGS = [
    _cfg(16, 64, 128, split_k=4, group_m=1, stages=3),
    _cfg(16, 64, 128, split_k=8, group_m=1, stages=3),
    _cfg(16, 128, 128, split_k=4, group_m=1, stages=3),
    _cfg(16, 128, 64, split_k=8, group_m=1, stages=4),
    _cfg(16, 64, 256, split_k=2, group_m=1, stages=3),
    _cfg(16, 32, 128, split_k=8, group_m=1, stages=4),
    _cfg(16, 128, 128, split_k=1, group_m=1, stages=3),
]
# 16 < M <= 256: moderate tiles, split-K still allowed.
MEDIUM_CONFIGS = [
    _cfg(32, 64, 128, split_k=4, stages=3),
    _cfg(64, 64, 64, split_k=2, stages=4),
    _cfg(64, 128, 64, split_k=2, stages=3),
    _cfg(64, 64, 128, split_k=1, stages=3),
    _cfg(128, 128, 64, split_k=1, warps=8, stages=3),
    _cfg(128, 64, 64, split_k=4, stages=3),
]
# M > 256: compute-bound tiles, no split.
LARGE_CONFIGS = [
    _cfg(128, 128, 64, warps=8, stages=3),
    _cfg(128, 256, 32, warps=8, stages=3),
    _cfg(128, 64, 64, warps=4, stages=4),
    _cfg(64, 128, 64, warps=4, stages=4),
    _cfg(128, 128, 32, warps=4, stages=4),
    _cfg(64, 64, 64, warps=4, stages=4),
]

# the interpreter runs one small tile config (numpy per tile; autotuning it is pointless)
INTERPRET_DECODE_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, SPLIT_K=2)
INTERPRET_GEMM_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, SPLIT_K=1)


def _fit_block_k(block_k: int, group_size: int, one_group: bool) -> int:
    """Largest BLOCK_K' <= block_k that keeps every K-tile inside one group (>= 16, tl.dot's minimum);
    block_k unchanged when none exists (the kernel then dequantizes tiles that span groups)."""
    if _factored(block_k, group_size, one_group):
        return block_k
    p2 = group_size & -group_size  # largest power of two dividing group_size
    return min(block_k, p2) if p2 >= 16 else block_k


def _factored(block_k: int, group_size: int, one_group: bool) -> bool:
    return one_group or group_size % block_k == 0


SMEM_BUDGET = 200 * 1024  # bytes of pipelined tiles per program (H100/H200 allow 227 KiB)


def smem_estimate(kw: dict, stages: int, x_bytes: int, straddle: bool) -> int:
    """Shared memory of the software pipeline: per stage an x tile (BM, BK) and one int32 word tile
    (BK, BN) (two for 3-bit: the straddle words), times num_stages."""
    words = 2 if straddle else 1
    return stages * (kw["BLOCK_M"] * kw["BLOCK_K"] * x_bytes + words * kw["BLOCK_K"] * kw["BLOCK_N"] * 4)


def _prune(configs, named_args, **kwargs):
    """Autotune pre-pass: shrink BLOCK_K so tiles stay inside a group and set FACTORED; lower
    num_stages (down to 2) until the pipeline fits SMEM_BUDGET, dropping configs that never fit
    (keeping the smallest if none does); drop duplicates."""
    def arg(name):
        return kwargs[name] if name in kwargs else named_args[name]

    gs, one, straddle = arg("GROUP_SIZE"), arg("ONE_GROUP"), arg("STRADDLE")
    x = named_args.get("x_ptr")
    x_bytes = x.element_size() if x is not None else 2
    out, seen, smallest = [], set(), None
    for c in configs:
        bk = _fit_block_k(c.kwargs["BLOCK_K"], gs, one)
        kw = dict(c.kwargs, BLOCK_K=bk, FACTORED=_factored(bk, gs, one))
        stages = c.num_stages
        while stages > 2 and smem_estimate(kw, stages, x_bytes, straddle) > SMEM_BUDGET:
            stages -= 1
        cfg = triton.Config(kw, num_warps=c.num_warps, num_stages=stages)
        if smem_estimate(kw, stages, x_bytes, straddle) > SMEM_BUDGET:
            if smallest is None or smem_estimate(kw, 2, x_bytes, straddle) < smem_estimate(smallest.kwargs, 2, x_bytes,
                                                                                           straddle):
                smallest = cfg
            continue
        key = (tuple(sorted(kw.items())), c.num_warps, stages)
        if key not in seen:
            seen.add(key)
            out.append(cfg)
    return out or [smallest]


_AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE", "ONE_GROUP"]


def _tuned(configs, split):
    return triton.autotune(
        configs=configs, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune},
        reset_to_zero=["y_ptr"] if split else None,
    )(_unpack_gemm_kernel)


_decode_kernel = _tuned(DECODE_CONFIGS, split=True)
_medium_kernel = _tuned(MEDIUM_CONFIGS, split=True)
_large_kernel = _tuned(LARGE_CONFIGS, split=False)


def _parse_config(text: str) -> dict:
    """'BLOCK_M=16,BLOCK_N=32,...' -> dict; names must be in CONFIG_KEYS."""
    cfg = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in CONFIG_KEYS:
            raise WinqError(f"WINQ_UNPACK_GEMM_CONFIG: bad item {item!r}; use NAME=int with NAME in "
                            f"{', '.join(CONFIG_KEYS)}")
        cfg[name.strip()] = int(value)
    return cfg


def _full_config(config: dict, m: int) -> dict:
    base = dict(INTERPRET_DECODE_CONFIG if m <= DECODE_MAX_M else INTERPRET_GEMM_CONFIG)
    unknown = set(config) - set(CONFIG_KEYS)
    if unknown:
        raise WinqError(f"unpack_gemm config: unknown keys {sorted(unknown)}; valid: {', '.join(CONFIG_KEYS)}")
    base.update(config)
    for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        v = base[name]
        if v < 16 or v & (v - 1):
            raise WinqError(f"unpack_gemm config: {name}={v} must be a power of two >= 16")
    if base["SPLIT_K"] < 1 or base["GROUP_M"] < 1:
        raise WinqError(f"unpack_gemm config: SPLIT_K={base['SPLIT_K']} and GROUP_M={base['GROUP_M']} must be >= 1")
    return base


# ---------------------------------------------------------------------------- wrapper


def _dot_f32(dtype: torch.dtype) -> bool:
    """float32 x dots in float32. So does bfloat16 x under the interpreter (Triton 3.9), which stores
    bfloat16 as uint16 and casts integers to it bit-wise (tl.dot of bf16 codes would be garbage
    there); the math is the same as the GPU's bf16 dot: exact products, float32 accumulation."""
    return dtype == torch.float32 or (INTERPRETED and dtype == torch.bfloat16)


def launch(x, qweight, scales, zeros, bits, group_size, config: dict | None = None) -> torch.Tensor:
    """`unpack_gemm` with an optional fixed launch config (BLOCK_M/N/K, GROUP_M, SPLIT_K,
    num_warps, num_stages) instead of autotuning; tests use it to pin the code path.

    config=None: autotuned on CUDA; under TRITON_INTERPRET=1 the fixed INTERPRET_*_CONFIG
    with BLOCK_K fitted to the group (or WINQ_UNPACK_GEMM_CONFIG when set).
    """
    M, N, K, G = check_inputs(x, qweight, scales, zeros, bits, group_size)
    if x.device.type != "cuda" and not INTERPRETED:
        raise WinqError(
            f"unpack_gemm (Triton): tensors are on {x.device}; the compiled kernel needs CUDA tensors "
            "(set TRITON_INTERPRET=1 before importing triton to run it on CPU, or use unpack_gemm_reference)"
        )
    if M == 0 or N == 0:
        return torch.zeros((M, N), dtype=x.dtype, device=x.device)
    one_group = G == 1
    gs_const = 0 if one_group else group_size  # no recompilation per K for per-row
    if config is None and os.environ.get("WINQ_UNPACK_GEMM_CONFIG"):
        config = _parse_config(os.environ["WINQ_UNPACK_GEMM_CONFIG"])
    if config is None and INTERPRETED:
        config = _full_config({}, M)
        config["BLOCK_K"] = _fit_block_k(config["BLOCK_K"], group_size, one_group)
    if config is not None:
        config = _full_config(config, M)
        split = config["SPLIT_K"] > 1
    else:
        split = M <= MEDIUM_MAX_M  # decode and medium lists contain split-K configs

    # float32 output buffer (cast by torch afterwards) for split-K atomics, and for bfloat16 under the
    # interpreter, whose in-kernel float32 -> bfloat16 cast truncates instead of rounding to nearest
    out_f32 = split or x.dtype == torch.float32 or (INTERPRETED and x.dtype == torch.bfloat16)
    y = torch.zeros((M, N), dtype=torch.float32, device=x.device) if split else torch.empty(
        (M, N), dtype=torch.float32 if out_f32 else x.dtype, device=x.device
    )
    m_bucket = min(triton.next_power_of_2(M), 4096)
    args = (
        x, qweight, scales, zeros, y, M, N, K, m_bucket,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
        zeros.stride(0), zeros.stride(1), y.stride(0), y.stride(1),
    )
    consts = dict(BITS=bits, CODE_MASK=2**bits - 1, GROUP_SIZE=gs_const, ONE_GROUP=one_group, STRADDLE=32 % bits != 0,
                  DOT_F32=_dot_f32(x.dtype))

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        if config is not None:
            meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
            meta["FACTORED"] = _factored(meta["BLOCK_K"], gs_const, one_group)
            launch_opts = {k: config[k] for k in ("num_warps", "num_stages") if k in config}
            _unpack_gemm_kernel[grid(meta)](*args, **consts, **meta, **launch_opts)
        else:
            kernel = _decode_kernel if M <= DECODE_MAX_M else _medium_kernel if M <= MEDIUM_MAX_M else _large_kernel
            kernel[grid](*args, **consts)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def unpack_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                group_size: int) -> torch.Tensor:
    """y = x @ Wt, Wt the dequantized GPTQ weight; Triton, CUDA tensors (CPU under TRITON_INTERPRET=1).

    x        float16 | bfloat16 | float32  (M, K)                  activations, any strides
    qweight  int32                         (K_pad * bits / 32, N)  codes q[k, n] packed along K,
                                                                   lowest bits first (winq.packing);
                                                                   K_pad = K rounded up to period(bits)
    scales   float16                       (G, N), G = K / group_size
    zeros    float32 | float16             (G, N)                  zero points (integer or half-integer)
    bits     2 | 3 | 4 | 8
    group_size  codes per group along K (K for per-row)
    returns  x.dtype                       (M, N)                  float32 accumulation, cast once

    W[n, k] = scales[k // g, n] * (q[k, n] - zeros[k // g, n]); y = x @ W^T. Shapes are checked
    (WinqError with the sizes); launch config autotuned per (M bucket, N, K, bits, group).
    """
    return launch(x, qweight, scales, zeros, bits, group_size)
