"""K grids and recipes through the whole GGUF export: every tensor written as the type it trained in, read back
with error 0, llama.cpp running the file like the fake-quant model, and the integer-container formats refusing
K grids by name. On a 256-aligned tiny Llama (every layer a K type) and on one with rows of 96 (llama.cpp's
fallback types for the rows that are not whole super-blocks).

The llama.cpp test needs `pip install "winq[llamacpp]"` and skips with that reason otherwise.
"""

from __future__ import annotations

import json

import pytest

from winq.errors import ConfigError
from winq.exporters import export

from test_gguf import check_llamacpp_matches_fake_quant, need_llamacpp
from test_gptq import make_checkpoint

# (hidden, inter, recipe) -> the GGUF types of the blk.* weight tensors
CASES = {
    (256, 512, "q4_k_m"): {"Q4_K", "Q6_K"},
    (256, 512, "q2_k"): {"Q2_K"},
    (256, 512, "q3_k"): {"Q3_K"},
    (256, 512, "q5_k_m"): {"Q5_K", "Q6_K"},
    (96, 256, "q4_k_m"): {"Q4_K", "Q6_K", "Q5_0", "Q8_0"},
    (96, 256, "q3_k"): {"Q3_K", "Q4_0"},
    (96, 256, "q6_k"): {"Q6_K", "Q8_0"},
}


@pytest.fixture(scope="module")
def kq_exports(tmp_path_factory):
    from tinymodels import make_model_dir

    root = tmp_path_factory.mktemp("kq")
    bases, out = {}, {}
    for hidden, inter, recipe in CASES:
        if (hidden, inter) not in bases:
            bases[hidden, inter] = make_model_dir(root / f"m{hidden}", "llama", seed=0, hidden=hidden, inter=inter,
                                                  layers=4)
        ck = make_checkpoint(bases[hidden, inter], root / f"ck{hidden}{recipe}", None, 4, 32, recipe=recipe)
        out[hidden, inter, recipe] = ck, export("gguf", ck, root / f"g{hidden}{recipe}" / "model.gguf")
    return out


@pytest.mark.parametrize("case", list(CASES), ids=lambda c: f"{c[0]}-{c[2]}")
def test_every_tensor_in_its_trained_type_read_back_exactly(kq_exports, case):
    from gguf import GGUFReader

    ck, res = kq_exports[case]
    m = json.loads((res.out.parent / "winq-export.json").read_text())
    assert m["summary"]["max_abs_err"] == 0.0 and all(t["max_abs_err"] == 0.0 for t in m["tensors"])
    r = GGUFReader(str(res.out))
    types = {t.tensor_type.name for t in r.tensors if t.name.startswith("blk.") and "norm" not in t.name}
    assert types == CASES[case]
    kq = [t for t in m["tensors"] if t["grid"].endswith("_k")]
    assert kq and {t["container"] for t in kq} == {f"{t['grid'].upper()}: native (trained sub-block scales)"
                                                   for t in kq}


def test_inspect_names_the_k_types(kq_exports):
    from winq.runtime.inspection import inspect_gguf

    _, res = kq_exports[256, 512, "q4_k_m"]
    info = inspect_gguf(res.out)
    assert set(info["totals"]["types"]) >= {"Q4_K", "Q6_K"}


@pytest.mark.parametrize("fmt,needle", [("onnx", "MatMulNBits cannot hold grid 'q2_k'"),
                                        ("gptq", "GPTQ cannot hold grid 'q2_k'")])
def test_gptq_and_onnx_refuse_k_grids_naming_gguf(kq_exports, tmp_path, fmt, needle):
    ck, _ = kq_exports[256, 512, "q2_k"]
    out = tmp_path / fmt
    with pytest.raises(ConfigError, match=needle + r".*two-level.*--format gguf \(Q2_K, exact\)"):
        export(fmt, ck, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", list(CASES), ids=lambda c: f"{c[0]}-{c[2]}")
def test_llamacpp_runs_k_exports_like_the_fake_quant_model(kq_exports, case):
    """Bit-exact weights; llama.cpp rounds the activations to Q8_K in front of the K types (Q8_0 for the others),
    so the logits are held to the thresholds of the Q4_0 exports (test_gguf.py). Measured on these models:
    max |dlogit| at most 0.024, |relative ppl difference| at most 5.8e-4."""
    need_llamacpp()
    ck, res = kq_exports[case]
    check_llamacpp_matches_fake_quant(ck, res.out)
