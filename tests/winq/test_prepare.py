"""prepare / quantized_weights / convert on tiny Hugging Face decoders (ARCHITECTURE §1-3)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import winq
from winq import ConfigError, ModelError, QuantConfig, QuantizedWeight, QuantLinear

transformers = pytest.importorskip("transformers")

DECODER_LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
N_LAYERS = 2
# hidden / intermediate sizes differ per family so that several shapes are covered
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", 32, 64),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", 48, 80),  # q/k/v carry a bias
    "mistral": ("MistralConfig", "MistralForCausalLM", 64, 96),
}


def tiny_model(arch: str, seed: int = 0, **overrides) -> nn.Module:
    cfg_name, model_name, hidden, inter = ARCHS[arch]
    kw = dict(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=N_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False,
    )
    kw.update(overrides)
    cfg = getattr(transformers, cfg_name)(**kw)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg)
    return model.eval()


def expected_names(skip=()):
    return [
        f"model.layers.{i}.{sub}" for i in range(N_LAYERS) for sub in DECODER_LINEARS
        if not any(s in f"model.layers.{i}.{sub}" for s in skip)
    ]


def input_ids(seed=0):
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(seed))


def module_types(model):
    return {n: type(m) for n, m in model.named_modules()}


# ---------------------------------------------------------------------------------------
# which layers are swapped
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("bits", [2, 4])
def test_prepare_swaps_decoder_linears(arch, bits):
    model = tiny_model(arch)
    before = module_types(model)
    orig = {n: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
            for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    cfg = QuantConfig(bits=bits, group_size=-1, embed="float")
    out = winq.prepare(model, cfg)
    assert out is model
    assert model.winq_quant_config == cfg

    names = expected_names()
    qlayers = winq.quant_layers(model)
    assert list(qlayers) == names  # in module order
    for n, m in qlayers.items():
        assert type(m) is QuantLinear
        assert (m.spec.grid, m.spec.bits, m.group_size) == (cfg.grid, bits, m.in_features)
        w, b = orig[n]
        assert torch.equal(m.weight.detach(), w)  # latent weight copied as is
        assert (m.bias is None) == (b is None)
        if b is not None:
            assert torch.equal(m.bias.detach(), b)
        assert torch.isfinite(m.alpha).all() and (m.alpha > 0).all()
    if arch == "qwen2":
        assert qlayers["model.layers.0.self_attn.q_proj"].bias is not None

    # everything else keeps its exact type: lm_head, embeddings, norms, rotary, containers
    after = module_types(model)
    assert set(after) == set(before)
    for n, t in after.items():
        if n not in names:
            assert t is before[n], n
    assert type(model.lm_head) is nn.Linear
    assert type(model.model.embed_tokens) is nn.Embedding
    assert type(model.model.norm) is before["model.norm"]
    assert "RMSNorm" in type(model.model.norm).__name__
    assert torch.equal(model.lm_head.weight.detach(), orig["lm_head"][0])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_quantize_lm_head(arch):
    model = tiny_model(arch)
    winq.prepare(model, QuantConfig(bits=4, quantize_lm_head=True, group_size=-1, embed="float"))
    assert list(winq.quant_layers(model)) == expected_names() + ["lm_head"]
    assert isinstance(model.lm_head, QuantLinear)
    assert type(model.model.embed_tokens) is nn.Embedding


@pytest.mark.parametrize("arch", list(ARCHS))
def test_skip_mlp(arch):
    model = tiny_model(arch)
    winq.prepare(model, QuantConfig(bits=2, skip=("mlp",), group_size=-1, embed="float"))
    names = list(winq.quant_layers(model))
    assert names == expected_names(skip=("mlp",))
    assert len(names) == 4 * N_LAYERS and all("self_attn" in n for n in names)
    for i in range(N_LAYERS):
        for sub in ("gate_proj", "up_proj", "down_proj"):
            assert type(getattr(model.model.layers[i].mlp, sub)) is nn.Linear


def test_target_linears_matches_prepare():
    model = tiny_model("llama")
    cfg = QuantConfig(bits=3, skip=("k_proj", "down"), group_size=-1, embed="float")
    from winq.prepare import target_linears

    targets = target_linears(model, cfg)
    winq.prepare(model, cfg)
    assert targets == list(winq.quant_layers(model)) == expected_names(skip=("k_proj", "down"))


# ---------------------------------------------------------------------------------------
# quantized_weights and the converted model
# ---------------------------------------------------------------------------------------
CASES = [
    ("llama", QuantConfig(bits=2, group_size=-1, embed="float")),
    ("qwen2", QuantConfig(bits=4, group_size=-1, embed="float")),
    ("mistral", QuantConfig(bits=1, group_size=-1, embed="float")),
    ("llama", QuantConfig(bits=3, group_size=16, embed="float")),
    ("qwen2", QuantConfig(bits=4, grid="affine", group_size=16, embed="float")),
    ("mistral", QuantConfig(bits=2, grid="ternary", group_size=32, quantize_lm_head=True, embed="float")),
]


@pytest.mark.parametrize("arch,cfg", CASES, ids=lambda v: v if isinstance(v,
                                                                          str) else f"{v.grid}{v.bits}g{v.group_size}")
def test_quantized_weights_and_convert(arch, cfg):
    model = tiny_model(arch, seed=1)
    ids = input_ids(1)
    with torch.no_grad():
        fp_logits = model(ids).logits
    winq.prepare(model, cfg)
    model.eval()

    qws = winq.quantized_weights(model)
    layers = winq.quant_layers(model)
    assert list(qws) == list(layers)
    assert len(qws) == len(expected_names()) + (1 if cfg.quantize_lm_head else 0)
    for n, qw in qws.items():
        m = layers[n]
        assert isinstance(qw, QuantizedWeight)
        assert (qw.grid, qw.bits) == (cfg.grid, cfg.bits)
        assert qw.group_size == (m.in_features if cfg.group_size == -1 else cfg.group_size)
        assert qw.shape == (m.out_features, m.in_features)
        assert torch.equal(qw.dequantize(), m.fake_weight().detach()), n

    with torch.no_grad():
        q_logits = model(ids).logits
    converted = winq.convert(copy.deepcopy(model))
    assert not winq.quant_layers(converted)
    for n in layers:
        lin = converted.get_submodule(n)
        assert type(lin) is nn.Linear
        assert torch.equal(lin.weight.detach(), qws[n].dequantize())
        if layers[n].bias is not None:
            assert torch.equal(lin.bias.detach(), layers[n].bias.detach())
    with torch.no_grad():
        c_logits = converted(ids).logits
    assert torch.equal(q_logits, c_logits)
    assert not torch.equal(q_logits, fp_logits)  # the quantizer is really in the forward
    assert torch.isfinite(q_logits).all()
    # the prepared model is untouched by convert(deepcopy(...))
    assert list(winq.quant_layers(model)) == list(layers)


def test_quantized_weights_requires_prepare():
    with pytest.raises(ModelError, match=r"prepare"):
        winq.quantized_weights(tiny_model("llama"))


def test_prepare_init_false_leaves_alpha_at_one():
    model = tiny_model("llama")
    winq.prepare(model, QuantConfig(bits=4, group_size=-1, embed="float"), init=False)
    for m in winq.quant_layers(model).values():
        assert torch.equal(m.alpha.detach(), torch.ones_like(m.alpha))


# ---------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------
def test_group_size_not_dividing_names_the_layer():
    model = tiny_model("mistral")  # hidden 64, intermediate 96: only down_proj (in=96) fails for 64
    before = module_types(model)
    with pytest.raises(ConfigError, match=r"group_size=64 does not divide in_features=96 of "
                                          r"model\.layers\.0\.mlp\.down_proj") as e:
        winq.prepare(model, QuantConfig(bits=4, group_size=64, embed="float"))
    assert f"{N_LAYERS} layers affected" in str(e.value)
    # nothing was swapped: the check runs before any layer is replaced
    assert module_types(model) == before
    assert not hasattr(model, "winq_quant_config")

    model = tiny_model("qwen2")  # hidden 48: the first offending layer is q_proj
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        winq.prepare(model, QuantConfig(bits=4, group_size=32, embed="float"))


def test_prepare_twice_raises():
    model = tiny_model("llama")
    winq.prepare(model, QuantConfig(bits=4, group_size=-1, embed="float"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelError, match=r"already prepared"):
        winq.prepare(model, QuantConfig(bits=2, group_size=-1, embed="float"))
    assert model.winq_quant_config == QuantConfig(bits=4, group_size=-1, embed="float")
    new_state = model.state_dict()
    assert set(new_state) == set(state) and all(torch.equal(new_state[k], state[k]) for k in state)


def test_model_without_linear_raises():
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    with pytest.raises(ModelError, match=r"no torch\.nn\.Linear.*Embedding") as e:
        winq.prepare(model, QuantConfig(bits=4, group_size=-1, embed="float"))
    assert isinstance(e.value, winq.WinqError)
    # a model whose only Linear is the skipped output projection has nothing to quantize either
    with pytest.raises(ModelError, match=r"no torch\.nn\.Linear"):
        winq.prepare(tiny_model("llama"), QuantConfig(bits=4, skip=("layers",), group_size=-1, embed="float"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weight_raises_at_prepare(bad):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = bad
    with pytest.raises(ModelError, match=r"NaN"):
        winq.prepare(model, QuantConfig(bits=4, group_size=-1, embed="float"))


def test_nan_prepare_leaves_model_unchanged():
    model = tiny_model("llama")
    before = module_types(model)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(ModelError):
        winq.prepare(model, QuantConfig(bits=4, group_size=-1, embed="float"))
    assert module_types(model) == before


# ---------------------------------------------------------------------------------------
# import hygiene (ARCHITECTURE §1)
# ---------------------------------------------------------------------------------------
_IMPORT_PROBE = r"""
import json, sys
import torch  # torch's own imports are not winq's business

HEAVY = {"triton", "onnxruntime", "llama_cpp", "gptqmodel"}

class Recorder:
    def __init__(self):
        self.seen = []
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            self.seen.append(name)
        return None  # let the normal finders decide

rec = Recorder()
sys.meta_path.insert(0, rec)
import winq
print(json.dumps({
    "attempted": rec.seen,
    "loaded": sorted(m for m in sys.modules if m.split(".")[0] in HEAVY),
    "subpackages": sorted(m for m in sys.modules
                          if m.split(".")[:2] in (["winq", "exporters"], ["winq", "runtime"], ["winq", "cli"])),
    "cuda_initialized": torch.cuda.is_initialized(),
    "winq_file": winq.__file__,
}))
"""


def test_import_winq_is_light():
    res = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["winq_file"].endswith("__init__.py")
    assert info["loaded"] == []
    assert info["attempted"] == []  # not even a guarded `try: import triton`
    assert info["subpackages"] == []  # core imports no exporter / runtime / cli
    assert info["cuda_initialized"] is False
