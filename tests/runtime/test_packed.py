"""The packed runtime model and the backend comparison: exact against the fake-quant model in fp32 on CPU."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import winq
from winq import QuantConfig
from winq.errors import ModelError
from winq.evaluate import perplexity
from winq.runtime.compare import compare, model_logits_fn
from winq.runtime.packed import PackedLinear, load_packed, pack_model

_OLD = dict(embed="float")  # float embeddings, as these configurations were written for
CONFIGS = [QuantConfig(bits=2, group_size=-1, **_OLD), QuantConfig(bits=3, group_size=16, **_OLD),
           QuantConfig(bits=4, group_size=32, **_OLD), QuantConfig(bits=8, group_size=-1, **_OLD),
           QuantConfig(bits=2, grid="ternary", group_size=-1, **_OLD),
           QuantConfig(bits=4, grid="affine", group_size=16, **_OLD)]


def _prepared(path, qcfg, seed=0):
    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    winq.prepare(m, qcfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move off the initial scales so the test is not about init values
        for layer in winq.quant_layers(m).values():
            layer.alpha.mul_(1 + 0.1 * torch.rand(layer.alpha.shape, generator=g))
    return m.eval()


@pytest.mark.parametrize("qcfg", CONFIGS, ids=lambda q: f"{q.grid}{q.bits}g{q.group_size}")
def test_packed_linear_dequantizes_exactly(tiny_llama, qcfg):
    m = _prepared(tiny_llama, qcfg)
    for name, layer in winq.quant_layers(m).items():
        p = PackedLinear.from_quantized_weight(layer.quantized_weight())
        assert p.qweight.dtype == torch.int32 and p.scales.dtype == torch.float16
        assert torch.equal(p.dequantize(), layer.fake_weight()), name


@pytest.mark.parametrize("qcfg", CONFIGS, ids=lambda q: f"{q.grid}{q.bits}g{q.group_size}")
def test_packed_model_matches_fakequant(tiny_llama, qcfg, text_file):
    m = _prepared(tiny_llama, qcfg)
    import copy

    p = pack_model(copy.deepcopy(m))
    assert not winq.quant_layers(p) and any(isinstance(x, PackedLinear) for x in p.modules())
    ids = torch.randint(0, m.config.vocab_size, (200,), generator=torch.Generator().manual_seed(1))
    a, b = perplexity(m, ids, seq_len=64), perplexity(p, ids, seq_len=64)
    assert abs(b.ppl / a.ppl - 1) <= 1e-6
    x = ids[None, :50]
    torch.testing.assert_close(p(x).logits, m(x).logits, atol=1e-5, rtol=0)


def test_load_packed_from_checkpoint(tiny_llama, tmp_path):
    from winq.checkpoint import load_checkpoint, save_checkpoint
    from transformers import AutoTokenizer

    m = _prepared(tiny_llama, QuantConfig(bits=3, group_size=32, embed="float"))
    save_checkpoint(tmp_path / "ck", m, AutoTokenizer.from_pretrained(str(tiny_llama)),
                    QuantConfig(bits=3, group_size=32, embed="float"), None)
    p = load_packed(tmp_path / "ck")
    f, _, _ = load_checkpoint(tmp_path / "ck")
    x = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(p(input_ids=x).logits, f(input_ids=x).logits, atol=1e-5, rtol=0)
    with pytest.raises(ModelError, match="neither a winq checkpoint"):
        load_packed(tmp_path)


def test_load_packed_from_gptq_export(tiny_llama, tmp_path):
    """The runtime reads winq's GPTQ folder (its own packed layout) and gives the fake-quant logits."""
    from transformers import AutoTokenizer

    from winq.checkpoint import load_checkpoint, save_checkpoint
    from winq.exporters import export

    for i, (qcfg, fmt) in enumerate([(QuantConfig(bits=4, group_size=32, **_OLD), "gptq"),
                                     (QuantConfig(bits=2, grid="ternary", group_size=-1, **_OLD), "gptq_v2"),
                                     (QuantConfig(bits=8, group_size=-1, **_OLD), "gptq")]):  # 3-bit: out % 32
        m = _prepared(tiny_llama, qcfg, seed=i)
        ck = tmp_path / f"ck{i}"
        save_checkpoint(ck, m, AutoTokenizer.from_pretrained(str(tiny_llama)), qcfg, None)
        try:
            export("gptq", ck, tmp_path / f"g{i}", checkpoint_format=fmt, float_dtype="float32")
        except winq.WinqError as e:
            pytest.fail(f"export failed: {e}")
        p = load_packed(tmp_path / f"g{i}")
        f, _, _ = load_checkpoint(ck)
        qf = winq.quantized_weights(f)
        for name, layer in ((n, x) for n, x in p.named_modules() if isinstance(x, PackedLinear)):
            assert torch.equal(layer.dequantize(), qf[name].dequantize()), name
        x = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(p(input_ids=x).logits, f(input_ids=x).logits, atol=1e-5, rtol=0)


def test_compare_reports_kl_and_agreement(tiny_llama):
    m = _prepared(tiny_llama, QuantConfig(bits=4, group_size=-1, embed="float"))
    fp = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    ids = torch.randint(0, m.config.vocab_size, (150,), generator=torch.Generator().manual_seed(4))
    res = compare({"fakequant": model_logits_fn(m), "same": model_logits_fn(m), "fp": model_logits_fn(fp)}, ids,
                  seq_len=48)
    r = res["results"]
    assert res["reference"] == "fakequant" and r["fakequant"]["tokens"] == 149
    assert r["same"]["kl"] == 0 and r["same"]["top1_agreement"] == 1 and r["same"]["ppl_rel_diff"] == 0
    assert r["fp"]["kl"] > 0 and 0 <= r["fp"]["top1_agreement"] <= 1
    ref = perplexity(m, ids, seq_len=48)
    assert r["fakequant"]["ppl"] == pytest.approx(ref.ppl, rel=1e-6)  # float64 vs float32 log-softmax
    assert math.isfinite(r["fp"]["ppl"])
