"""Hessian spectrum (winq.hessian): known quadratics and a tiny quantized model against its dense Hessian."""

from __future__ import annotations

import math

import pytest
import torch

from winq import QuantConfig, prepare
from winq.hessian import (
    HessianOperator,
    hessian_params,
    hutchinson_trace,
    lanczos,
    model_hessian,
    model_spectrum,
    spectrum,
)
from winq.errors import ConfigError


def _quadratic(eigs: torch.Tensor, seed: int = 0):
    """L(x) = 1/2 x^T A x with A = Q diag(eigs) Q^T (float64), at a random x."""
    g = torch.Generator().manual_seed(seed)
    n = eigs.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(eigs) @ Q.T
    x = torch.randn(n, generator=g, dtype=torch.float64, requires_grad=True)
    return A, x, (lambda: 0.5 * x @ A @ x)


def test_quadratic_extremes_trace_and_shares_are_exact():
    eigs = torch.tensor([10.0, 7.5, 3.0, 1.0, 0.5, 1e-5, -1e-5, 0.0, -0.25, -2.0, -4.0, -6.0], dtype=torch.float64)
    eigs = torch.cat([eigs, torch.linspace(-0.1, 0.1, 28, dtype=torch.float64)])  # n = 40
    A, x, loss = _quadratic(eigs)
    op = HessianOperator(loss, [x])
    s = spectrum(op, top_k=4, probes=3, steps=40, seed=1, eps_rel=1e-3)
    ref = eigs.sort(descending=True).values
    assert s.top == pytest.approx(ref[:4].tolist(), rel=1e-4)
    assert s.bottom == pytest.approx(ref.flip(0)[:4].tolist(), rel=1e-4)
    # probes x steps HVPs; the Hutchinson trace comes free from the first Lanczos step of each probe
    assert s.hvps == 3 * 40 and op.hvps == 120
    assert s.trace == pytest.approx(float(eigs.sum()), abs=3 * s.trace_stderr + 1e-9)
    # the standalone Hutchinson estimator (unbiased): 64 seeded probes land within 4 standard errors
    t, se = hutchinson_trace(op, probes=64, seed=3)
    assert abs(t - float(eigs.sum())) < 4 * se
    assert s.near_zero + s.positive_mass + s.negative_mass == pytest.approx(1.0)
    assert 0 < s.near_zero < 0.5 and s.negative_mass > 0.1 and s.positive_mass > 0.1


def test_hvp_is_the_matrix_product():
    eigs = torch.linspace(-3, 5, 25, dtype=torch.float64)
    A, x, loss = _quadratic(eigs, seed=2)
    op = HessianOperator(loss, [x])
    v = torch.randn(25, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), A @ v, rtol=1e-12, atol=1e-12)


def test_lanczos_recovers_a_large_quadratic_spectrum_at_the_ends():
    # n = 400, 60 steps: well-separated extremes converge to 1e-4 relative long before n steps
    bulk = torch.linspace(-0.5, 0.5, 392, dtype=torch.float64)
    ends = torch.tensor([100.0, 80.0, 60.0, 40.0, -30.0, -20.0, -15.0, -10.0], dtype=torch.float64)
    eigs = torch.cat([ends, bulk])
    _, x, loss = _quadratic(eigs, seed=4)
    r = lanczos(HessianOperator(loss, [x]).matvec, torch.ones(400, dtype=torch.float64), 60)
    assert r.ritz.flip(0)[:4].tolist() == pytest.approx([100.0, 80.0, 60.0, 40.0], rel=1e-4)
    assert r.ritz[:4].tolist() == pytest.approx([-30.0, -20.0, -15.0, -10.0], rel=1e-4)
    assert float(r.weights.sum()) == pytest.approx(1.0)


def test_spectrum_is_seeded_and_reproducible():
    _, x, loss = _quadratic(torch.linspace(-1, 2, 30, dtype=torch.float64))
    a = spectrum(HessianOperator(loss, [x]), top_k=2, probes=2, steps=8, seed=5)
    b = spectrum(HessianOperator(loss, [x]), top_k=2, probes=2, steps=8, seed=5)
    c = spectrum(HessianOperator(loss, [x]), top_k=2, probes=2, steps=8, seed=6)
    assert a.to_dict(density=True) | {"seconds": 0} == b.to_dict(density=True) | {"seconds": 0}
    assert a.density != c.density


def test_bad_arguments_are_refused():
    _, x, loss = _quadratic(torch.ones(4, dtype=torch.float64))
    with pytest.raises(ConfigError, match="probes=0"):
        spectrum(HessianOperator(loss, [x]), probes=0)
    with pytest.raises(ConfigError, match="shape"):
        HessianOperator(loss, [x]).matvec(torch.ones(3, dtype=torch.float64))


# ---- a tiny quantized model against torch.autograd.functional.hessian -------------------------
def _tiny_quant_model(bits=4):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tinymodels import make_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        make_config("llama", 48, hidden=16, layers=1, inter=16), dtype=torch.float32
    )
    prepare(model, QuantConfig(bits=bits, group_size=-1, embed="float"))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 48, (2, 9), generator=g) for _ in range(2)]
    return model, batches


def _dense_hessian(model, batches, params):
    from torch.func import functional_call

    from winq.evaluate import lm_loss

    named = hessian_params(model, params)
    names, shapes = list(named), [p.shape for p in named.values()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in named.values()])

    class _Call(torch.nn.Module):  # lm_loss calls model(input_ids=...).logits
        def __call__(self, input_ids):
            return self.fn(input_ids)

    def f(flat):
        sd, i = {}, 0
        for n, s in zip(names, shapes):
            sd[n] = flat[i : i + s.numel()].view(s)
            i += s.numel()
        wrapper = _Call()
        wrapper.fn = lambda input_ids: functional_call(model, sd, (), {"input_ids": input_ids})
        return sum(lm_loss(wrapper, b) for b in batches) / len(batches)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    model.eval()
    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hessian(f, flat0)


@pytest.mark.parametrize("params", ["attention", "mlp"])
def test_tiny_model_matches_dense_hessian(params):
    model, batches = _tiny_quant_model()
    H = _dense_hessian(model, batches, params).double()
    H = 0.5 * (H + H.T)
    lam = torch.linalg.eigvalsh(H)
    n = lam.numel()
    op = model_hessian(model, batches, params)
    assert op.n == n
    # the operator is the dense Hessian applied to a vector (the double backward runs through the STE)
    v = torch.randn(n, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(op.matvec(v).double(), H @ v.double(), rtol=1e-3, atol=1e-5)
    s = model_spectrum(model, batches, params, top_k=3, probes=6, steps=48, seed=0, sigma_frac=0.02)
    scale = float(lam.abs().max())
    assert s.top == pytest.approx(lam.flip(0)[:3].tolist(), abs=1e-3 * scale)
    assert s.bottom[0] == pytest.approx(float(lam[0]), abs=1e-3 * scale)
    assert s.trace == pytest.approx(float(lam.sum()), abs=4 * s.trace_stderr + 1e-6)
    # density: the SLQ estimate and the dense eigenvalues smoothed with the same sigma, on the same grid
    grid = torch.tensor(s.grid, dtype=torch.float64)
    ref = torch.exp(-0.5 * ((grid[:, None] - lam[None, :]) / s.sigma) ** 2).sum(1) / (
        n * s.sigma * math.sqrt(2 * math.pi)
    )
    dx = float(grid[1] - grid[0])
    l1 = float((torch.tensor(s.density) - ref).abs().sum() * dx)
    assert l1 < 0.35, l1
    # cumulative mass below / above zero agree
    true_neg = float((lam < -s.eps).double().mean())
    true_near = float((lam.abs() <= s.eps).double().mean())
    assert s.negative_mass == pytest.approx(true_neg, abs=0.15)
    assert s.near_zero == pytest.approx(true_near, abs=0.2)


def test_model_spectrum_leaves_training_mode_and_weights_alone():
    model, batches = _tiny_quant_model(bits=2)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = model_spectrum(model, batches, "all", top_k=2, probes=1, steps=4)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert s.hvps == 4 and s.n_params == sum(p.numel() for p in hessian_params(model).values())
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ConfigError, match="unknown parameter set"):
        hessian_params(model, "embeddings")


# ---- training log and CLI ------------------------------------------------------------------------
def test_train_logs_hessian_without_changing_the_run(tiny_llama, text_file, tmp_path):
    import json

    from winq import TrainConfig
    from winq.train import train

    def run(out, **kw):
        tcfg = TrainConfig(method="winq", steps=4, lr=2e-3, seq_len=16, batch_size=2, reinit_every=2)
        qc = QuantConfig(bits=2, group_size=-1, embed="float")
        return train(str(tiny_llama), str(text_file), qc, tcfg, out, progress=False, **kw)

    a = run(tmp_path / "h", hessian_every=2, hessian_options={"probes": 1, "steps": 4, "top_k": 2, "batches": 1})
    b = run(tmp_path / "p")
    logged = [json.loads(l) for l in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "hessian" in r] == [2, 4]
    h = next(r for r in logged if r["step"] == 2 and "loss" in r)["hessian"]
    assert h["hvps"] == 4 and h["lambda_max"] >= h["lambda_min"]
    # the measurement leaves training alone
    assert [r["loss"] for r in a.records if "loss" in r] == [r["loss"] for r in b.records if "loss" in r]


def test_cli_hessian_writes_json_and_plot(tiny_llama, text_file, tmp_path):
    import json

    from typer.testing import CliRunner

    from winq import TrainConfig
    from winq.cli.main import app
    from winq.train import train

    ck = tmp_path / "ck"
    qc = QuantConfig(bits=4, group_size=-1, embed="float")
    train(str(tiny_llama), str(text_file), qc, TrainConfig(steps=1, seq_len=16), ck, progress=False)
    out = tmp_path / "res" / "h.json"
    args = [
        "hessian",
        "--checkpoint",
        ck,
        "--data",
        text_file,
        "--batches",
        1,
        "--seq-len",
        16,
        "--top-k",
        2,
        "--probes",
        2,
        "--steps",
        4,
        "--by-type",
        "--out",
        out,
    ]
    r = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "300", "NO_COLOR": "1"})
    assert r.exit_code == 0, r.output
    assert "lambda_max" in r.output and "attention" in r.output and "mlp" in r.output
    d = json.loads(out.read_text())
    assert set(d["summaries"]) == {"all", "attention", "mlp"}
    assert d["summaries"]["all"]["hvps"] == 8 and len(d["summaries"]["all"]["density"]) == 512
    assert out.with_suffix(".png").stat().st_size > 1000
    r = CliRunner().invoke(app, [str(a) for a in args[:-2] + ["--batches", 10**6, "--out", out]])
    assert r.exit_code == 1 and "lower --batches" in " ".join(r.stderr.split())
