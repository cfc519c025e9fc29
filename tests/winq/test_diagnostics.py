"""Fused quantizer, noise source, code-flip diagnostics and the adaptive reset schedule."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from winq import QuantConfig, TrainConfig
from winq.diagnostics import CodeTracker
from winq.errors import ConfigError
from winq.noise import CHUNK, NoiseSource
from winq.qlinear import QuantLinear
from winq.reset_schedule import ResetSchedule
from winq.train import train

FIXED = [
    ("lsq", 4, -1),
    ("lsq", 3, 8),
    ("lsq", 8, -1),
    ("seq", 2, -1),
    ("seq", 2, 8),
    ("ternary", 2, -1),
    ("binary", 1, 8),
    ("nl4", 4, 32),
]


def _layer(grid, bits, gs, out=12, inf=32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(inf, out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(0.3 * torch.randn(out, inf, generator=g))
    m = QuantLinear.from_linear(lin, grid, bits, gs)
    with torch.no_grad():
        m.alpha.mul_(0.7)  # some clipping, so both gradient branches are exercised
    return m


# ---- the fused quantizer ----------------------------------------------------------------------
@pytest.mark.parametrize("case", FIXED, ids=lambda c: f"{c[0]}{c[1]}g{c[2]}")
@pytest.mark.parametrize("sigma", [0.0, 1e-2])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_quantizer_matches_the_composite_path(case, sigma, bias):
    """Training forward: the same output bit for bit as F.linear(x, fake_weight(noise)); gradients of the
    input, W, alpha and bias equal autograd's over the composite expression to float rounding."""
    m = _layer(*case, bias=bias)
    net = torch.nn.Sequential(m)
    NoiseSource(net, seed=3)
    m.noise_sigma = sigma
    net.train()
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    gy = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(2))
    y = net(x)  # draws the noise, runs _FakeQuantLinear
    y.backward(gy)
    fused = [x.grad.clone(), m.weight.grad.clone(), m.alpha.grad.clone()] + ([m.bias.grad.clone()] if bias else [])
    x.grad = None
    m.zero_grad()
    y2 = F.linear(x, m.fake_weight(noise=True), m.bias)  # the same draw, composite autograd
    y2.backward(gy)
    ref = [x.grad, m.weight.grad, m.alpha.grad] + ([m.bias.grad] if bias else [])
    assert torch.equal(y, y2)
    for name, a, b in zip(("x", "W", "alpha", "bias"), fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=name)


def test_fused_quantizer_saves_no_float_copy_of_the_weights():
    """What the fused layer keeps for its backward: the input, W and alpha themselves, and 2 bytes per weight
    (int8 levels, bool clip mask) instead of noisy, scaled, clamped and quantized float copies of W."""
    m = _layer("seq", 2, -1, out=64, inf=64)
    net = torch.nn.Sequential(m)
    NoiseSource(net, seed=0)
    m.noise_sigma = 1e-3
    net.train()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(2, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x).sum().backward()
    big = [t for t in saved if t.numel() >= 64 * 64 and t.data_ptr() != m.weight.data_ptr()]
    assert sorted(str(t.dtype) for t in big) == ["torch.bool", "torch.int8"], [(tuple(t.shape), t.dtype) for t in big]
    assert sum(t.numel() * t.element_size() for t in big) == 2 * m.weight.numel()


def test_affine_and_eval_use_the_composite_path():
    m = _layer("lsq", 4, -1)
    m.eval()
    x = torch.randn(4, 32)
    assert torch.equal(m(x), F.linear(x, m.fake_weight(), m.bias))
    lin = torch.nn.Linear(32, 8)
    a = QuantLinear.from_linear(lin, "affine", 3)
    a.train()
    a(x).sum().backward()  # affine trains through autograd (learned zero point)
    assert a.zero_point.grad is not None


def test_bf16_autocast_training_forward_runs_and_matches_dtype():
    m = _layer("lsq", 4, -1)
    m.train()
    x = torch.randn(4, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert (
        x.grad.dtype == torch.float32 and m.weight.grad.dtype == torch.float32 and m.alpha.grad.dtype == torch.float32
    )
    assert torch.isfinite(m.weight.grad).all()


# ---- the noise source -------------------------------------------------------------------------
def test_noise_is_fresh_per_forward_seeded_and_independent_of_threads():
    big = torch.nn.Linear(CHUNK // 1024 + 8, 2048)  # more than one chunk: the parallel fill is exercised
    m = QuantLinear.from_linear(big, "lsq", 4)
    net = torch.nn.Sequential(m)
    src = NoiseSource(net, seed=7)
    assert src.buffer.numel() > CHUNK
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        src.draw()
        one = src.buffer.clone()
        src.draws = 0
        torch.set_num_threads(2)
        src.draw()
        assert torch.equal(src.buffer, one)  # the values depend on (seed, draw), not on the threads
        src.draw()
        assert not torch.equal(src.buffer, one)
    finally:
        torch.set_num_threads(threads)
    assert abs(one.mean().item()) < 0.01 and abs(one.std().item() - 1.0) < 0.01  # standard normal
    # a saved state continues the same stream
    st = src.state_dict()
    src.draw()
    nxt = src.buffer.clone()
    other = NoiseSource(torch.nn.Sequential(QuantLinear.from_linear(big, "lsq", 4)), seed=0)
    other.load_state_dict(st)
    other.draw()
    assert torch.equal(other.buffer, nxt)
    assert m.eps_w.shape == m.weight.shape and m.eps_a.shape == m.alpha.shape


def _two_chunk_net():
    """Two layers, the second one's noise beyond the first chunk of the buffer."""
    g = torch.Generator().manual_seed(0)
    a = QuantLinear.from_linear(torch.nn.Linear(64, 64), "seq", 2)
    b = QuantLinear.from_linear(torch.nn.Linear(CHUNK // 512 + 8, 512, bias=False), "lsq", 4)
    with torch.no_grad():
        for m in (a, b):
            m.weight.copy_(0.1 * torch.randn(m.weight.shape, generator=g))
            m.init_scales()
            m.noise_sigma = 1e-3
    return a, b


def test_background_fill_gives_the_synchronous_values_and_layers_wait_for_their_chunks():
    a, b = _two_chunk_net()
    sync = NoiseSource(torch.nn.Sequential(a, b), seed=5, background=False)
    assert a.noise_chunks == 1 and b.noise_chunks == 2
    sync.draw()
    want = sync.buffer.clone()
    sync.remove()
    src = NoiseSource(torch.nn.Sequential(a, b), seed=5, background=True)
    gate, calls = __import__("threading").Event(), []
    fill = src._fill

    def slow_fill(k, c):  # chunk 1 waits until the test has seen layer a go ahead
        if c == 1:
            gate.wait(10)
        calls.append(c)
        fill(k, c)

    src._fill = slow_fill
    src.start()
    src.ready(a)  # a's noise is all in chunk 0: no wait for chunk 1
    assert calls == [0] and src._filled == 1
    gate.set()
    src.ready(b)
    assert src._filled == 2
    src.wait()
    assert src.draws == 1 and torch.equal(src.buffer, want)  # the same values as draw()


def test_background_fill_in_training_matches_the_synchronous_one_and_reports_failures():
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))

    def run(background):
        torch.manual_seed(0)  # the plain middle layer
        a, b = _two_chunk_net()
        net = torch.nn.Sequential(a, torch.nn.Linear(64, CHUNK // 512 + 8), b)
        src = NoiseSource(net, seed=9, background=background)
        net.train()
        outs = []
        for _ in range(2):
            y = net(x)
            y.square().mean().backward()
            outs.append((y.detach(), a.alpha.grad.clone(), b.weight.grad.clone()))
        return src, net, outs

    _, _, sync = run(False)
    src, net, bg = run(True)
    for (y1, ga1, gb1), (y2, ga2, gb2) in zip(sync, bg):
        assert torch.equal(y1, y2) and torch.equal(ga1, ga2) and torch.equal(gb1, gb2)

    def broken(k, c):
        raise OSError("disk on fire")

    src._fill = broken
    with pytest.raises(RuntimeError, match="drawing the WinQ noise failed: disk on fire"):
        net(x)
    with pytest.raises(RuntimeError, match="disk on fire"):
        src.wait()
    src.wait()  # reported once; the source is usable again
    src._fill = NoiseSource._fill.__get__(src)
    net(x)
    assert src.draws == 4


def test_noise_is_drawn_only_in_training_forwards():
    m = _layer("seq", 2, -1)
    net = torch.nn.Sequential(m)
    src = NoiseSource(net, seed=1)
    m.noise_sigma = 1e-3
    net.eval()
    net(torch.randn(2, 32))
    assert src.draws == 0
    net.train()
    net(torch.randn(2, 32))
    net(torch.randn(2, 32))
    assert src.draws == 2
    m.noise_sigma = 0.0  # plain QAT draws nothing
    net(torch.randn(2, 32))
    assert src.draws == 2


# ---- diagnostics ----------------------------------------------------------------------------
def _set(m, w, alpha):
    with torch.no_grad():
        m.weight.copy_(torch.tensor(w, dtype=torch.float32).reshape(m.weight.shape))
        m.alpha.fill_(alpha)


def test_margin_flip_travel_on_known_weights():
    """lsq 4-bit, alpha 1: codes are round(clamp(W, -8, 7)); boundaries at half-integers."""
    m = QuantLinear.from_linear(torch.nn.Linear(4, 1, bias=False), "lsq", 4)
    _set(m, [0.3, 1.0, 2.45, 9.0], 1.0)
    tr = CodeTracker({"l": m})
    assert tr.n == 4  # a small model is measured whole
    tr.start()
    d = tr.measure(lr=0.01)
    # margins: 0.2, 0.5, 0.05 and, clipped at 7, 0.5 + 2 = 2.5; torch.median takes the lower middle value
    assert d["boundary_margin"] == pytest.approx(0.2)
    assert tr._sample()[3].tolist() == pytest.approx([0.2, 0.5, 0.05, 2.5], abs=1e-6)
    assert d["flip_rate"] == 0 and d["travel"] == 0
    _set(m, [0.3, 1.0, 2.55, 9.0], 1.0)  # one weight crosses 2.5
    d = tr.measure(lr=0.01)
    assert d["flip_rate"] == pytest.approx(0.25) and d["flips_since_reset"] == pytest.approx(0.25)
    assert d["travel"] == pytest.approx(0.1 / 4)  # mean |dW| = 0.025, median step 1
    assert d["lr_travel"] == pytest.approx(0.02)
    _set(m, [0.3, 1.0, 2.45, 9.0], 1.0)  # and back: an oscillation inside the window
    d = tr.measure(lr=0.01)
    assert d["flip_rate"] == pytest.approx(0.25) and d["flips_since_reset"] == 0
    assert d["oscillation"] == pytest.approx(0.25)


@pytest.mark.parametrize("grid,bits", [("seq", 2), ("ternary", 2), ("binary", 1), ("lsq", 3), ("affine", 2)])
def test_a_reset_parks_every_weight_at_least_0_4_step_from_a_boundary(grid, bits):
    """W <- 0.2 W + 0.8 Q(W): codes unchanged, each in-range weight within 0.1 step of its level."""
    lin = torch.nn.Linear(64, 16)
    torch.nn.init.normal_(lin.weight, std=0.1)
    m = QuantLinear.from_linear(lin, grid, bits)
    tr = CodeTracker({"l": m})
    tr.start()
    before = tr.measure(0.0)
    m.reinit(0.2)
    w, code, s, margin = tr._sample()
    assert torch.equal(code, tr.reset_codes)  # the reset keeps every code
    assert (
        margin.min().item() >= 0.4 - 1e-3
    )  # Q(W) uses the fp16-rounded scale: levels sit within 2^-11 relative of alpha's grid
    assert tr.measure(0.0)["boundary_margin"] > before["boundary_margin"]


def test_sampling_covers_every_layer_and_resumes():
    layers = {f"l{i}": QuantLinear.from_linear(torch.nn.Linear(64, 32), "lsq", 4) for i in range(3)}
    tr = CodeTracker(layers, target=600)
    assert tr.stride == 10 and 590 <= tr.n <= 620
    assert all(len(i) > 0 for i in tr._idx.values())
    tr.start()
    tr.measure(1e-3)
    st = tr.state_tensors()
    tr2 = CodeTracker(layers, target=600)
    tr2.load_state_tensors(st)
    with torch.no_grad():
        layers["l1"].weight.add_(0.05)
    assert tr.measure(1e-3) == tr2.measure(1e-3)


# ---- the schedule -----------------------------------------------------------------------------
def _diag(travel=0.0, flip=0.0):
    return {"travel": travel, "lr_travel": travel * 2, "flip_rate": flip, "flips_since_reset": flip}


def test_travel_trigger_fires_when_travel_reaches_t_and_not_before_min_steps():
    s = ResetSchedule("travel", total_steps=100, travel=0.5, min_steps=5)
    assert s.decide(3, _diag(travel=0.9)) is None  # too soon after the start
    assert s.decide(6, _diag(travel=0.49)) is None
    assert s.decide(7, _diag(travel=0.5)) == "travel"
    e = s.record(7, "travel", _diag(travel=0.5))
    assert e == {
        "step": 7,
        "trigger": "travel",
        "since_last": 7,
        "travel": 0.5,
        "lr_travel": 1.0,
        "flip_rate": 0.0,
        "flips_since_reset": 0.0,
    }
    assert s.decide(10, _diag(travel=2.0)) is None  # min_steps after the last reset
    assert s.decide(12, _diag(travel=0.6)) == "travel"
    assert s.decide(100, _diag(travel=5.0)) is None  # never at the final step


def test_plateau_trigger_waits_for_the_flip_rate_to_rise_and_fall():
    s = ResetSchedule("plateau", total_steps=1000, flip=0.25, min_steps=5)
    fired = None
    rates = [0.0] * 10 + [1e-3] * 30 + [0.0] * 100  # frozen after a reset, then moving, then settled
    for step, r in enumerate(rates, 1):
        s.observe(step, _diag(flip=r))
        if s.decide(step, _diag(flip=r)):
            fired = step
            break
    assert fired is not None and fired > 40  # not while frozen, not while moving
    s.record(fired, "plateau", None)
    for step in range(fired + 1, fired + 200):  # codes stay frozen: no further reset
        s.observe(step, _diag(flip=0.0))
        assert s.decide(step, _diag(flip=0.0)) is None


def test_fixed_schedule_and_config_validation():
    s = ResetSchedule.from_config(TrainConfig(steps=12, reinit_every=4))
    assert [t for t in range(1, 13) if s.decide(t, None)] == [4, 8]
    assert ResetSchedule.from_config(TrainConfig(method="qat", reinit_every="auto")).mode == "never"
    assert ResetSchedule.from_config(TrainConfig(reinit_every="auto", reinit_trigger="plateau")).mode == "plateau"
    with pytest.raises(ConfigError, match="'auto'"):
        TrainConfig(reinit_every="sometimes")
    with pytest.raises(ConfigError, match="travel, plateau"):
        TrainConfig(reinit_every="auto", reinit_trigger="loss")
    with pytest.raises(ConfigError, match="diag_every"):
        TrainConfig(reinit_every="auto", diag_every=0)


# ---- in training ------------------------------------------------------------------------------
def test_training_logs_diagnostics_and_resets_on_travel(tiny_llama, text_file, tmp_path):
    tcfg = TrainConfig(
        method="winq",
        steps=12,
        lr=3e-3,
        seq_len=16,
        batch_size=2,
        reinit_every="auto",
        reinit_trigger="travel",
        reinit_travel=0.03,
        reinit_min_steps=2,
    )
    qc = QuantConfig(bits=2, group_size=-1, embed="float")
    res = train(str(tiny_llama), str(text_file), qc, tcfg, tmp_path / "t", progress=False)
    recs = [r for r in res.records if "loss" in r]
    for r in recs:
        assert {"flip_rate", "flips_since_reset", "oscillation", "boundary_margin", "travel", "lr_travel"} <= r.keys()
    resets = [r for r in recs if r["reset"]]
    assert resets, [r["travel"] for r in recs]
    prev = 0
    for r in resets:
        info = r["reset_info"]
        assert info["trigger"] == "travel" and info["travel"] >= 0.03 and info["since_last"] >= 2
        # before the reset the travel was below T at every step since the previous one (else it fired sooner)
        assert all(x["travel"] < 0.03 for x in recs if prev + 2 <= x["step"] < r["step"])
        prev = r["step"]
    after = next(x for x in recs if x["step"] == resets[0]["step"] + 1)
    assert after["flips_since_reset"] <= after["flip_rate"] + 1e-12  # the reference codes were retaken at the reset
    assert json.loads((tmp_path / "t" / "winq.json").read_text())["train"]["reinit_every"] == "auto"


def test_qat_logs_diagnostics_but_never_resets(tiny_llama, text_file, tmp_path):
    tcfg = TrainConfig(method="qat", steps=4, lr=3e-3, seq_len=16, batch_size=2, reinit_every="auto")
    qc = QuantConfig(bits=4, group_size=-1, embed="float")
    res = train(str(tiny_llama), str(text_file), qc, tcfg, tmp_path / "q", progress=False)
    recs = [r for r in res.records if "loss" in r]
    assert not any(r["reset"] for r in recs) and all("flip_rate" in r for r in recs)
    assert any(r["flips_since_reset"] > 0 for r in recs)  # at lr 3e-3 some codes move


def test_travel_trigger_that_never_fires_is_exactly_noise_only(tiny_llama, text_file, tmp_path):
    """What benchmarks/convergence.py relies on to skip a run: winq with --reinit-every auto whose travel never
    reaches T trains bit for bit like winq without resets (noise only)."""
    common = dict(method="winq", steps=6, lr=3e-3, seq_len=16, batch_size=2, seed=4)
    qc = QuantConfig(bits=2, group_size=-1, embed="float")
    a = train(str(tiny_llama), str(text_file), qc, TrainConfig(**common, reinit_every=6),
              tmp_path / "noise", progress=False)
    b = train(str(tiny_llama), str(text_file), QuantConfig(bits=2, group_size=-1, embed="float"),
              TrainConfig(**common, reinit_every="auto", reinit_travel=100.0, reinit_min_steps=1), tmp_path / "auto",
              progress=False)
    assert not any(r.get("reset") for r in a.records + b.records)
    assert [r.get("loss") for r in a.records] == [r.get("loss") for r in b.records]
    assert [r.get("travel") for r in a.records] == [r.get("travel") for r in b.records]


def test_convergence_steps_ratio_interpolates_between_evaluations():
    from winq.benchmarks.convergence import compare, reach_step_interp, steps_ratio_by_target

    qat = [(0, 9.0), (100, 6.0), (200, 5.0)]
    fast = [(0, 9.0), (100, 5.5), (200, 4.9)]
    assert reach_step_interp(fast, 5.0) == pytest.approx(100 + 100 * 0.5 / 0.6)
    assert reach_step_interp(fast, 5.8) == pytest.approx(100 * 3.2 / 3.5)  # between the step-0 and step-100 evals
    assert reach_step_interp(qat, 4.0) is None
    want = [(100, round(100 / (100 * 3 / 3.5), 4)), (200, pytest.approx(200 / (100 + 100 * 0.5 / 0.6), abs=1e-4))]
    assert steps_ratio_by_target(qat, fast) == want
    assert steps_ratio_by_target(fast, qat) == [(100, round(100 / 150, 4)), (200, None)]  # qat reaches 5.5 at 150
    run = lambda c: {"eval_curve": c, "final_eval_loss": c[-1][1], "median_step_s": 1.0}  # noqa: E731
    cmp = compare({"qat": run(qat), "fast": run(fast)})
    assert cmp["qat"]["median_steps_ratio_over_qat_evals"] == 1.0
    assert cmp["fast"]["step_reaching_qat_final"] == 200 and cmp["fast"]["median_steps_ratio_over_qat_evals"] > 1


def test_noise_fills_beside_the_forward_only_when_torch_leaves_a_core_free(monkeypatch):
    a, b = _two_chunk_net()
    src = NoiseSource(torch.nn.Sequential(a, b), seed=1)
    threads = torch.get_num_threads()
    try:
        monkeypatch.setattr("winq.noise.os.cpu_count", lambda: 4)
        torch.set_num_threads(2)
        assert src._beside()
        torch.set_num_threads(4)
        assert not src._beside()
        src.background = True
        assert src._beside()
        src.background = False
        torch.set_num_threads(1)
        assert not src._beside()
    finally:
        torch.set_num_threads(threads)
