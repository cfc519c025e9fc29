"""Grids, QuantLinear and QuantizedWeight (ARCHITECTURE §2-3).

The reference quantizers below are written from the table in winq/grids.py and
ARCHITECTURE §3 with plain torch; they deliberately import nothing from winq.grids.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import winq
from winq import ConfigError, QuantConfig, QuantizedWeight, QuantLinear
from winq.grids import KGRIDS

# the uniform grids; nl4 (IQ4_NL levels, groups of 32 only) has its own reference in test_nl4.py
PAIRS = [(g, b) for g, bs in winq.GRID_BITS.items() for b in bs
         if g != "nl4" and g not in KGRIDS]  # K grids: test_kquant.py
SEQ_CLIP = 0.99  # ParetoQ's clip_val = 1 - 1e-2


def _pair_id(p):
    return f"{p[0]}{p[1]}"


# ---------------------------------------------------------------------------------------
# independent reference
# ---------------------------------------------------------------------------------------
def fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(torch.float32)


def ref_init_alpha(grid: str, bits: int, w: torch.Tensor) -> torch.Tensor:
    """ARCHITECTURE §3 initialisation, per group: w (out, G, g) -> (out, G)."""
    if grid == "lsq":
        a = w.abs().amax(-1) / (2 ** (bits - 1) - 1)
    elif grid in ("seq", "ternary"):
        a = w.abs().amax(-1)
    elif grid == "binary":
        a = w.abs().mean(-1)
    else:
        a = (w.amax(-1).clamp(min=0) - w.amin(-1).clamp(max=0)) / (2**bits - 1)
    return a.clamp(min=1e-5)


def ref_fake_weight(grid: str, bits: int, w: torch.Tensor, alpha: torch.Tensor, zero=None, group_size=-1):
    """W_q for w (out, in), alpha / zero (out, G): the docstring table, fp16 deployment scale."""
    out, inf = w.shape
    g = inf if group_size == -1 else group_size
    wg = w.reshape(out, inf // g, g)
    a = alpha.clamp(min=1e-5)[..., None]
    x = wg / a
    if grid == "lsq":
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        wq = fp16(a) * torch.clamp(torch.round(x), lo, hi)
    elif grid == "seq":
        wq = fp16(a * 0.5) * (torch.round(torch.clamp(x, -SEQ_CLIP, SEQ_CLIP) * 2 - 0.5) + 0.5)
    elif grid == "ternary":
        wq = fp16(a * (2.0 / 3.0)) * torch.round(torch.clamp(x, -SEQ_CLIP, SEQ_CLIP) * 1.5)
    elif grid == "binary":
        wq = fp16(a * 2.0) * torch.where(x >= 0, 0.5, -0.5)
    elif grid == "affine":
        z = torch.clamp(torch.round(zero), 0, 2**bits - 1)[..., None]
        q = torch.clamp(torch.round(x) + z, 0, 2**bits - 1)
        wq = fp16(a) * (q - z)
    else:  # pragma: no cover
        raise AssertionError(grid)
    return wq.reshape(out, inf)


def make_layer(grid, bits, out_f, in_f, group_size=-1, wscale=1.0, seed=0, bias=True):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(wscale)
    return lin, QuantLinear.from_linear(lin, grid, bits, group_size)


def code_range(grid, bits):
    if grid == "ternary":
        return 0, 2
    if grid == "binary":
        return 0, 1
    return 0, 2**bits - 1


# ---------------------------------------------------------------------------------------
# property test: QuantizedWeight.dequantize() == fake_weight() bit for bit
# ---------------------------------------------------------------------------------------
@st.composite
def layer_cases(draw):
    grid, bits = draw(st.sampled_from(PAIRS))
    out_f = draw(st.integers(1, 9))
    in_f = draw(st.one_of(st.sampled_from([1, 3, 7, 13]), st.integers(1, 48)))
    divisors = [d for d in range(1, in_f + 1) if in_f % d == 0]
    group_size = draw(st.one_of(st.just(-1), st.sampled_from(divisors)))
    wscale = draw(st.sampled_from([1e-3, 0.02, 0.3, 1.0, 7.0, 150.0]))
    alpha_mult = draw(st.sampled_from([None, 0.3, 0.77, 1.6]))  # None: keep the init
    seed = draw(st.integers(0, 2**16))
    bias = draw(st.booleans())
    return grid, bits, out_f, in_f, group_size, wscale, alpha_mult, seed, bias


@settings(max_examples=60, deadline=None)
@given(layer_cases())
def test_dequantize_equals_fake_weight(case):
    grid, bits, out_f, in_f, group_size, wscale, alpha_mult, seed, bias = case
    lin, m = make_layer(grid, bits, out_f, in_f, group_size, wscale, seed, bias)
    if alpha_mult is not None:  # move alpha away from the init so that clipping happens too
        with torch.no_grad():
            m.alpha.mul_(alpha_mult)
            if m.zero_point is not None:
                m.zero_point.add_(
                    torch.randint(-1, 2, m.zero_point.shape, generator=torch.Generator().manual_seed(seed))
                )
    g = in_f if group_size == -1 else group_size
    assert m.group_size == g

    qw = QuantizedWeight.from_module(m)
    fw = m.fake_weight()
    assert fw.dtype == torch.float32 and fw.shape == (out_f, in_f)
    assert torch.equal(qw.dequantize(), fw)

    lo, hi = code_range(grid, bits)
    assert qw.codes.dtype == torch.uint8 and qw.codes.shape == (out_f, in_f)
    assert int(qw.codes.min()) >= lo and int(qw.codes.max()) <= hi
    assert qw.scale.dtype == torch.float16 and tuple(qw.scale.shape) == (out_f, in_f // g)
    assert qw.zero.dtype == torch.float32 and tuple(qw.zero.shape) == (out_f, in_f // g)
    assert (qw.grid, qw.bits, qw.group_size) == (grid, bits, g)
    # the level table: q - z takes only the grid's values
    lev = qw.levels
    if grid == "lsq":
        assert lev.min() >= -(2 ** (bits - 1)) and lev.max() <= 2 ** (bits - 1) - 1
        assert torch.equal(qw.zero, torch.full_like(qw.zero, 2 ** (bits - 1)))
    elif grid == "seq":
        assert set(lev.unique().tolist()) <= {-1.5, -0.5, 0.5, 1.5}
    elif grid == "ternary":
        assert set(lev.unique().tolist()) <= {-1.0, 0.0, 1.0}
    elif grid == "binary":
        assert set(lev.unique().tolist()) <= {-0.5, 0.5}
    else:
        assert torch.equal(qw.zero, qw.zero.round()) and qw.zero.min() >= 0 and qw.zero.max() <= 2**bits - 1
    # the layer itself: bias untouched, eval forward is F.linear with the fake-quant weight
    if bias:
        assert torch.equal(m.bias, lin.bias)
    m.eval()
    x = torch.randn(3, in_f, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(m(x), F.linear(x, qw.dequantize(), m.bias))


# ---------------------------------------------------------------------------------------
# independent reference forward + init
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("pair", PAIRS, ids=_pair_id)
@pytest.mark.parametrize("in_f,group_size", [(16, -1), (12, 4), (7, -1), (13, 13), (24, 8)])
def test_reference_forward(pair, in_f, group_size):
    grid, bits = pair
    out_f = 5
    for seed, alpha_mult in [(1, 1.0), (2, 0.45), (3, 1.3)]:
        lin, m = make_layer(grid, bits, out_f, in_f, group_size, wscale=0.7, seed=seed)
        g = in_f if group_size == -1 else group_size
        w = lin.weight.detach().float()
        # init alpha as ARCHITECTURE §3 says
        ref_alpha = ref_init_alpha(grid, bits, w.reshape(out_f, in_f // g, g))
        torch.testing.assert_close(m.alpha.detach(), ref_alpha, rtol=1e-6, atol=0)
        if grid == "affine":
            lo = w.reshape(out_f, in_f // g, g).amin(-1).clamp(max=0)
            ref_zero = torch.round(-lo / m.alpha.detach()).clamp(0, 2**bits - 1)
            assert torch.equal(m.zero_point.detach(), ref_zero)
        with torch.no_grad():
            m.alpha.mul_(alpha_mult)
        zero = m.zero_point.detach() if m.zero_point is not None else None
        ref = ref_fake_weight(grid, bits, w, m.alpha.detach(), zero, group_size)
        assert torch.equal(m.fake_weight().detach(), ref), (seed, alpha_mult)
        # the reference grid actually clips / uses more than one level (test is not vacuous)
        assert ref.unique().numel() >= 2


@pytest.mark.parametrize("pair", PAIRS, ids=_pair_id)
def test_fake_weight_is_multiple_of_fp16_scale(pair):
    grid, bits = pair
    lin, m = make_layer(grid, bits, 6, 24, group_size=8, wscale=0.37, seed=11)
    with torch.no_grad():
        m.alpha.mul_(torch.linspace(0.6, 1.4, 3))  # alpha values that are not fp16 numbers
    fw = m.fake_weight().detach().reshape(6, 3, 8)
    s = QuantizedWeight.from_module(m).scale
    assert s.dtype == torch.float16
    s32 = s.to(torch.float32)[..., None]
    lev = fw / s32
    # every value is an exact multiple of the fp16 scale, the multiple being a grid level
    assert torch.equal(lev * s32, fw)
    half_steps = {"seq": True, "binary": True}.get(grid, False)
    k = lev * 2 if half_steps else lev
    assert torch.equal(k, k.round())
    # and the fp16 scale is what the grid prescribes from alpha (rounded to fp16, not the fp32 value)
    factor = {"lsq": 1.0, "seq": 0.5, "ternary": 2.0 / 3.0, "binary": 2.0, "affine": 1.0}[grid]
    assert torch.equal(s, (m.alpha.detach() * factor).to(torch.float16))
    # fp16 rounding really happened: the fp32 scale would give different values
    assert not torch.equal((m.alpha.detach() * factor)[..., None] * lev, fw)


# ---------------------------------------------------------------------------------------
# gradients (straight-through estimator)
# ---------------------------------------------------------------------------------------
def _layer_with(grid, bits, x_row: torch.Tensor, alpha: float) -> QuantLinear:
    """One-row layer with W = x * alpha exactly (alpha a power of two: fp16-exact, no rounding)."""
    m = QuantLinear(x_row.numel(), 1, bias=False, grid=grid, bits=bits)
    with torch.no_grad():
        m.alpha.fill_(alpha)
        m.weight.copy_(x_row[None] * alpha)
    return m


@pytest.mark.parametrize(
    "grid,bits,inside,outside",
    [
        ("lsq", 4, [-7.9, -3.3, -0.2, 0.4, 2.6, 6.9], [-9.0, -12.0, 8.0, 9.5, 20.0]),
        ("lsq", 3, [-3.9, -1.2, 0.3, 2.8], [-5.0, 4.0, 6.0]),
        ("lsq", 8, [-127.0, -3.3, 0.4, 126.6], [-130.0, 128.0, 300.0]),
        ("seq", 2, [-0.98, -0.6, -0.1, 0.3, 0.8, 0.95], [-1.5, -0.995, 0.995, 3.0]),
        ("ternary", 2, [-0.98, -0.5, 0.0, 0.3, 0.97], [-2.0, -0.995, 0.995, 1.7]),
        ("binary", 1, [-0.9, -0.2, 0.1, 0.99], [-1.5, 1.2, 4.0]),
        ("affine", 4, [-5.2, -0.4, 0.3, 6.9], [-12.0, 12.0]),
    ],
)
def test_ste_gradient_masks(grid, bits, inside, outside):
    xs = torch.tensor(inside + outside)
    m = _layer_with(grid, bits, xs, alpha=0.25)
    if m.zero_point is not None:  # affine: z = 8, codes 0..15, levels -8..7
        with torch.no_grad():
            m.zero_point.fill_(8.0)
    torch.manual_seed(0)
    gout = torch.rand(1, xs.numel()) + 0.5  # positive, no accidental cancellation
    (m.fake_weight() * gout).sum().backward()
    gw = m.weight.grad[0]
    n_in = len(inside)
    assert (gw[:n_in] != 0).all(), gw
    assert (gw[n_in:] == 0).all(), gw
    assert m.alpha.grad is not None and m.alpha.grad.abs().sum() > 0
    assert torch.isfinite(m.alpha.grad).all()


def paretoq_lsq_alpha_grad(w, alpha, gout, bits):
    """ParetoQ LsqBinaryTernaryExtension.backward (per row), without its constant grad_scale."""
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    x = w / alpha
    small = (x < qn).float()
    big = (x > qp).float()
    mid = 1.0 - small - big
    return ((small * qn + big * qp + mid * (torch.round(x) - x)) * gout).sum(-1, keepdim=True), mid * gout


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_lsq_alpha_grad_matches_paretoq(bits):
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    gen = torch.Generator().manual_seed(bits)
    out_f, in_f = 4, 40
    x = (torch.rand(out_f, in_f, generator=gen) * 2 - 1) * (qp * 1.8)
    assert ((x > qp) | (x < qn)).any() and ((x <= qp) & (x >= qn)).any()
    alpha = fp16(torch.rand(out_f, 1, generator=gen) * 0.1 + 0.01)  # fp16-exact: s == alpha
    w = x * alpha
    m = QuantLinear(in_f, out_f, bias=False, grid="lsq", bits=bits)
    with torch.no_grad():
        m.weight.copy_(w)
        m.alpha.copy_(alpha)
    gout = torch.randn(out_f, in_f, generator=gen) * (0.3 / qp)  # row sums O(1): atol 1e-6 is meaningful in fp32
    (m.fake_weight() * gout).sum().backward()
    ref_ga, ref_gw = paretoq_lsq_alpha_grad(m.weight.detach(), alpha, gout, bits)
    torch.testing.assert_close(m.alpha.grad, ref_ga, atol=1e-6, rtol=0)
    torch.testing.assert_close(m.weight.grad, ref_gw, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [3, 4])
def test_lsq_clip_band_matches_paretoq(bits):
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    x = torch.tensor([[qp + 0.3, qn - 0.3, 0.2]])
    m = _layer_with("lsq", bits, x[0], alpha=0.25)
    gout = torch.ones_like(x)
    (m.fake_weight() * gout).sum().backward()
    ref_ga, ref_gw = paretoq_lsq_alpha_grad(x * 0.25, torch.tensor([[0.25]]), gout, bits)
    assert torch.equal(m.weight.grad, ref_gw)  # ParetoQ: [0, 0, 1]
    torch.testing.assert_close(m.alpha.grad, ref_ga, atol=1e-6, rtol=0)  # ParetoQ: Qp + Qn - 0.2


def test_seq_gradients_match_paretoq():
    """StretchedElasticQuant (2-bit) backward, without ParetoQ's constant grad_scale."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.rand(3, 30, generator=gen) * 2 - 1) * 1.4
    alpha = fp16(torch.rand(3, 1, generator=gen) * 0.2 + 0.05)
    m = QuantLinear(30, 3, bias=False, grid="seq", bits=2)
    with torch.no_grad():
        m.weight.copy_(x * alpha)
        m.alpha.copy_(alpha)
    x = m.weight.detach() / alpha
    gout = torch.randn(3, 30, generator=gen) * 0.1
    (m.fake_weight() * gout).sum().backward()
    clip = 1 - 1e-2
    small, big = (x < -clip).float(), (x > clip).float()
    mid = 1 - small - big
    qw = (torch.round(torch.clamp(x, -clip, clip) * 2 - 0.5) + 0.5) / 2
    ref_ga = ((small * -0.75 + big * 0.75 + mid * (qw - x)) * gout).sum(-1, keepdim=True)
    assert small.any() and big.any() and mid.any()
    torch.testing.assert_close(m.alpha.grad, ref_ga, atol=1e-6, rtol=0)
    # s = fp16(alpha/2) = alpha/2 exactly (alpha fp16, power-of-two factor): dW_q/dW = 1 in the middle
    torch.testing.assert_close(m.weight.grad, mid * gout, atol=1e-6, rtol=0)


def test_binary_gradients():
    """dW as ParetoQ (g inside |W/alpha| <= 1, 0 outside); d alpha is the true derivative of
    alpha * sign(W): sign(W) - W/alpha inside, sign(W) outside (ParetoQ uses sign(W) everywhere;
    documented in winq/grids.py)."""
    x = torch.tensor([[0.3, -0.6, 0.8, 1.5]])
    m = _layer_with("binary", 1, x[0], alpha=0.5)
    gout = torch.ones_like(x)
    (m.fake_weight() * gout).sum().backward()
    mid = (x.abs() <= 1).float()
    assert torch.equal(m.weight.grad, mid * gout)
    ref = ((torch.sign(x) - mid * x) * gout).sum(-1, keepdim=True)
    torch.testing.assert_close(m.alpha.grad, ref, atol=1e-6, rtol=0)


def test_alpha_gradient_flows_through_forward():
    """A loss on the layer output reaches weight, alpha, zero_point (affine) and bias."""
    for grid, bits in PAIRS:
        lin, m = make_layer(grid, bits, 4, 8, seed=3)
        m.eval()
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
        m(x).pow(2).sum().backward()
        assert m.weight.grad.abs().sum() > 0, grid
        assert m.alpha.grad.abs().sum() > 0, grid
        assert m.bias.grad.abs().sum() > 0, grid
        if grid == "affine":
            assert m.zero_point.grad is not None and torch.isfinite(m.zero_point.grad).all()


# ---------------------------------------------------------------------------------------
# WinQ noise
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("pair", [("lsq", 4), ("seq", 2), ("binary", 1), ("affine", 3)], ids=_pair_id)
def test_noise_train_vs_eval(pair):
    from winq.noise import NoiseSource

    grid, bits = pair
    lin, m = make_layer(grid, bits, 6, 16, wscale=0.5, seed=7)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(8))
    m.noise_sigma = 1e-3
    net = torch.nn.Sequential(m)

    def run_train(seed, n=2):
        src = NoiseSource(net, seed)
        net.train()
        with torch.no_grad():
            ys = [net(x) for _ in range(n)]
        src.remove()
        return ys

    src = NoiseSource(net, 0)
    net.eval()
    with torch.no_grad():
        e1, e2 = net(x), net(x)
    # eval: deterministic, no noise drawn, exactly F.linear with the fake-quant weight
    assert torch.equal(e1, e2)
    assert torch.equal(e1, F.linear(x, m.fake_weight(), m.bias))
    assert src.draws == 0
    src.remove()

    t1 = run_train(123)
    t2 = run_train(123)
    t3 = run_train(124)
    assert not torch.equal(t1[0], e1)
    assert not torch.equal(t1[0], t1[1])  # fresh noise each forward
    assert torch.equal(t1[0], t2[0]) and torch.equal(t1[1], t2[1])  # reproducible from the seed
    assert not torch.equal(t1[0], t3[0])
    # noise is small: sigma 1e-3 on W and alpha
    assert (t1[0] - e1).abs().max() < 0.2

    # sigma 0 in train mode is the eval forward
    m.noise_sigma = 0.0
    assert torch.equal(run_train(5)[0], e1)


# ---------------------------------------------------------------------------------------
# WinQ reset
# ---------------------------------------------------------------------------------------
def _reinit_layer(grid, bits):
    lin, m = make_layer(grid, bits, 5, 12, group_size=4, wscale=0.4, seed=9)
    with torch.no_grad():
        m.alpha.mul_(0.8)  # some clipping, so that Q(W) != W in a visible way
    w0 = m.weight.detach().clone()
    q0 = m.fake_weight().detach().clone()
    assert not torch.equal(w0, q0)
    return m, w0, q0


@pytest.mark.parametrize("pair", PAIRS, ids=_pair_id)
def test_reinit_mix(pair):
    m, w0, q0 = _reinit_layer(*pair)
    alpha0 = m.alpha.detach().clone()
    m.reinit(0.2)
    torch.testing.assert_close(m.weight.detach(), 0.2 * w0 + 0.8 * q0, rtol=1e-6, atol=1e-7)
    assert not torch.equal(m.weight.detach(), w0)
    assert torch.equal(m.alpha.detach(), alpha0)  # the reset moves W only
    m.reinit(1.0)  # a = 1 keeps W
    torch.testing.assert_close(m.weight.detach(), 0.2 * w0 + 0.8 * q0, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("pair", PAIRS, ids=_pair_id)
def test_reinit_zero_projects_onto_grid(pair):
    m, w0, q0 = _reinit_layer(*pair)
    m.reinit(0.0)
    assert torch.equal(m.weight.detach(), q0)  # W <- Q(W)
    assert torch.equal(m.fake_weight().detach(), q0)  # fixed point: quantizing again changes nothing
    codes = QuantizedWeight.from_module(m).codes.clone()
    m.reinit(0.0)
    assert torch.equal(m.weight.detach(), q0)
    assert torch.equal(QuantizedWeight.from_module(m).codes, codes)


@pytest.mark.parametrize("pair", PAIRS, ids=_pair_id)
def test_quantization_is_idempotent(pair):
    """Q(Q(W)) == Q(W) with the same scales: what reinit(0) relies on (set W by hand here)."""
    m, w0, q0 = _reinit_layer(*pair)
    codes = QuantizedWeight.from_module(m).codes.clone()
    with torch.no_grad():
        m.weight.copy_(q0)
    assert torch.equal(m.fake_weight().detach(), q0)
    assert torch.equal(QuantizedWeight.from_module(m).codes, codes)


# ---------------------------------------------------------------------------------------
# configuration errors
# ---------------------------------------------------------------------------------------
def test_config_errors():
    with pytest.raises(ConfigError, match=r"bits=7") as e:
        QuantConfig(bits=7, group_size=-1, embed="float")
    assert isinstance(e.value, winq.WinqError) and isinstance(e.value, ValueError)
    for b in (1, 2, 3, 4, 5, 6, 8):  # the message lists the valid bit widths
        assert str(b) in str(e.value)

    with pytest.raises(ConfigError, match=r"valid pairs") as e:
        QuantConfig(bits=2, grid="lsq", group_size=-1, embed="float")
    msg = str(e.value)
    assert "bits=2" in msg and "'lsq'" in msg
    for g in winq.GRIDS:
        assert f"{g}:" in msg
    assert "lsq: 3, 4, 5, 8" in msg and "seq: 2" in msg and "binary: 1" in msg and "q6_k: 6" in msg
    assert "affine: 2, 3, 4, 8" in msg

    with pytest.raises(ConfigError, match=r"unknown grid 'nf4'.*lsq.*seq.*ternary.*binary.*affine"):
        QuantConfig(bits=4, grid="nf4", group_size=-1, embed="float")

    with pytest.raises(ConfigError, match=r"group_size=0"):
        QuantConfig(bits=4, group_size=0, embed="float")
    with pytest.raises(ConfigError, match=r"group_size=-2"):
        QuantConfig(bits=4, group_size=-2, embed="float")

    # the same checks guard the layer and the QuantizedWeight
    with pytest.raises(ConfigError, match=r"bits=3"):
        QuantLinear(8, 4, grid="seq", bits=3)
    with pytest.raises(ConfigError, match=r"group_size=3 does not divide in_features=8"):
        QuantLinear(8, 4, grid="lsq", bits=4, group_size=3)


@pytest.mark.parametrize("bits,grid", [(1, "binary"), (2, "seq"), (3, "lsq"), (4, "lsq"), (8, "lsq")])
def test_config_default_grid(bits, grid):
    c = QuantConfig(bits=bits, group_size=-1, embed="float")
    assert c.grid == grid
    assert QuantConfig.from_dict(c.to_dict()) == c
