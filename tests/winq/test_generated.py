"""winq.generated: the `generated` data spec (text sampled from the float model), its cache, its errors, mixtures
in equal shares and the held-out sample spread over a mixture."""

from __future__ import annotations

import json

import pytest
import torch

import winq.generated as gen
from winq import DataError, QuantConfig, TrainConfig
from winq.data import PackedBlocks, equal_shares, token_ids
from winq.train import train


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(str(tiny_llama)), tiny_llama


def _ids(tiny, spec="generated:600", split="train", **kw):
    model, tok, folder = tiny
    return token_ids(spec, split, tok, model=model, model_dir=folder, **kw)


def test_sample_is_seeded_sized_and_joined_by_eos(tiny):
    model, tok, _ = tiny
    a = gen.sample(model, tok, 600, seed=0)
    b = gen.sample(model, tok, 600, seed=0)
    c = gen.sample(model, tok, 600, seed=1)
    assert a.dtype == torch.long and a.numel() == 600
    assert torch.equal(a, b) and not torch.equal(a, c)
    period = gen.GEN_LEN + 2  # first token + GEN_LEN sampled, then EOS
    eos = tok.eos_token_id
    assert [int(a[i]) for i in range(period - 1, 600, period)] == [eos] * len(range(period - 1, 600, period))
    firsts = [int(a[i]) for i in range(0, 600, period)]
    assert not set(firsts) & set(tok.all_special_ids)  # first tokens come from the ordinary vocabulary


def test_sample_restores_training_mode(tiny):
    model, tok, _ = tiny
    model.train()
    gen.sample(model, tok, 300, seed=0)
    assert model.training
    model.eval()


def test_sampled_tokens_follow_the_model(tiny):
    """Temperature 1 over the full distribution: the sampled tokens' mean surprisal equals the model's mean entropy
    (a top-k / greedy sampler gives far less), within 5 standard errors."""
    model, tok, _ = tiny
    seqs = torch.stack(gen.sequences(model, tok, 8, seed=0))  # (8, first token + GEN_LEN sampled)
    assert seqs.shape == (8, gen.GEN_LEN + 1)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=seqs).logits.float(), -1)[:, :-1]
    surprisal = -logp.gather(-1, seqs[:, 1:, None])[..., 0].flatten()
    entropy = -(logp.exp() * logp).sum(-1).flatten()
    diff = surprisal - entropy
    assert abs(float(diff.mean())) < 5 * float(diff.std()) / diff.numel() ** 0.5 + 1e-3
    assert float(entropy.mean()) > 0.5  # the check has something to see: the distributions are not one-hot


def test_one_sampling_pass_caches_train_and_valid(tiny, monkeypatch):
    calls = []
    real = gen.sequences
    monkeypatch.setattr(gen, "sequences", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    spec = "generated:613"  # a count no other test samples (the session's cache is shared)
    train_ids = _ids(tiny, spec)
    per = gen.GEN_LEN + 2
    assert calls == [-(-614 // per) + -(-(gen.GEN_HELD + 1) // per)]  # the train rows and the held-out rows, one pass

    def boom(*a, **k):
        raise AssertionError("sampled again: the cache was not used")

    monkeypatch.setattr(gen, "sequences", boom)
    valid_ids = _ids(tiny, spec, split="valid")
    assert torch.equal(_ids(tiny, spec), train_ids) and torch.equal(_ids(tiny, spec, split="test"), valid_ids)
    assert train_ids.numel() == 613 and valid_ids.numel() == gen.GEN_HELD
    assert not torch.equal(train_ids[:300], valid_ids[:300])  # distinct sequences


def test_the_default_counts_fill_one_batch():
    per = gen.GEN_LEN + 2
    assert -(-(gen.GEN_TOKENS + 1) // per) + -(-(gen.GEN_HELD + 1) // per) == gen.GEN_BATCH


def test_corrupt_generated_cache_is_sampled_again(tiny):
    from winq.data import cache_dir

    first = _ids(tiny, "generated:700")
    files = sorted((cache_dir() / "data").glob("generated-*.safetensors"), key=lambda p: p.stat().st_mtime)
    files[-1].write_bytes(b"not safetensors")
    assert torch.equal(_ids(tiny, "generated:700"), first)


def test_generated_without_the_model_is_a_clear_error(tiny):
    _, tok, _ = tiny
    with pytest.raises(DataError, match="sampled from the model being trained.*winq train"):
        token_ids("generated", "train", tok)


@pytest.mark.parametrize("spec", ["generated:abc", "generated:10", "generated:-5", f"generated:{10**9}"])
def test_bad_generated_count_names_the_valid_range(tiny, spec):
    with pytest.raises(DataError, match=r"generated:N with N a token count from 512"):
        _ids(tiny, spec)


def test_equal_shares_repeats_shorter_parts():
    a, b = torch.arange(10), torch.arange(100, 103)
    out = equal_shares([a, b])
    assert torch.equal(out[0], a)
    assert out[1].tolist() == [100, 101, 102] * 3 + [100]


def test_mixture_with_generated_gives_each_part_an_equal_share(tiny, tmp_path):
    from tinymodels import synthetic_text

    model, tok, folder = tiny
    f = tmp_path / "text.txt"
    f.write_text(synthetic_text(400, seed=3))
    text = token_ids(str(f), "train", tok)
    mixed = token_ids(f"{f}+generated:600", "train", tok, model=model, model_dir=folder)
    n = max(text.numel(), 600)
    assert mixed.numel() == 2 * n + 1  # both parts at the longer's length, EOS between
    assert torch.equal(mixed[n + 1 :][:600], _ids(tiny))


def test_spread_reaches_every_part_of_the_stream():
    blocks = PackedBlocks(torch.arange(1000), 9)  # 111 blocks
    idx = blocks.spread(8)
    assert len(idx) == 8 and idx[0] == 0 and idx[-1] > 90 and idx == sorted(set(idx))
    assert PackedBlocks(torch.arange(50), 9).spread(8) == [0, 1, 2, 3, 4]


def test_train_on_generated_data_records_it_and_resumes_exactly(tiny_llama, tmp_path):
    from winq.data import cache_dir

    tcfg = TrainConfig(steps=4, lr=2e-3, seq_len=16, batch_size=2, seed=0, eval_every=2, eval_batches=2,
                       distill=1.0, keep_best=False, save_every=2)
    qcfg = QuantConfig(bits=4, group_size=-1, embed="float", init="search", calib_tokens=512)
    full = train(str(tiny_llama), "generated:800", qcfg, tcfg, tmp_path / "full", progress=False)
    info = json.loads((tmp_path / "full" / "winq.json").read_text())
    assert info["data"] == "generated:800"
    assert [r["step"] for r in full.records if "eval_kl" in r] == [0, 2, 4]
    # a run that dies after step 3 (its checkpoint: step 2), resumed with the sample cache gone: the streams are
    # sampled again, the same ids, so it ends where the uninterrupted run does

    class Crash(Exception):
        pass

    def crash(rec):
        if rec["step"] == 3:
            raise Crash

    with pytest.raises(Crash):
        train(str(tiny_llama), "generated:800", qcfg, tcfg, tmp_path / "part", callbacks=[crash], progress=False)
    for p in (cache_dir() / "data").glob("generated-*.safetensors"):
        p.unlink()
    train(str(tiny_llama), "generated:800", qcfg, tcfg, tmp_path / "part", resume=True, progress=False)
    assert list((cache_dir() / "data").glob("generated-*.safetensors"))  # sampled again on resume

    timing = ("seconds", "calibration_s", "step_s", "tokens_per_s")

    def metrics(run):
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        for r in recs:
            for d in (r, r.get("init", {})):
                for k in timing:
                    d.pop(k, None)
        return recs

    assert metrics(tmp_path / "full") == metrics(tmp_path / "part")
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_heldout_scores_equal_the_loss_and_kl_computed_apart(tiny):
    """The distilled run's evaluation (one student forward) gives train.heldout_loss and the KL of separate passes."""
    import copy

    import torch.nn.functional as F

    from winq.teacher import heldout_scores
    from winq.train import heldout_loss

    model, tok, _ = tiny
    student = copy.deepcopy(model)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    blocks = PackedBlocks(torch.randint(0, len(tok), (40 * 17,)), 16)
    loss, kl = heldout_scores(student, model, blocks, 8, 3, "cpu")
    assert loss == pytest.approx(heldout_loss(student, blocks, 8, 3, "cpu"), rel=1e-5)
    b = blocks.batch(blocks.spread(8))[:, :-1]
    with torch.no_grad():
        lp = F.log_softmax(student(input_ids=b).logits.float(), -1)
        tp = F.log_softmax(model(input_ids=b).logits.float(), -1)
    assert kl == pytest.approx(float((tp.exp() * (tp - lp)).sum(-1).mean()), rel=1e-4)
    assert kl > 0
