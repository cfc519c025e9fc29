"""winq.formats.containers: the one remap rule q' = m q + a, z' = m z + a, s' = s / m and its exactness check,
for every container of every format (GGUF's per-group offsets included)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from winq.errors import FormatError
from winq.formats import gptq, onnx
from winq.formats.containers import Container, half_mul, remap
from winq.qweight import QuantizedWeight

TABLES = [("gptq", k, c) for k, c in gptq.CONTAINERS.items()] + [("onnx", k, c) for k, c in onnx.CONTAINERS.items()] + \
         [("onnx", k, c) for k, c in onnx.FLOAT_ZERO.items()]


def random_qweight(grid, bits, out, inf, group, seed):
    from winq.qlinear import QuantLinear

    torch.manual_seed(seed)
    lin = QuantLinear(inf, out, bias=False, grid=grid, bits=bits, group_size=group)
    with torch.no_grad():
        lin.weight.normal_()
        lin.init_scales()
        lin.alpha.mul_(torch.exp(torch.randn(lin.alpha.shape)))
        if lin.zero_point is not None:
            lin.zero_point.copy_(torch.randint(0, 2**bits, lin.zero_point.shape))
    return lin.quantized_weight()


@settings(max_examples=40, deadline=None)
@given(i=st.integers(0, len(TABLES) - 1), group=st.sampled_from([-1, 16]), seed=st.integers(0, 2**16))
def test_every_container_is_exact(i, group, seed):
    fmt, (grid, bits), c = TABLES[i]
    qw = random_qweight(grid, bits, 8, 32, group, seed)
    for dtype in (torch.float16, torch.float32):
        r = c.remap(qw, "layer", scale_dtype=dtype)
        assert torch.equal(r.dequantize(), qw.dequantize()), (fmt, grid, bits, dtype)
        assert int(r.codes.min()) >= 0 and int(r.codes.max()) < 2**c.bits
        assert c.float_zero or torch.equal(r.zero, torch.round(r.zero))
        assert r.mul == c.mul


def test_per_group_offsets_move_learned_zeros_onto_a_fixed_zero():
    """GGUF's Q4_0 container: a = 8 - m z per group, so every z' is 8 and q' = m (q - z) + 8."""
    qw = random_qweight("affine", 3, 4, 64, 16, 0)
    m = half_mul(qw)
    r = remap(qw, m, 8 - qw.zero * m, "x", 0, 15)
    assert m == 1 and bool((r.zero == 8).all()) and torch.equal(r.dequantize(), qw.dequantize())
    seq = random_qweight("seq", 2, 4, 64, -1, 1)
    r = remap(seq, half_mul(seq), 8 - seq.zero * 2, "seq", 0, 15)
    assert half_mul(seq) == 2 and set(r.codes.unique().tolist()) <= {5, 7, 9, 11}
    assert torch.equal(r.dequantize(), seq.dequantize())


def test_what_is_not_exact_is_refused():
    codes = torch.zeros(2, 32, dtype=torch.uint8)
    zero = torch.full((2, 1), 1.5)
    odd = torch.full((2, 1), 2.0**-24 * 5, dtype=torch.float16)  # s/2 is not a float16
    qw = QuantizedWeight(codes, odd, zero, "seq", 2, 32)
    with pytest.raises(FormatError, match=r"l: 2 scales are float16 subnormals .* s/2 is not exact in float16"):
        Container(3, mul=2, add=1).remap(qw, "l")
    assert torch.equal(Container(3, mul=2, add=1).remap(qw, "l", torch.float32).dequantize(), qw.dequantize())
    with pytest.raises(FormatError, match="zero points .* are not integers"):
        Container(2).remap(qw, "l")  # a half-integer zero needs m = 2
    with pytest.raises(FormatError, match=r"codes 7\.\.7 do not fit 0\.\.3"):
        Container(2, add=7).remap(QuantizedWeight(codes, odd, torch.ones(2, 1), "ternary", 2, 32), "l")
    assert Container(2, float_zero=True).remap(qw, "l", torch.float32).zero.unique().tolist() == [1.5]
