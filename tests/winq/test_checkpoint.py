"""winq.checkpoint: round trips, atomic saves, refusals and corrupt folders (ARCHITECTURE §6)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import winq
from winq import CheckpointError, QuantConfig, TrainConfig
from winq.checkpoint import (FORMAT, FORMAT_VERSION, is_checkpoint, load_checkpoint, load_trainer_state, read_info,
                             save_checkpoint)

from tinymodels import make_model_dir

CONFIGS = {
    "seq2": QuantConfig(bits=2, group_size=-1, embed="float"),
    "lsq4-g16": QuantConfig(bits=4, group_size=16, embed="float"),
    "affine4-g16": QuantConfig(bits=4, grid="affine", group_size=16, embed="float"),
    "affine2": QuantConfig(bits=2, grid="affine", group_size=-1, embed="float"),
    "affine3": QuantConfig(bits=3, grid="affine", group_size=-1, embed="float"),
}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


@pytest.fixture(scope="module")
def untied_llama(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny-untied") / "llama", "llama", seed=1, tie=False)


def _prepared(folder: Path, qcfg: QuantConfig, seed: int = 0):
    """A prepared tiny model whose weights, scales and zeros have moved away from their initial values."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(folder))
    winq.prepare(model, qcfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            scale = 0.05 if n.endswith((".alpha", ".zero_point")) else 0.01
            p.add_(scale * torch.randn(p.shape, generator=g) * (p.abs().mean() if n.endswith(".alpha") else 1.0))
    model.eval()
    return model, tok


def _assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k
    qa, qb = winq.quantized_weights(a), winq.quantized_weights(b)
    assert list(qa) == list(qb)
    for n in qa:
        x, y = qa[n], qb[n]
        assert (x.grid, x.bits, x.group_size) == (y.grid, y.bits, y.group_size), n
        assert torch.equal(x.codes, y.codes) and torch.equal(x.scale, y.scale) and torch.equal(x.zero, y.zero), n


def _debris(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((f".{name}.tmp", f".{name}.old")))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def saved(tiny_llama, tmp_path_factory):
    """One saved checkpoint (seq2) to corrupt in copies."""
    model, tok = _prepared(tiny_llama, CONFIGS["seq2"])
    out = tmp_path_factory.mktemp("ckpt") / "run"
    save_checkpoint(out, model, tok, CONFIGS["seq2"], TrainConfig(steps=3), {"step": 3})
    return out, model


@pytest.fixture
def ckpt_copy(saved, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(saved[0], dst)
    return dst


# ---- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_identical(tiny_llama, tmp_path, name):
    qcfg = CONFIGS[name]
    model, tok = _prepared(tiny_llama, qcfg)
    out = save_checkpoint(tmp_path / "ck", model, tok, qcfg, TrainConfig(steps=5, method="qat"), {"step": 5})
    assert out == tmp_path / "ck" and is_checkpoint(out)
    loaded, ltok, info = load_checkpoint(out)
    _assert_same_model(model, loaded)
    assert not loaded.training
    # same logits, and the tokenizer came along
    x = torch.tensor([[1, 5, 9, 33, 2, 7]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, loaded(input_ids=x).logits)
    assert ltok.get_vocab() == tok.get_vocab() and ltok.eos_token_id == tok.eos_token_id
    # winq.json
    raw = json.loads((out / "winq.json").read_text())
    assert raw == info
    assert info["format"] == FORMAT == "winq-checkpoint" and info["version"] == FORMAT_VERSION == 1
    assert QuantConfig.from_dict(info["quant"]) == qcfg
    assert info["quant"]["grid"] == qcfg.grid and info["quant"]["bits"] == qcfg.bits
    assert TrainConfig.from_dict(info["train"]) == TrainConfig(steps=5, method="qat")
    assert info["quantized_modules"] == list(winq.quant_layers(model))
    assert len(info["quantized_modules"]) == 2 * 7 and "lm_head" not in info["quantized_modules"]
    assert info["step"] == 5
    for f in ("config.json", "model.safetensors", "winq.json"):
        assert (out / f).is_file()


def test_tied_lm_head_is_stored_once_and_retied(tiny_llama, tmp_path):
    from safetensors import safe_open

    model, tok = _prepared(tiny_llama, CONFIGS["seq2"])
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    save_checkpoint(tmp_path / "ck", model, tok, CONFIGS["seq2"], None)
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert any(k.endswith(".alpha") for k in keys)
    loaded, _, info = load_checkpoint(tmp_path / "ck")
    assert info["train"] is None
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_untied_lm_head_round_trip(untied_llama, tmp_path):
    from safetensors import safe_open

    model, tok = _prepared(untied_llama, CONFIGS["lsq4-g16"])
    assert not model.config.tie_word_embeddings
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    save_checkpoint(tmp_path / "ck", model, tok, CONFIGS["lsq4-g16"], None)
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in set(f.keys())
    loaded, _, _ = load_checkpoint(tmp_path / "ck")
    _assert_same_model(model, loaded)
    assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()


def test_quantized_lm_head_round_trip(untied_llama, tmp_path):
    qcfg = QuantConfig(bits=4, quantize_lm_head=True, group_size=-1, embed="float")
    model, tok = _prepared(untied_llama, qcfg)
    assert "lm_head" in winq.quant_layers(model)
    save_checkpoint(tmp_path / "ck", model, tok, qcfg, None)
    loaded, _, info = load_checkpoint(tmp_path / "ck")
    assert "lm_head" in info["quantized_modules"]
    _assert_same_model(model, loaded)


def test_trainer_state_round_trip(tiny_llama, tmp_path):
    model, tok = _prepared(tiny_llama, CONFIGS["seq2"])
    ts = {
        "optimizer": {"a.exp_avg": torch.randn(3, 4), "a.step": torch.tensor(7.0)},
        "rng": {"cpu": torch.get_rng_state()},
        "json": {"step": 7, "world_size": 1},
    }
    save_checkpoint(tmp_path / "ck", model, tok, CONFIGS["seq2"], TrainConfig(), {"step": 7}, ts)
    got = load_trainer_state(tmp_path / "ck")
    assert got["json"] == ts["json"]
    assert got["optimizer"].keys() == ts["optimizer"].keys()
    assert all(torch.equal(got["optimizer"][k], v) for k, v in ts["optimizer"].items())
    assert torch.equal(got["rng"]["cpu"], ts["rng"]["cpu"])
    # a checkpoint saved without one has none
    save_checkpoint(tmp_path / "plain", model, tok, CONFIGS["seq2"], None)
    assert load_trainer_state(tmp_path / "plain") is None


# ---- atomic saves and refusals ----------------------------------------------------------------


def test_saving_over_a_checkpoint_replaces_it_and_leaves_no_temp_folders(tiny_llama, tmp_path):
    model, tok = _prepared(tiny_llama, CONFIGS["seq2"])
    out = tmp_path / "run"
    save_checkpoint(out, model, tok, CONFIGS["seq2"], None, {"step": 1})
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    (out / "stale.txt").write_text("from the old checkpoint\n")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1.0)
    save_checkpoint(out, model, tok, CONFIGS["seq2"], None, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert _debris(tmp_path, "run") == []
    assert read_info(out)["step"] == 2
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 3.0}\n'  # the live log is carried over
    assert not (out / "stale.txt").exists()  # the folder is the new checkpoint, not a merge
    loaded, _, _ = load_checkpoint(out)
    _assert_same_model(model, loaded)


def test_a_failed_save_keeps_the_previous_checkpoint(tiny_llama, tmp_path, monkeypatch):
    model, tok = _prepared(tiny_llama, CONFIGS["seq2"])
    out = tmp_path / "run"
    save_checkpoint(out, model, tok, CONFIGS["seq2"], None, {"step": 1})
    before = _snapshot(out)

    class Boom(RuntimeError):
        pass

    def fail(*a, **k):
        raise Boom("disk full")

    monkeypatch.setattr(tok, "save_pretrained", fail)
    with pytest.raises(Boom):
        save_checkpoint(out, model, tok, CONFIGS["seq2"], None, {"step": 2})
    assert _snapshot(out) == before
    assert read_info(out)["step"] == 1


def test_a_failed_save_leaves_no_temp_folder(tiny_llama, tmp_path, monkeypatch):
    model, tok = _prepared(tiny_llama, CONFIGS["seq2"])
    monkeypatch.setattr(tok, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "run", model, tok, CONFIGS["seq2"], None)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_a_folder_that_is_not_a_checkpoint(tiny_llama, tmp_path):
    model, tok = _prepared(tiny_llama, CONFIGS["seq2"])
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious\n")
    (out / "sub").mkdir()
    (out / "sub" / "data.txt").write_text("also precious\n")
    before = _snapshot(out)
    with pytest.raises(CheckpointError, match="not a winq checkpoint"):
        save_checkpoint(out, model, tok, CONFIGS["seq2"], None)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temp folder left either


@pytest.mark.parametrize("content", [None, "metrics"])
def test_saves_into_an_empty_folder_or_one_with_only_the_metrics_log(tiny_llama, tmp_path, content):
    model, tok = _prepared(tiny_llama, CONFIGS["seq2"])
    out = tmp_path / "run"
    out.mkdir()
    if content:
        (out / "metrics.jsonl").write_text('{"step": 1}\n')
    save_checkpoint(out, model, tok, CONFIGS["seq2"], None)
    assert is_checkpoint(out)
    if content:
        assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_refuses_to_overwrite_a_file(tiny_llama, tmp_path):
    model, tok = _prepared(tiny_llama, CONFIGS["seq2"])
    out = tmp_path / "notes.txt"
    out.write_text("precious\n")
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        save_checkpoint(out, model, tok, CONFIGS["seq2"], None)
    assert out.read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no .notes.txt.tmpPID left


def test_quantized_lm_head_of_a_tied_model_round_trip(tiny_llama, tmp_path):
    qcfg = QuantConfig(bits=4, quantize_lm_head=True, group_size=-1, embed="float")
    model, tok = _prepared(tiny_llama, qcfg)
    assert model.config.tie_word_embeddings and "lm_head" in winq.quant_layers(model)
    save_checkpoint(tmp_path / "ck", model, tok, qcfg, None)
    loaded, _, _ = load_checkpoint(tmp_path / "ck")
    _assert_same_model(model, loaded)


# ---- reading bad folders ---------------------------------------------------------------------


def test_truncated_safetensors_is_corrupt(ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(ckpt_copy)


def test_garbage_safetensors_is_corrupt(ckpt_copy):
    (ckpt_copy / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(ckpt_copy)


def test_missing_safetensors(ckpt_copy):
    (ckpt_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(ckpt_copy)


def test_missing_winq_json(ckpt_copy):
    (ckpt_copy / "winq.json").unlink()
    assert not is_checkpoint(ckpt_copy)
    with pytest.raises(CheckpointError, match="not a winq checkpoint"):
        load_checkpoint(ckpt_copy)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nowhere")


def test_a_plain_hf_model_folder_is_not_a_checkpoint(tiny_llama):
    with pytest.raises(CheckpointError, match="not a winq checkpoint"):
        load_checkpoint(tiny_llama)


@pytest.mark.parametrize("text", ["{not json", "", '{"format": "winq-checkpoint", '])
def test_invalid_winq_json(ckpt_copy, text):
    (ckpt_copy / "winq.json").write_text(text)
    with pytest.raises(CheckpointError, match="JSON"):
        load_checkpoint(ckpt_copy)


@pytest.mark.parametrize("text", ["[]", '"winq"', '{"format": "winq-checkpoint", "version": '
                                                  '1}', '{"format": "winq-checkpoint", "version": "2", "quant": '
                                                        '{"bits": '
                                                        '2}}', '{"format": "winq-checkpoint", "version": 1, "quant": '
                                                               '"seq2"}'])
def test_valid_json_of_the_wrong_shape(ckpt_copy, text):
    (ckpt_copy / "winq.json").write_text(text)
    with pytest.raises(CheckpointError):
        load_checkpoint(ckpt_copy)


def test_wrong_format_and_newer_version(ckpt_copy):
    f = ckpt_copy / "winq.json"
    info = json.loads(f.read_text())
    f.write_text(json.dumps({**info, "format": "something-else"}))
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(ckpt_copy)
    f.write_text(json.dumps({**info, "version": FORMAT_VERSION + 1}))
    with pytest.raises(CheckpointError, match="upgrade"):
        load_checkpoint(ckpt_copy)


def test_state_dict_that_does_not_match_winq_json(ckpt_copy):
    f = ckpt_copy / "winq.json"
    info = json.loads(f.read_text())
    qc = QuantConfig(bits=4, grid="affine", group_size=-1, embed="float")
    info["quant"] = qc.to_dict()  # expects zero_point tensors the file lacks
    f.write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(ckpt_copy)


@pytest.mark.parametrize("param,value", [("model.layers.1.self_attn.k_proj.weight", float("nan")),
                                         ("model.layers.0.mlp.down_proj.alpha", float("inf")), ("model.norm.weight",
                                                                                                float("nan"))])
def test_nan_in_a_saved_parameter_names_it(tiny_llama, tmp_path, param, value):
    model, tok = _prepared(tiny_llama, CONFIGS["seq2"])
    with torch.no_grad():
        model.get_parameter(param).view(-1)[3] = value
    save_checkpoint(tmp_path / "ck", model, tok, CONFIGS["seq2"], None)
    with pytest.raises(CheckpointError, match=param.replace(".", r"\.")):
        load_checkpoint(tmp_path / "ck")


# ---- no pickles -------------------------------------------------------------------------------


def test_nothing_in_a_checkpoint_is_a_pickle(tiny_llama, tmp_path, monkeypatch):
    model, tok = _prepared(tiny_llama, CONFIGS["affine4-g16"])
    ts = {"optimizer": {"x.exp_avg": torch.zeros(2)}, "rng": {"cpu": torch.get_rng_state()}, "json": {"step": 1}}
    out = save_checkpoint(tmp_path / "ck", model, tok, CONFIGS["affine4-g16"], TrainConfig(), None, ts)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files
    for p in files:
        assert p.suffix not in PICKLE_SUFFIXES, p
        head = p.read_bytes()[:4]
        assert not head.startswith(b"\x80"), f"{p} looks like a pickle"
        assert head != b"PK\x03\x04", f"{p} looks like a torch.save zip"
    assert (out / "trainer_state" / "optimizer.safetensors").is_file()

    # and reading it back never unpickles
    import pickle

    def no(*a, **k):
        raise AssertionError("unpickling while loading a checkpoint")

    monkeypatch.setattr(torch, "load", no)
    monkeypatch.setattr(pickle, "load", no)
    monkeypatch.setattr(pickle, "loads", no)
    loaded, _, _ = load_checkpoint(out)
    load_trainer_state(out)
    _assert_same_model(model, loaded)
