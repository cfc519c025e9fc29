"""Never start worse than post-training quantization: the step-0 export, scored by llama.cpp, is no worse than
llama.cpp's own quantization of the same float weights to the same type (Q4_0, without an imatrix)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

from test_gguf import need_llamacpp
from tinymodels import make_model_dir, synthetic_text


def _llama_quantize(src: Path, dst: Path, ftype: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize returned {rc}"


def _kl_to(ref, other, ids, window=128) -> float:
    import torch.nn.functional as F

    total, n = 0.0, 0
    for s in range(0, ids.numel() - window + 1, window):
        x = ids[s : s + window]
        lp, lq = F.log_softmax(ref.logits(x).double(), -1), F.log_softmax(other.logits(x).double(), -1)
        total += float((lp.exp() * (lp - lq)).sum())
        n += window
    return total / n


@pytest.mark.parametrize("init", ["gptq", pytest.param("search", marks=pytest.mark.slow)])
def test_step0_export_no_worse_than_llamacpp_q4_0(tmp_path, init):
    need_llamacpp()
    import llama_cpp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from winq.config import QuantConfig, TrainConfig
    from winq.exporters import export
    from winq.exporters.gguf import GGUFOptions, write_gguf
    from winq.runtime.llamacpp import LlamaCppSession
    from winq.runtime.session import LoadOptions
    from winq.train import train

    text = tmp_path / "train.txt"
    text.write_text(synthetic_text(800, seed=3))
    model_dir = make_model_dir(tmp_path / "m", "llama", seed=5, hidden=64, inter=128, layers=2)
    # winq's step 0: the calibrated quantizer, no training (one step at lr 1e-12), exported as Q4_0 + Q8_0 table
    ck = tmp_path / "ck"
    train(str(model_dir), str(text), QuantConfig(init=init, calib_tokens=2048), TrainConfig(
        steps=1, lr=1e-12, distill=0.0, seq_len=64, eval_every=0), ck, progress=False)
    export("gguf", ck, tmp_path / "winq" / "model.gguf")
    # llama.cpp's Q4_0 of the same floats, from an F16 file of the float model
    net = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    f16 = tmp_path / "f16.gguf"
    write_gguf(f16, net, {}, tok, model_dir, GGUFOptions(keep="f16"), float_weights=True)
    q4 = tmp_path / "q4_0.gguf"
    _llama_quantize(f16, q4, llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0)
    ids = torch.tensor(tok(synthetic_text(200, seed=11))["input_ids"][:1024])
    opts = LoadOptions(threads=2, context=128)
    ref = LlamaCppSession(f16, opts)
    kl_winq = _kl_to(ref, LlamaCppSession(tmp_path / "winq" / "model.gguf", opts), ids)
    kl_llama = _kl_to(ref, LlamaCppSession(q4, opts), ids)
    assert kl_winq <= kl_llama, (kl_winq, kl_llama)
    # the tensors take no more bytes (winq's table is Q8_0, as llama.cpp stores it in a Q4_0 file of these widths;
    # the files differ by metadata: winq's record of the export)
    from gguf import GGUFReader

    def tensor_bytes(path):
        return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)

    assert tensor_bytes(tmp_path / "winq" / "model.gguf") <= tensor_bytes(q4)
