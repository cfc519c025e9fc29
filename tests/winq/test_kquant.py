"""The K grids (winq.kquant): llama.cpp's Q2_K .. Q6_K with their two-level scales learned in the forward.

Checked here without any runtime: the forward equals the QuantizedWeight's dequantization bit for bit, the
integer fields are what the format can store (sub-block codes in range, d an fp16 value, the largest sub-block
scale at the extreme code, as llama.cpp's quantizers put it), the GGUF blocks read back through gguf-py's own
dequantizers with error 0 (tests/exporters/test_gguf_kquant.py runs whole models in llama.cpp), gradients
reach the weights and both scale levels, the step-0 search, the recipes' per-layer plan (on the default model's
shapes it is llama.cpp's Q4_K_M mix tensor for tensor), and the errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import winq
from winq import ConfigError, QuantConfig, QuantLinear
from winq.formats import gguf as G
from winq.grids import KFORMATS, KGRIDS
from winq.kquant import encode, kq_weight, search
from winq.recipes import RECIPES, layer_plan, use_more_bits

CASES = [(g, KFORMATS[g].bits, KFORMATS[g].sub) for g in KGRIDS]


def layer(grid, out=6, inf=512, seed=0, jitter=True) -> QuantLinear:
    torch.manual_seed(seed)
    bits, sub = KFORMATS[grid].bits, KFORMATS[grid].sub
    lin = QuantLinear(inf, out, bias=False, grid=grid, bits=bits, group_size=sub)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        lin.weight[0, :sub] = 0.0  # an all-zero sub-block
        lin.weight[1] *= 40.0  # a row far larger than the others
        lin.init_scales()
        if jitter:  # scales across binades, as training leaves them; some sub-blocks tiny against their neighbours
            lin.alpha.mul_(torch.exp(torch.randn(lin.alpha.shape)))
            lin.alpha[2, :3] = 1e-7
            if lin.zero_point is not None:
                lin.zero_point.mul_(torch.rand(lin.zero_point.shape) * 2)
    return lin


@pytest.mark.parametrize("grid,bits,sub", CASES, ids=[c[0] for c in CASES])
def test_forward_is_the_stored_weight_bit_for_bit(grid, bits, sub):
    for seed in range(3):
        lin = layer(grid, seed=seed, jitter=seed > 0)
        qw = lin.quantized_weight()
        with torch.no_grad():
            assert torch.equal(qw.dequantize(), lin.fake_weight())
        fmt = KFORMATS[grid]
        lo, hi = fmt.scale_range
        assert int(qw.sub_scale.min()) >= lo and int(qw.sub_scale.max()) <= hi
        assert int(qw.codes.max()) <= 2**bits - 1
        if fmt.has_min:
            assert int(qw.sub_min.min()) >= 0 and int(qw.sub_min.max()) <= hi
            # per super-block the largest float scale gets the top code (d = max / (2^sb - 1))
            sc = qw.sub_scale.reshape(qw.shape[0], -1, fmt.n_sub)
            live = qw.scale.reshape(qw.shape[0], -1, fmt.n_sub)[..., 0] != 0
            assert (sc.amax(-1)[live] == hi).all()
        else:
            assert not qw.sub_min.any() and not qw.super_min.any()
            sc = qw.sub_scale.reshape(qw.shape[0], -1, fmt.n_sub)
            live = qw.scale.reshape(qw.shape[0], -1, fmt.n_sub)[..., 0] != 0
            assert (sc.amin(-1)[live] == lo).all()  # the largest magnitude on the extreme code, as llama.cpp's -32


@pytest.mark.parametrize("grid,bits,sub", CASES, ids=[c[0] for c in CASES])
def test_gguf_blocks_read_back_through_gguf_py_exactly(grid, bits, sub):
    lin = layer(grid, seed=4)
    qw = lin.quantized_weight()
    enc, note = G.choose(qw, "auto", "layer")
    assert (enc.type, note) == (grid, None) and "native" in enc.container
    block, nbytes = G.TYPES[grid].block(), G.GGML_QUANT_SIZES[G.TYPES[grid].ggml][1]
    assert enc.blocks.shape == (qw.shape[0], qw.shape[1] // block * nbytes)
    with torch.no_grad():
        np.testing.assert_array_equal(G.TYPES[grid].decode(enc.blocks, qw.shape), lin.fake_weight().numpy())
    p = G.permute_qw(qw, 3)  # llama.cpp's q/k row order keeps it exact
    np.testing.assert_array_equal(G.TYPES[grid].decode(G.choose(p, "auto", "l")[0].blocks, p.shape),
                                  p.dequantize().numpy())
    # only its own type holds a K grid; the other types refuse it by name
    assert [t for t in G.ORDER if G.TYPES[t].can_hold(grid, bits)] == [grid]
    with pytest.raises(ConfigError, match=rf"--type q4_0 cannot hold {grid} {bits}-bit weights exactly.*{grid}"):
        G.choose(qw, "q4_0", "layer")


def test_q4_k_scale_bytes_are_gguf_py_s_get_scale_min():
    from gguf.quants import Q4_K

    rng = np.random.default_rng(0)
    sc, m = rng.integers(0, 64, size=(50, 8)), rng.integers(0, 64, size=(50, 8))
    got_sc, got_m = Q4_K.get_scale_min(G._scales_k4(sc, m))
    np.testing.assert_array_equal(got_sc, sc)
    np.testing.assert_array_equal(got_m, m)


def test_gradients_reach_weights_sub_scales_and_mins():
    for grid in KGRIDS:
        lin = layer(grid, seed=1, jitter=False)
        x = torch.randn(4, 512)
        lin(x).square().sum().backward()
        for p in (lin.weight, lin.alpha) + ((lin.zero_point,) if lin.zero_point is not None else ()):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, (grid, p.shape)
        # straight-through: inside the clip range dW_q/dW is 1 (the scale is held)
        w = lin.weight.detach()[:, :256].reshape(6, -1, KFORMATS[grid].sub).clone().requires_grad_(True)
        a = lin.alpha.detach()[:, : 256 // KFORMATS[grid].sub]
        mu = lin.zero_point.detach()[:, : 256 // KFORMATS[grid].sub] if lin.zero_point is not None else None
        kq_weight(w, a, mu, KFORMATS[grid]).sum().backward()
        assert set(w.grad.unique().tolist()) <= {0.0, 1.0} and w.grad.mean() > 0.5


@pytest.mark.parametrize("sigma", [0.0, 1e-3])
@pytest.mark.parametrize("grid", KGRIDS)
def test_fused_training_path_matches_the_composite_one(grid, sigma):
    """Training forwards go through qlinear._KQuantLinear (the per-weight part fused, 2 bytes per weight saved):
    the same output bit for bit as kq_weight's composite expression, the same gradients (x, W, alpha, mu, bias)."""
    from torch import nn

    from tinymodels import fused_and_composite

    m = layer(grid, out=8, seed=3)
    m.bias = nn.Parameter(torch.randn(8) * 0.1)
    with torch.no_grad():
        m.weight[3, 5:40] *= 6.0  # weights beyond the clip range of their sub-block
    fused, composite = fused_and_composite(m, sigma, (2, 5, 512))
    assert torch.equal(fused[0], composite[0])
    for name, a, b in zip(("x", "W", "alpha", "bias", "mu"), fused[1:], composite[1:]):
        assert a.abs().sum() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=name)


def _rtn_error(w, fmt):
    """A plain round-to-nearest start: scale from the sub-block range (and min), no search."""
    lo, hi = fmt.code_range
    if fmt.has_min:
        mn = w.amin(-1).clamp(max=0)
        return kq_weight(w, (w.amax(-1) - mn) / hi, -mn, fmt, ste=False)
    return kq_weight(w, w.abs().amax(-1) / -lo, None, fmt, ste=False)


@pytest.mark.parametrize("grid", KGRIDS)
def test_search_beats_round_to_nearest_and_uses_importances(grid):
    fmt = KFORMATS[grid]
    torch.manual_seed(3)
    w = (torch.randn(16, 512) * torch.rand(16, 1)).reshape(16, -1, fmt.sub)
    h = torch.rand(1, w.shape[1], fmt.sub) ** 4  # very uneven importances
    a, mu = search(w, None, fmt)
    plain = ((w - kq_weight(w, a, mu, fmt, ste=False)) ** 2).sum()
    assert plain < ((w - _rtn_error(w, fmt)) ** 2).sum()
    aw, muw = search(w, h, fmt)
    werr = (h * (w - kq_weight(w, aw, muw, fmt, ste=False)) ** 2).sum()
    assert werr < (h * (w - kq_weight(w, a, mu, fmt, ste=False)) ** 2).sum()


def test_encode_fields():
    fmt = KFORMATS["q4_k"]
    lin = layer("q4_k", seed=2)
    f = encode(lin._grouped(lin.weight.detach()), lin.alpha.detach(), lin.zero_point.detach(), fmt)
    assert f["codes"].dtype == torch.uint8 and f["sc"].dtype == torch.int16 and f["d"].dtype == torch.float16
    assert f["d"].shape == (6, 2) and f["sc"].shape == (6, 16)


# ---- recipes ------------------------------------------------------------------------------------------------

def default_model_widths() -> dict[str, int]:
    """The default model's quantized Linear layers (SmolLM2-135M: 30 layers, hidden 576, MLP 1536)."""
    out = {}
    for i in range(30):
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                  "mlp.up_proj"):
            out[f"model.layers.{i}.{n}"] = 576
        out[f"model.layers.{i}.mlp.down_proj"] = 1536
    return out


OUT_FEATURES = {"q_proj": 576, "k_proj": 192, "v_proj": 192, "o_proj": 576, "gate_proj": 1536, "up_proj": 1536,
                "down_proj": 576}


def test_q4_k_m_on_the_default_model_is_llama_cpp_s_mix():
    """llama.cpp's own Q4_K_M file of the default model (benchmarks/quality.py baselines, results/quality.json
    `llamacpp-q4_k_m`) holds Q4_K 14,155,776 weights, Q6_K 12,386,304, Q5_0 78,077,952 and Q8_0 29,859,840 (of
    which 28,311,552 are the token table, Q8_0 here too): the plan puts the same number of weights in each."""
    widths = default_model_widths()
    plan = layer_plan(QuantConfig(recipe="q4_k_m"), widths)
    by_type: dict[str, int] = {}
    gguf_type = {("q4_k", 4): "Q4_K", ("q6_k", 6): "Q6_K", ("lsq", 5): "Q5_0", ("lsq", 8): "Q8_0"}
    for name, lq in plan.items():
        t = gguf_type[(lq.grid, lq.bits)]
        by_type[t] = by_type.get(t, 0) + widths[name] * OUT_FEATURES[name.rsplit(".", 1)[1]]
    assert by_type == {"Q4_K": 14_155_776, "Q6_K": 12_386_304, "Q5_0": 78_077_952, "Q8_0": 29_859_840 - 28_311_552}
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    # without the mix: every K grid falls back on rows that are not whole super-blocks, as llama.cpp does
    for recipe, fallback in (("q2_k", "lsq"), ("q3_k", "lsq"), ("q4_k", "lsq"), ("q6_k", "lsq")):
        plan = layer_plan(QuantConfig(recipe=recipe), widths)
        assert {lq.grid for n, lq in plan.items() if widths[n] == 576} == {fallback}
        assert {lq.grid for n, lq in plan.items() if widths[n] == 1536} == {recipe}


def test_recipe_config():
    cfg = QuantConfig(recipe="q6_k")
    assert (cfg.grid, cfg.bits, cfg.group_size) == ("q6_k", 6, 16)
    assert QuantConfig(recipe="q4_k_m").grid == "q4_k"
    assert set(RECIPES) >= set(KGRIDS) | {"q4_k_m", "q5_k_m"}
    with pytest.raises(ConfigError, match=r"recipe='q4_k_l': choose one of q2_k, q3_k, q4_k, q5_k, q6_k, q4_k_m"):
        QuantConfig(recipe="q4_k_l")
    with pytest.raises(ConfigError, match=r"recipe='q4_k_m' trains in q4_k .*drop grid='nl4'"):
        QuantConfig(recipe="q4_k_m", grid="nl4")
    with pytest.raises(ConfigError, match=r"grid 'q6_k' .* sub-block of 16 weights: use group_size=16 .*--recipe q6_k"):
        QuantConfig(bits=6, grid="q6_k")
    with pytest.raises(ConfigError, match=r"bits=6 has no default grid: choose grid q6_k"):
        QuantConfig(bits=6)
    with pytest.raises(ConfigError, match=r"super-blocks of 256 weights, but rows have 96: llama.cpp uses lsq 5-bit"):
        QuantLinear(96, 4, grid="q4_k", bits=4, group_size=32)


def test_prepare_follows_the_plan():
    from tinymodels import make_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(make_config("llama", 64, hidden=96, inter=256, layers=2))
    winq.prepare(net, QuantConfig(recipe="q4_k_m", embed="float"))
    got = {n.split("layers.")[1]: (m.spec.grid, m.spec.bits, m.group_size) for n, m in winq.quant_layers(net).items()}
    assert got["1.mlp.down_proj"] == ("q6_k", 6, 16)  # layer 1 of 2: use_more_bits (the last eighth)
    assert got["0.mlp.down_proj"] == ("q4_k", 4, 32)
    assert got["1.self_attn.v_proj"] == ("lsq", 8, 32)  # Q6_K on rows of 96: Q8_0
    assert got["0.self_attn.q_proj"] == ("lsq", 5, 32)  # Q4_K on rows of 96: Q5_0
    qws = winq.quantized_weights(net)
    for name, m in winq.quant_layers(net).items():
        with torch.no_grad():
            assert torch.equal(qws[name].dequantize(), m.fake_weight())
