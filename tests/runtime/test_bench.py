"""winq.runtime.bench (run.py, measure.py) and the timing loop (winq.runtime.session): the worker, planning and
its refusals, on a tiny seeded Llama."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import winq
from winq.errors import ConfigError, MissingDependencyError
from winq.runtime import backends
from winq.runtime.bench import run as bench
from winq.runtime.backends import Backend, LoadOptions, Session, TorchSession, get_backend, time_session
from winq.runtime.bench.measure import artifact_bytes
from winq.runtime.bench.run import BenchError, BenchSpec, plan, run_job, worker


def save_tiny_checkpoint(base: Path, out: Path, bits: int = 4, seed: int = 0) -> Path:
    """prepare() a tiny base model with jittered scales and save it as a winq checkpoint (no training)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from winq.checkpoint import save_checkpoint

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(base))
    cfg = winq.QuantConfig(bits=bits, group_size=-1, embed="float")
    winq.prepare(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in winq.quant_layers(model).values():
            m.alpha.mul_(1 + 0.2 * torch.rand(m.alpha.shape, generator=g))
    return save_checkpoint(out, model, tok, cfg, None)


@pytest.fixture(scope="module")
def ckpt(tiny_llama, tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tiny_llama, tmp_path_factory.mktemp("bench") / "ckpt")


IDS = [5, 17, 42, 8, 99, 100, 3, 64, 21, 7, 250, 11]


def test_torch_bench_decodes_greedily_with_the_kv_cache(ckpt):
    """The decode loop's tokens are what a full forward over the growing sequence picks (the cache is used right)."""
    from winq.checkpoint import load_checkpoint

    net, _, _ = load_checkpoint(ckpt)
    res = time_session(TorchSession(net), IDS, n_gen=5, repeats=2)
    seq = list(IDS)
    with torch.no_grad():
        for _ in range(5):
            seq.append(int(net(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    assert res["generated"] == seq[len(IDS):]
    assert res["n_prompt"] == len(IDS) and res["n_gen"] == 5
    assert res["prefill_s"] > 0 and res["decode_s"] > 0
    assert res["prefill_tok_s"] == pytest.approx(len(IDS) / res["prefill_s"])
    assert res["decode_tok_s"] == pytest.approx(5 / res["decode_s"])


@pytest.mark.parametrize("kind", ["fakequant", "packed", "fp"])
def test_worker_torch_backends(ckpt, kind):
    res = worker(kind, str(ckpt), IDS, n_gen=3, threads=1, repeats=1)
    for k in ("prefill_tok_s", "decode_tok_s", "prefill_s", "decode_s", "load_s", "rss_load_mb", "rss_base_mb",
              "peak_rss_mb"):
        assert res[k] > 0, k
    assert res["peak_rss_mb"] >= res["rss_load_mb"] >= res["rss_base_mb"] * 0.5
    assert res["torch_threads"] == 1 and len(res["generated"]) == 3


def test_fp_baseline_is_the_dequantized_checkpoint(ckpt):
    """fp = the fake-quant weights in plain nn.Linear: same logits as the fake-quant model, no QuantLinear left."""
    from winq.checkpoint import load_checkpoint

    fp = get_backend("fp").load(ckpt, LoadOptions()).model
    fq, _, _ = load_checkpoint(ckpt)
    assert not winq.quant_layers(fp)
    x = torch.tensor([IDS])
    with torch.no_grad():
        torch.testing.assert_close(fp(input_ids=x).logits, fq(input_ids=x).logits, atol=1e-5, rtol=0)


def test_artifact_bytes(ckpt, tmp_path):
    assert artifact_bytes(ckpt) == (ckpt / "model.safetensors").stat().st_size  # a checkpoint: its weights only
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"1234")
    (tmp_path / "a" / "sub").mkdir()
    (tmp_path / "a" / "sub" / "y.bin").write_bytes(b"12")
    assert artifact_bytes(tmp_path / "a") == 6
    assert artifact_bytes(tmp_path / "a" / "x.bin") == 4
    with pytest.raises(ConfigError, match="not found"):
        artifact_bytes(tmp_path / "nope")


def test_plan_orders_baselines_after_their_first_backend(ckpt):
    jobs = plan(BenchSpec(backends=("packed", "fakequant"), checkpoint=str(ckpt)))
    assert [(j.name, j.kind) for j in jobs] == [("packed", "packed"), ("fp", "fp"), ("fakequant", "fakequant")]
    assert jobs[1].baseline_of == ["packed", "fakequant"] and jobs[1].artifact == ckpt
    assert [j.name for j in plan(BenchSpec(backends=("fakequant",), checkpoint=str(ckpt),
                                           baseline=False))] == ["fakequant"]


def test_fp_baseline_from_a_base_model_folder(tiny_llama, tmp_path, ckpt, monkeypatch):
    from winq.exporters import export

    monkeypatch.setattr(bench, "check_installed", lambda *a, **k: None)  # planning only: the gptq extra is not needed

    g = export("gptq", ckpt, tmp_path / "gptq").out
    jobs = plan(BenchSpec(backends=("gptq",), gptq=str(g), model=str(tiny_llama)))
    # the GPTQ record names its checkpoint: that wins over --model
    assert [(j.name, j.artifact) for j in jobs] == [("gptq", g), ("fp", Path(str(ckpt)))]
    rec = g / "winq-export.json"
    rec.write_text(json.dumps({**json.loads(rec.read_text()), "source": {"checkpoint": str(tmp_path / "gone")}}))
    jobs = plan(BenchSpec(backends=("gptq",), gptq=str(g), model=str(tiny_llama)))
    assert jobs[1].artifact == Path(tiny_llama)
    with pytest.raises(ConfigError, match="fp baseline of gptq .* --checkpoint DIR .* --no-baseline"):
        plan(BenchSpec(backends=("gptq",), gptq=str(g)))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"backends": ("fakequant", "tensorrt")}, "unknown backend 'tensorrt': choose from fakequant, packed, fp, "
                                                  "gptq, llamacpp, ort"),
        ({"backends": ()}, "choose from fakequant, packed"),
        ({"backends": ("packed", "packed")}, "listed twice"),
        ({"backends": ("fakequant",)}, "backend fakequant needs --checkpoint DIR"),
        ({"backends": ("gptq",)}, "backend gptq needs --gptq FOLDER"),
        ({"backends": ("llamacpp",)}, "backend llamacpp needs --gguf FILE"),
        ({"backends": ("ort",)}, "backend ort needs --onnx FOLDER"),
        ({"backends": ("fakequant",), "prompt_tokens": 0}, "--prompt-tokens must be an integer >= 1, got 0"),
        ({"backends": ("fakequant",), "gen_tokens": 0}, "--gen-tokens must be an integer >= 1"),
        ({"backends": ("fakequant",), "repeats": 0}, "--repeats must be an integer >= 1"),
        ({"backends": ("fakequant",), "threads": 0}, "--threads must be >= 1"),
    ],
)
def test_bad_specs(kw, match):
    with pytest.raises(ConfigError, match=match):
        plan(BenchSpec(**kw))


def test_missing_artifacts(tmp_path, ckpt):
    with pytest.raises(ConfigError, match=r"--gguf .*nope.gguf: not found"):
        plan(BenchSpec(backends=("llamacpp",), gguf=str(tmp_path / "nope.gguf")))
    with pytest.raises(ConfigError, match=r"--gptq .*: not a folder"):
        plan(BenchSpec(backends=("gptq",), gptq=str(ckpt / "winq.json")))
    with pytest.raises(ConfigError, match="not a GPTQ export folder"):
        plan(BenchSpec(backends=("gptq",), gptq=str(tmp_path)))
    with pytest.raises(ConfigError, match="model.onnx"):
        plan(BenchSpec(backends=("ort",), onnx=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"--checkpoint .*missing: not found"):
        plan(BenchSpec(backends=("fakequant",), checkpoint=str(tmp_path / "missing")))


def test_plan_refuses_a_backend_whose_extra_is_missing(monkeypatch, tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    with pytest.raises(MissingDependencyError, match=r'backend llamacpp needs llama-cpp-python: run `pip install '
                                                     r'"winq\[llamacpp\]"`'):
        plan(BenchSpec(backends=("llamacpp",), gguf=str(tmp_path / "m.gguf"), baseline=False))


class CountingSession(Session):
    """Logits that put the maximum on (last token + 1) % V: greedy decoding counts up."""

    V = 50

    def _onehot(self, t: int) -> torch.Tensor:
        x = torch.zeros(self.V)
        x[(t + 1) % self.V] = 1.0
        return x

    def logits(self, ids):
        return torch.stack([self._onehot(int(t)) for t in ids])

    def prefill(self, ids):
        return self._onehot(ids[-1])

    def step(self, token):
        return self._onehot(token)


def test_worker_runs_any_registered_backend(monkeypatch, tmp_path):
    """The worker loads through the registry and times with the one loop: any Session works."""
    loaded = []
    fake = Backend("counting", "checkpoint", "--checkpoint "
                                             "DIR", lambda p, o: loaded.append((p, o)) or CountingSession(),
                   "checkpoint")
    monkeypatch.setitem(backends.BACKENDS, "counting", fake)
    res = worker("counting", str(tmp_path), [3, 4, 5], n_gen=4, threads=2, repeats=2)
    assert loaded == [(tmp_path, LoadOptions(threads=2, context=7, purpose="bench"))]
    assert res["generated"] == [7, 8, 9, 10] and res["n_prompt"] == 3 and res["n_gen"] == 4
    for k in ("prefill_tok_s", "decode_tok_s", "prefill_s", "decode_s", "load_s", "rss_load_mb", "peak_rss_mb"):
        assert res[k] > 0, k
    assert res["prefill_tok_s"] == pytest.approx(3 / res["prefill_s"])
    assert res["decode_tok_s"] == pytest.approx(4 / res["decode_s"])


def test_time_session_refuses_an_empty_prompt():
    with pytest.raises(ConfigError, match="at least one prompt token"):
        time_session(CountingSession(), [], n_gen=1)
    assert backends.generate(CountingSession(), [48], n_new=4, eos_token_id=0) == [49, 0]  # stops after eos


def test_baselines_are_built_once_into_the_cache(monkeypatch, tmp_path, ckpt):
    built = []

    def write_float(fmt, checkpoint_dir, out_folder):  # stands in for the export layer's write_float
        built.append((fmt, checkpoint_dir, out_folder))
        Path(out_folder).mkdir(parents=True)
        (Path(out_folder) / "model.onnx").write_bytes(b"x")

    monkeypatch.setenv("WINQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(bench, "check_installed", lambda *a, **k: None)  # no onnxruntime needed: nothing runs here
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    (onnx_dir / "model.onnx").write_bytes(b"x")
    said = []
    for _ in range(2):
        jobs = plan(BenchSpec(backends=("ort",), onnx=str(onnx_dir), checkpoint=str(ckpt)))
        assert [j.name for j in jobs] == ["ort", "ort-fp32"]
        bench.build_baselines(jobs, said.append, write_float)
        assert jobs[1].artifact.parent.parent == tmp_path / "cache" / "bench"
        assert (jobs[1].artifact / "model.onnx").is_file()
    assert len(built) == 1 and built[0][:2] == ("onnx", str(ckpt))
    assert any("building the ort-fp32 baseline" in s for s in said)
    with pytest.raises(ConfigError, match=r"the ort baseline \(an fp32 ONNX\) .* --checkpoint DIR, or --no-baseline"):
        plan(BenchSpec(backends=("ort",), onnx=str(onnx_dir)))


def test_run_job_reports_the_worker_error(tmp_path):
    spec = BenchSpec(backends=("fakequant",), gen_tokens=2, repeats=1, threads=1)
    job = bench.Job("fakequant", "fakequant", tmp_path)  # not a checkpoint: the worker's CheckpointError comes back
    with pytest.raises(BenchError, match=r"fakequant: .* is not a winq checkpoint \(no winq.json\)"):
        run_job(job, IDS, spec)


def test_run_job_in_a_fresh_process(ckpt):
    spec = BenchSpec(backends=("packed",), gen_tokens=2, repeats=1, threads=1)
    res = run_job(bench.Job("packed", "packed", ckpt), IDS, spec)
    assert res["prefill_tok_s"] > 0 and res["decode_tok_s"] > 0 and res["peak_rss_mb"] > 0
    assert res["torch_threads"] == 1 and len(res["generated"]) == 2
