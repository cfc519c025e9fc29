"""The nl4 grid: llama.cpp's IQ4_NL levels times a learned fp16 scale per 32 weights (winq/grids.py).

The reference below is written from the format description (16 fixed levels, x = d * kvalues[q], nearest
level with ties to the upper one) in plain torch; it imports nothing from winq.grids except to compare.
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
from winq.errors import WinqError

KV = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]  # kvalues_iq4nl


def fp16(t):
    return t.to(torch.float16).to(torch.float32)


def ref_index(x: torch.Tensor) -> torch.Tensor:
    """Nearest level's index of x (in units of the scale); equal distances go to the upper level."""
    kv = torch.tensor(KV, dtype=torch.float64)
    d = (x.double()[..., None] - kv).abs()  # (..., 16)
    best = d.min(-1, keepdim=True).values
    idx = torch.arange(16).expand_as(d)
    return torch.where(d == best, idx, -1).amax(-1)  # the largest index at the minimal distance


def signed_clamp(alpha: torch.Tensor) -> torch.Tensor:
    """|alpha| >= 1e-5 keeping the sign (a negative scale is the mirrored lattice, as llama.cpp's negative d)."""
    return torch.where(alpha < 0, alpha.clamp(max=-1e-5), alpha.clamp(min=1e-5))


def ref_fake_weight(w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    out, inf = w.shape
    a = signed_clamp(alpha)[..., None]
    x = w.reshape(out, inf // 32, 32) / a
    lev = torch.tensor(KV, dtype=torch.float32)[ref_index(x.clamp(-127, 113))]
    return (fp16(a) * lev).reshape(out, inf)


def layer(out_f, in_f, wscale=0.05, seed=0, bias=False) -> QuantLinear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, wscale)
    return QuantLinear.from_linear(lin, "nl4", 4, 32)


# ---- the level table and the rounding ----------------------------------------------------------


def test_levels_are_llamacpp_iq4nl_values():
    from gguf.quants import IQ4_NL

    assert list(winq.grids.NL4_LEVELS) == KV == list(IQ4_NL.kvalues)
    spec = winq.GridSpec("nl4", 4)
    assert "nl4" in winq.GRIDS and winq.GRID_BITS["nl4"] == (4,)
    assert (spec.fixed_zero, spec.scale_factor, spec.n_codes, spec.uniform) == (0.0, 1.0, 16, False)
    assert spec.level_table == tuple(KV) and spec.asymmetric and spec.step_scale == 16.0
    assert torch.equal(spec.code_values(torch.arange(16, dtype=torch.uint8)), torch.tensor(KV, dtype=torch.float32))
    with pytest.raises(ConfigError, match=r"grid 'nl4' does not support bits=3.*nl4: 4"):
        winq.GridSpec("nl4", 3)


def test_rounding_is_nearest_level_with_ties_up():
    spec = winq.GridSpec("nl4", 4)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, generator=g) * 60, torch.linspace(-140, 130, 5401)])
    kv = torch.tensor(KV, dtype=torch.float32)
    want = kv[ref_index(x.clamp(-127, 113))]
    assert torch.equal(spec.level_value(x), want)
    # exactly on a midpoint: the upper level; one float below it: the lower one
    mids = (kv[1:] + kv[:-1]) / 2
    assert torch.equal(spec.level_value(mids), kv[1:])
    below = torch.nextafter(mids, torch.full_like(mids, -1e9))
    assert torch.equal(spec.level_value(below), kv[:-1])
    ends = torch.tensor([-1e6, -127.0, 113.0, 1e6])
    assert torch.equal(spec.level_value(ends), torch.tensor([-127.0, -127, 113, 113]))
    # the autograd path's forward is the same value bit for bit
    assert torch.equal(spec.levels(x[:, None], torch.ones(1, 1))[:, 0], want)
    # codes: the level's index
    assert torch.equal(spec.codes(want, torch.zeros(())), ref_index(x.clamp(-127, 113)).float())


def test_step_coordinates_put_boundaries_at_half_integers():
    spec = winq.GridSpec("nl4", 4)
    x = torch.linspace(-150, 140, 7001)
    u, lo, hi = spec.step_coordinates(x)
    assert (lo, hi) == (0.0, 15.0)
    kv = torch.tensor(KV, dtype=torch.float32)
    off_tie = ~torch.isin(x, (kv[1:] + kv[:-1]) / 2)  # diagnostics round u half to even: ties aside
    code = torch.round(torch.clamp(u, lo, hi)).long()
    assert torch.equal(code[off_tie], ref_index(x.clamp(-127, 113))[off_tie])
    uk, _, _ = spec.step_coordinates(kv)
    assert torch.allclose(uk, torch.arange(16.0))
    um, _, _ = spec.step_coordinates((kv[1:] + kv[:-1]) / 2)
    assert torch.allclose(um, torch.arange(15.0) + 0.5)
    assert bool((u[1:] >= u[:-1]).all())  # monotone, extended linearly beyond the ends


# ---- Rule 1: the fake-quant forward is QuantizedWeight.dequantize(), bit for bit ---------------


@settings(max_examples=40, deadline=None)
@given(out_f=st.integers(1, 6), n_groups=st.integers(1, 4), wscale=st.sampled_from([1e-4, 0.02, 0.5, 30.0]),
       alpha_mult=st.sampled_from([None, 0.3, 0.77, 1.6]), seed=st.integers(0, 2**16), bias=st.booleans())
def test_dequantize_equals_fake_weight(out_f, n_groups, wscale, alpha_mult, seed, bias):
    in_f = 32 * n_groups
    m = layer(out_f, in_f, wscale, seed, bias)
    if alpha_mult is not None:
        with torch.no_grad():
            m.alpha.mul_(alpha_mult)  # clipping at both ends
    qw = QuantizedWeight.from_module(m)
    fw = m.fake_weight()
    assert torch.equal(qw.dequantize(), fw)
    assert torch.equal(fw, ref_fake_weight(m.weight.detach(), m.alpha.detach()))
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= 15
    assert qw.group_size == 32 and qw.scale.dtype == torch.float16 and tuple(qw.scale.shape) == (out_f, n_groups)
    assert torch.equal(qw.scale, signed_clamp(m.alpha.detach()).to(torch.float16))  # s is IQ4_NL's d: alpha
    assert not qw.zero.any()
    assert set(qw.levels.unique().tolist()) <= set(map(float, KV))
    m.eval()
    x = torch.randn(3, in_f, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(m(x), F.linear(x, qw.dequantize(), m.bias))


def test_reinit_projects_onto_the_lattice():
    m = layer(5, 64, seed=3)
    q0 = m.fake_weight().detach().clone()
    m.reinit(0.0)
    assert torch.equal(m.weight.detach(), q0) and torch.equal(m.fake_weight().detach(), q0)


def test_quantized_weight_checks_the_nl4_layout():
    codes = torch.zeros(2, 64, dtype=torch.uint8)
    s = torch.ones(2, 2, dtype=torch.float16)
    QuantizedWeight(codes, s, torch.zeros(2, 2), "nl4", 4, 32)
    with pytest.raises(WinqError, match="groups of 32"):
        QuantizedWeight(codes, torch.ones(2, 1, dtype=torch.float16), torch.zeros(2, 1), "nl4", 4, 64)
    with pytest.raises(WinqError, match="zero 0"):
        QuantizedWeight(codes, s, torch.ones(2, 2), "nl4", 4, 32)


# ---- gradients --------------------------------------------------------------------------------


def test_ste_gradients_match_the_closed_form():
    """dW_q/dW = S / A inside [-127, 113] (0 when clipped); dW_q/dalpha = level - (S / A) x inside, level outside
    (the product rule on fp16(A) * level(W / A) with straight-through rounding)."""
    g = torch.Generator().manual_seed(4)
    out_f, in_f = 3, 96
    m = QuantLinear(in_f, out_f, bias=False, grid="nl4", bits=4, group_size=32)
    x = (torch.rand(out_f, in_f, generator=g) * 2 - 1) * 150  # some beyond both ends
    alpha = torch.rand(out_f, 3, generator=g) * 0.01 + 0.001  # not fp16 numbers: S != A
    with torch.no_grad():
        m.alpha.copy_(alpha)
        m.weight.copy_(x * alpha.repeat_interleave(32, 1))
    gout = torch.randn(out_f, in_f, generator=g)
    (m.fake_weight() * gout).sum().backward()
    A = alpha.repeat_interleave(32, 1)
    S = fp16(A)
    xs = m.weight.detach() / A
    inside = ((xs >= -127) & (xs <= 113)).float()
    assert inside.min() == 0 and inside.max() == 1
    lev = torch.tensor(KV, dtype=torch.float32)[ref_index(xs.clamp(-127, 113))]
    ref_gw = gout * inside * S / A
    ref_ga = (gout * (lev - inside * (S / A) * xs)).reshape(out_f, 3, 32).sum(-1)
    torch.testing.assert_close(m.weight.grad, ref_gw, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.alpha.grad, ref_ga, rtol=1e-5, atol=1e-4)


def test_ste_gradient_is_the_finite_difference_of_the_unrounded_forward():
    """The straight-through W_q behaves as A * (clamp(W / A) + c) with the rounding offset c held fixed (alpha a
    power of two, so fp16(A) = A); its central differences in W and alpha (float64) match autograd's gradients."""
    g = torch.Generator().manual_seed(5)
    w = (torch.rand(1, 32, generator=g) * 2 - 1) * 0.5
    a0 = torch.tensor([[2.0**-8]])  # |x| up to 128: some weights clipped
    m = QuantLinear(32, 1, bias=False, grid="nl4", bits=4, group_size=32)
    with torch.no_grad():
        m.weight.copy_(w)
        m.alpha.copy_(a0)
    gout = torch.randn(1, 32, generator=g)
    (m.fake_weight() * gout).sum().backward()
    w64, a64, g64 = w.double(), a0.double(), gout.double()
    c = torch.tensor(KV, dtype=torch.float64)[ref_index((w64 / a64).clamp(-127, 113))] - (w64 / a64).clamp(-127, 113)

    def surrogate(wv, av):
        return (g64 * av * ((wv / av).clamp(-127, 113) + c)).sum()

    h = 1e-7
    fd_a = (surrogate(w64, a64 + h) - surrogate(w64, a64 - h)) / (2 * h)
    torch.testing.assert_close(m.alpha.grad.double(), fd_a.reshape(1, 1), rtol=1e-4, atol=1e-4)
    fd_w = torch.stack([(surrogate(w64 + h * e, a64) - surrogate(w64 - h * e, a64)) / (2 * h)
                        for e in torch.eye(32, dtype=torch.float64)[:, None, :]]).reshape(1, 32)
    assert bool((fd_w == 0).any()) and bool((fd_w != 0).any())
    torch.testing.assert_close(m.weight.grad.double(), fd_w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sigma", [0.0, 1e-3])
def test_fused_training_path_matches_the_composite_one(sigma):
    from tinymodels import fused_and_composite

    m = layer(24, 96, seed=6, bias=True)
    with torch.no_grad():
        m.alpha.mul_(0.6)
    assert bool((m.alpha < 0).any()) and bool((m.alpha > 0).any())  # both orientations of the lattice
    fused, composite = fused_and_composite(m, sigma, (2, 7, 96))
    assert torch.equal(fused[0], composite[0])
    for name, a, b in zip(("x", "W", "alpha", "bias"), fused[1:], composite[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=name)


# ---- init: llama.cpp's IQ4_NL scale search -----------------------------------------------------


def _werr(w, d, h):
    lev = torch.tensor(KV, dtype=torch.float32)[ref_index((w / d).clamp(-127, 113))]
    return (h * (w - d * lev) ** 2).sum(-1)


def llamacpp_iq4nl_scale(x: torch.Tensor, ntry: int = 7) -> torch.Tensor:
    """llama.cpp's IQ4_NL scale per block (no imatrix) as its quantizer describes it, float64: weights x^2; start at
    d = max / 127 (max: the signed value of largest magnitude) re-fitted by least squares on the nearest levels,
    then 1/d = (t - 127) / max for t in -ntry..ntry, each re-fitted, the best fit winning."""
    x = x.double()
    h = x * x
    kv = torch.tensor(KV, dtype=torch.float64)
    mx = torch.gather(x, -1, x.abs().argmax(-1, keepdim=True))

    def fit(inv):
        lev = kv[ref_index(x * inv)]
        sqx, sq2 = (h * lev * x).sum(-1, keepdim=True), (h * lev * lev).sum(-1, keepdim=True)
        return sqx * sqx / sq2, sqx / sq2

    best, d = fit(127 / mx)
    for t in range(-ntry, ntry + 1):
        score, dt = fit((t - 127) / mx)
        better = score > best
        best, d = torch.where(better, score, best), torch.where(better, dt, d)
    return d


def test_init_alpha_is_at_least_as_good_as_llamacpp():
    """Over many groups the search's weighted error is at most llama.cpp's (it tries a superset of its candidates,
    then re-fits), and it uses both orientations of the lattice (negative scales)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(512, 32, generator=g) * torch.rand(512, 1, generator=g)
    w[::7] = w[::7] ** 3  # heavier tails in some groups
    a = winq.GridSpec("nl4", 4).init_alpha(w)
    ref = llamacpp_iq4nl_scale(w).float()
    h = w * w
    ours, theirs = _werr(w, a, h), _werr(w, ref, h)
    assert float(ours.sum()) <= float(theirs.sum())
    assert float((ours <= theirs * (1 + 1e-5)).float().mean()) > 0.97
    assert bool((a < 0).any()) and bool((a > 0).any())


def test_init_alpha_beats_the_max_rules():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, 6, 32, generator=g) * torch.rand(64, 6, 1, generator=g)  # groups of various spread
    w[0, 0] = 0.0  # an all-zero group
    spec = winq.GridSpec("nl4", 4)
    a = spec.init_alpha(w)
    assert a.shape == (64, 6, 1) and bool((a.abs() >= 1e-5).all()) and float(a[0, 0]) == pytest.approx(1e-5)
    h = w * w  # llama.cpp's weights without an imatrix
    amax = w.abs().amax(-1, keepdim=True)
    err = _werr(w, a, h)
    for rule in ((amax / 127).clamp(min=1e-5), (amax / 113).clamp(min=1e-5)):  # the layer's alpha >= 1e-5
        assert bool((err <= _werr(w, rule, h) * (1 + 1e-6)).all())
    assert float(err.sum()) < 0.9 * float(_werr(w, amax / 127, h).sum())
    # the layer's init is this search
    m = layer(8, 64, seed=1)
    torch.testing.assert_close(m.alpha.detach(), spec.init_alpha(m._grouped(m.weight.detach()))[..., 0])


def test_init_alpha_uses_importances():
    g = torch.Generator().manual_seed(8)
    w = torch.randn(200, 1, 32, generator=g)
    imp = torch.ones(1, 1, 32)
    imp[..., :4] = 100.0  # four important columns
    spec = winq.GridSpec("nl4", 4)
    a_plain, a_imp = spec.init_alpha(w), spec.init_alpha(w, imp)
    h = imp * torch.sqrt(2 * (w * w).mean(-1, keepdim=True) + w * w)  # llama.cpp's imatrix weighting
    assert float(_werr(w, a_imp, h).sum()) < float(_werr(w, a_plain, h).sum())


# ---- configuration ----------------------------------------------------------------------------


def test_group_size_must_be_32():
    assert QuantConfig(bits=4, grid="nl4", group_size=32).grid == "nl4"
    for gs in (64, 16):
        with pytest.raises(ConfigError, match=r"grid 'nl4'.*group_size=32 \(--group-size 32\), got " + str(gs)):
            QuantLinear(128, 4, grid="nl4", bits=4, group_size=gs)
    with pytest.raises(ConfigError, match=r"group_size=32.*got -1 \(one scale per row\)"):
        QuantLinear(64, 4, grid="nl4", bits=4)
    assert QuantLinear(32, 4, grid="nl4", bits=4).group_size == 32  # a row of 32 is one block

    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    for gs in (-1, 16):
        with pytest.raises(ConfigError, match="group_size=32"):
            winq.prepare(net, QuantConfig(bits=4, grid="nl4", group_size=gs))
    assert not any(isinstance(mod, QuantLinear) for mod in net.modules())  # refused before swapping anything
    winq.prepare(net, QuantConfig(bits=4, grid="nl4", group_size=32))
    assert all(mod.spec.grid == "nl4" for mod in winq.quant_layers(net).values())


def test_packed_runtime_refuses_nl4():
    from winq.errors import ModelError
    from winq.runtime.packed import PackedLinear

    with pytest.raises(ModelError, match=r"cannot run grid 'nl4'.*--format gguf"):
        PackedLinear.from_quantized_weight(layer(4, 64).quantized_weight())


def test_diagnostics_track_nl4_codes():
    from winq.diagnostics import CodeTracker

    m = layer(16, 64, seed=9)
    assert bool((m.alpha < 0).any())  # the init mirrors some groups: the diagnostics read the signed scale
    tr = CodeTracker({"l": m})
    _, code, step, margin = tr._sample()
    assert torch.equal(code.long().reshape(16, 64), m.quantized_weight().codes.long())
    assert bool((margin >= 0).all())
    torch.testing.assert_close(step, m.alpha.detach().abs().repeat_interleave(32, 1).reshape(-1) * 16)


def test_a_reset_parks_every_weight_at_least_0_4_local_step_from_a_boundary():
    """W <- 0.2 W + 0.8 Q(W) keeps every code; in the piecewise-linear step coordinates each weight ends within 0.1
    of its level's local step (the fp16 scale moves the levels by at most 2^-12 relative)."""
    from winq.diagnostics import CodeTracker

    m = layer(16, 64, wscale=0.1, seed=11)
    tr = CodeTracker({"l": m})
    tr.start()
    m.reinit(0.2)
    _, code, _, margin = tr._sample()
    assert torch.equal(code, tr.reset_codes)
    assert margin.min().item() >= 0.4 - 2e-3


@pytest.mark.parametrize("grid,factor", [("nl4", 1 / 16), ("lsq", 1.0)])
def test_scale_lr_is_in_units_of_the_level_step(grid, factor):
    """Adam moves every parameter by about its lr: nl4's alpha is 1/16 of a level step (lsq's is one step), so its
    scales get lr / 16 and move by the same share of themselves as lsq's; the latent weights keep lr."""
    from winq.train import _param_groups

    net = nn.Sequential(nn.Linear(64, 8, bias=False))
    winq.prepare(net, QuantConfig(bits=4, grid=grid, group_size=32, embed="float"))
    groups = _param_groups(net, winq.TrainConfig(lr=1e-4, scale_lr=3e-4))
    alpha = net[0].alpha
    (g,) = [g for g in groups if any(p is alpha for p in g["params"])]
    assert g["lr"] == pytest.approx(3e-4 * factor) and g["base_lr"] == g["lr"]
    (w,) = [g for g in groups if any(p is net[0].weight for p in g["params"])]
    assert w["lr"] == 1e-4


@pytest.mark.parametrize("grid,factor", [("nl4", 1 / 16), ("lsq", 1.0)])
def test_scale_noise_is_in_units_of_the_level_step(grid, factor):
    """WinQ's noise on the scale (sigma 1e-3 on an LSQ scale, one level step) is sigma / 16 on nl4's alpha, a
    sixteenth of a level step; the noisy forward uses it."""
    from winq.noise import NoiseSource

    net = nn.Sequential(nn.Linear(64, 8, bias=False))
    winq.prepare(net, QuantConfig(bits=4, grid=grid, group_size=32, embed="float"))
    m = net[0]
    m.noise_sigma = 1e-3
    assert m.scale_noise_sigma == pytest.approx(1e-3 * factor)
    src = NoiseSource(net, 0, {"0": m}, background=False)
    src.draw()
    assert float(m.eps_a.abs().max()) > 0
    w = m.weight.detach() + 1e-3 * m.eps_w
    a = m.alpha.detach() + 1e-3 * factor * m.eps_a
    grouped = w.reshape(8, 2, 32)
    expect = (fp16(a.abs().clamp(min=1e-5) * a.sign() * m.spec.scale_factor)[..., None]
              * m.spec.level_value(grouped / signed_clamp(a)[..., None])).reshape(8, 64)
    assert torch.allclose(m.fake_weight(noise=True), expect, atol=0, rtol=0)
