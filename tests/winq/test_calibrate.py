"""The step-0 quantizer (winq.calibrate), Q8_0 embeddings, distillation and keep-best."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from winq import calibrate as C
from winq.config import QuantConfig, TrainConfig
from winq.errors import ConfigError, DataError
from winq.grids import GridSpec
from winq.prepare import prepare, quant_layers, snap_q8_0, target_linears
from winq.qlinear import QuantLinear


def _weighted_err(m, w, h, alpha, zero=None):
    return float((h.reshape(1, w.shape[1], w.shape[2]) * (w - C.qdq(m, w, alpha, zero)) ** 2).sum())


def test_snap_q8_0_is_idempotent_under_gguf_q8_0():
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    torch.manual_seed(0)
    x = torch.randn(48, 96) * 0.07
    x[3, :32] = 0.0  # an all-zero block
    s = snap_q8_0(x)
    back = dequantize(quantize(s.numpy(), GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0).reshape(s.shape)
    assert np.array_equal(back, s.numpy())
    assert float((s - x).abs().max()) <= float(x.abs().max()) / 127  # within half a step of the largest block
    assert torch.equal(snap_q8_0(s), s)


@pytest.mark.parametrize("grid,bits", [("lsq", 4), ("lsq", 3), ("seq", 2), ("affine", 4), ("nl4", 4)])
def test_search_never_worse_than_the_max_rule(grid, bits):
    torch.manual_seed(1)
    lin = torch.nn.Linear(64, 24)
    lin.weight.data = torch.randn(24, 64) * torch.rand(24, 1)
    m = QuantLinear.from_linear(lin, grid, bits, 32)
    w = m._grouped(m.weight.detach())
    h = torch.rand(64) + 0.1
    best = C.search_alpha(m, w, h)[..., None]
    base = m.spec.init_alpha(w)
    zb = m.spec.init_zero(w, base) if grid == "affine" else None
    zs = m.spec.init_zero(w, best.abs()) if grid == "affine" else None
    # per group: the search's candidates include the max rule (factor 1.0)
    e_best = (h.reshape(1, 2, 32) * (w - C.qdq(m, w, best, zs)) ** 2).sum(-1)
    e_base = (h.reshape(1, 2, 32) * (w - C.qdq(m, w, base, zb)) ** 2).sum(-1)
    assert (e_best <= e_base * (1 + 1e-6)).all()
    assert float(e_best.sum()) < float(e_base.sum())


def test_mirrored_lattice_helps_lsq_and_beats_q4_0_rule():
    torch.manual_seed(2)
    lin = torch.nn.Linear(128, 64)
    m = QuantLinear.from_linear(lin, "lsq", 4, 32)
    w = m._grouped(m.weight.detach())
    h = torch.ones(128)
    signed, unsigned = C.search_alpha(m, w, h, signed=True), C.search_alpha(m, w, h, signed=False)
    assert (signed < 0).any() and (signed > 0).any()
    assert _weighted_err(m, w, h, signed[..., None]) < _weighted_err(m, w, h, unsigned[..., None])
    # llama.cpp's Q4_0 rule: d = (the largest-magnitude value, signed) / -8
    ext = torch.gather(w, -1, w.abs().argmax(-1, keepdim=True))
    q4_0 = (ext / -8).to(torch.float16).float()
    assert _weighted_err(m, w, h, signed[..., None]) <= _weighted_err(m, w, h, q4_0)


def test_negative_alpha_fake_quant_equals_export_and_fused_grads_match():
    torch.manual_seed(3)
    lin = torch.nn.Linear(64, 8)
    m = QuantLinear.from_linear(lin, "lsq", 4, 32)
    with torch.no_grad():
        m.alpha.mul_(torch.tensor([[-1.0, 1.0]]))
    qw = m.quantized_weight()
    assert (qw.scale.float() < 0).any()
    assert torch.equal(qw.dequantize(), m.fake_weight())
    x = torch.randn(5, 64)
    m.train()
    m(x).pow(2).sum().backward()  # fused path
    gw, ga = m.weight.grad.clone(), m.alpha.grad.clone()
    m.zero_grad()
    torch.nn.functional.linear(x, m.fake_weight(), m.bias).pow(2).sum().backward()  # composite path
    assert torch.allclose(gw, m.weight.grad, atol=1e-6) and torch.allclose(ga, m.alpha.grad, atol=1e-5)


def _tiny(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32), \
        AutoTokenizer.from_pretrained(str(tiny_llama))


def _batches(tok, text_file, n=8):
    from winq.data import token_ids

    return C.calibration_batches(token_ids(str(text_file), "train", tok), n * 64, seed=0, seq_len=64)


def test_gptq_lowers_the_layer_output_error(tiny_llama, text_file):
    net, tok = _tiny(tiny_llama)
    cfg = QuantConfig(bits=4, group_size=32, init="gptq", embed="float")
    names = target_linears(net, cfg)
    H = C.collect_hessians(net, names, _batches(tok, text_file))
    assert all(H[n].shape == (net.get_submodule(n).in_features,) * 2 for n in names)
    float_w = {n: net.get_submodule(n).weight.detach().clone() for n in names}
    prepare(net, cfg)
    C.initialize(net, "search", H)
    search = {n: m.fake_weight().detach().clone() for n, m in quant_layers(net).items()}
    C.initialize(net, "gptq", H)
    for n, m in quant_layers(net).items():
        def out_err(wq):
            d = (float_w[n] - wq).double()
            return float(torch.trace(d @ H[n] @ d.t()))
        assert out_err(m.fake_weight().detach()) < out_err(search[n]), n
        # the latent weights round to GPTQ's codes: the exported weights are the forward's
        assert torch.equal(m.quantized_weight().dequantize(), m.fake_weight())


def test_shared_inputs_share_one_accumulator(tiny_llama, text_file):
    net, tok = _tiny(tiny_llama)
    names = target_linears(net, QuantConfig())
    H = C.collect_hessians(net, names, _batches(tok, text_file, 2))
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    o = "model.layers.0.self_attn.o_proj"
    assert H[q] is H[k] and H[o] is not H[q]
    d = C.collect_hessians(net, names, _batches(tok, text_file, 2), diag=True)
    assert torch.allclose(d[o], torch.diag(H[o]))


def test_calibration_refuses_short_data_and_bad_settings():
    with pytest.raises(DataError, match="at least 512"):
        C.calibration_batches(torch.arange(100), 4096, seed=0)
    with pytest.raises(ConfigError, match="at least 512 calibration tokens"):
        QuantConfig(calib_tokens=10)
    with pytest.raises(ConfigError, match="init='bogus'"):
        QuantConfig(init="bogus")
    with pytest.raises(ConfigError, match="embed="):
        QuantConfig(embed="q4")
    with pytest.raises(ConfigError, match=r"distill=2"):
        TrainConfig(distill=2)


def test_old_checkpoints_read_as_reference_init_and_float_embeddings():
    cfg = QuantConfig.from_dict({"bits": 4, "grid": "lsq", "group_size": -1})
    assert cfg.init == "max" and cfg.embed == "float"


def test_kd_loss():
    from winq.evaluate import kd_loss, lm_loss

    torch.manual_seed(4)
    from tinymodels import make_config

    a = AutoModelForCausalLM.from_config(make_config("llama", 50)).eval()
    b = AutoModelForCausalLM.from_config(make_config("llama", 50)).eval()
    blk = torch.randint(0, 50, (2, 9))
    assert float(kd_loss(a, blk, a).detach()) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(a, blk, b)) > 0
    assert float(kd_loss(a, blk, b, weight=0.0)) == pytest.approx(float(lm_loss(a, blk)), rel=1e-5)


def test_teacher_with_another_vocabulary_is_refused(tiny_llama, text_file, tmp_path):
    from tinymodels import make_model_dir

    from winq.train import train

    other = make_model_dir(tmp_path / "other", "llama", seed=1, text="completely different words here\n" * 50)
    with pytest.raises(ConfigError, match="another vocabulary"):
        train(str(tiny_llama), str(text_file), QuantConfig(), TrainConfig(steps=1), tmp_path / "out",
              progress=False, teacher=str(other))
    assert not (tmp_path / "out").exists()


def test_recipe_end_to_end_tiny(tiny_llama, text_file, tmp_path):
    """gptq init + distillation + Q8_0 embeddings + keep-best: the run logs the step-0 KL, the tables stay on
    Q8_0's lattice untouched, and the kept state is the best evaluated one."""
    from winq.checkpoint import load_checkpoint
    from winq.train import train

    tcfg = TrainConfig(steps=4, lr=5e-3, eval_every=2, eval_batches=2, seq_len=32, batch_size=2)
    res = train(str(tiny_llama), str(text_file), QuantConfig(calib_tokens=1024), tcfg, tmp_path / "run",
                progress=False)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["step"] == 0 and "eval_kl" in recs[0] and recs[0]["init"]["init"] == "gptq"
    evals = {r["step"]: r["eval_kl"] for r in recs if "eval_kl" in r}
    info = json.loads((tmp_path / "run" / "winq.json").read_text())
    kept = info["kept"]
    assert kept["metric"] == "eval_kl" and kept["score"] == min(evals.values())
    assert evals[kept["step"]] == min(evals.values())
    net, _, _ = load_checkpoint(tmp_path / "run")
    emb = net.get_input_embeddings().weight.detach()
    assert torch.equal(snap_q8_0(emb), emb)
    base, _ = _tiny(tiny_llama)
    assert torch.equal(emb, snap_q8_0(base.get_input_embeddings().weight.detach()))
    assert res.step == 4


def test_gguf_export_stores_trained_q8_0_tables_exactly(tiny_llama, text_file, tmp_path):
    from winq.exporters import export
    from winq.train import train

    tcfg = TrainConfig(steps=1, seq_len=32, distill=0.0)
    train(str(tiny_llama), str(text_file), QuantConfig(calib_tokens=1024), tcfg, tmp_path / "run", progress=False)
    export("gguf", tmp_path / "run", tmp_path / "gguf" / "model.gguf")
    man = json.loads((tmp_path / "gguf" / "winq-export.json").read_text())
    pt = man["info"]["post_training"]
    assert pt["exact"] is True and all(t["max_abs_err"] == 0.0 for t in pt["tensors"])
    assert man["info"]["keep"] == "q8_0"


def test_nl4_spec_exists_for_search():
    assert GridSpec("nl4", 4).asymmetric
