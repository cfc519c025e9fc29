"""winq.evaluate: the strided windows and perplexity against an independent brute-force computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import winq
from winq import ConfigError, DataError, QuantConfig
from winq.evaluate import EvalResult, Window, eval_ids, perplexity, windows

# ---- windows() --------------------------------------------------------------------------------


def _check_windows(n: int, seq_len: int, stride: int) -> list[Window]:
    ws = windows(n, seq_len, stride)
    scored = []
    for w in ws:
        assert 0 <= w.begin < w.score_from < w.end <= n  # the token before score_from is in the window
        assert w.end - w.begin <= seq_len
        scored.extend(range(w.score_from, w.end))
    assert scored == list(range(1, n))  # every target 1..n-1 exactly once, in order
    return ws


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_windows_score_every_target_once(data):
    seq_len = data.draw(st.integers(2, 64), label="seq_len")
    stride = data.draw(st.integers(1, seq_len), label="stride")
    n = data.draw(st.integers(2, 400), label="n")
    ws = _check_windows(n, seq_len, stride)
    step = min(stride, seq_len - 1)
    # the first window starts at 0; every window is full length when the stream allows it
    assert ws[0].begin == 0 and ws[0].score_from == 1
    for w in ws:
        assert w.end - w.begin == min(seq_len, w.end)
    if n >= seq_len:  # later windows are full length
        assert all(w.end - w.begin == seq_len for w in ws)
    # every scored token sees at least seq_len - stride tokens of context (or all before it)
    for w in ws[1:]:
        assert w.end - w.score_from <= step
        assert w.score_from - w.begin >= min(seq_len - step, w.score_from)


@pytest.mark.parametrize(
    "n,seq_len,stride",
    [(2, 2, 1), (2, 2, 2), (3, 2, 2), (10, 4, 4), (10, 4, 3), (10, 4, 1), (100, 16, 16), (100, 16, 15), (100, 16, 5),
     (7, 64, 64), (65, 64, 64)],
)
def test_windows_examples(n, seq_len, stride):
    _check_windows(n, seq_len, stride)


def test_windows_overlap_by_one_for_full_stride():
    ws = windows(40, 10, 10)
    assert [(w.begin, w.end, w.score_from) for w in ws] == [(0, 10, 1), (9, 19, 10), (18, 28, 19), (27, 37, 28),
                                                            (30, 40, 37)]


def test_windows_small_stride_gives_context():
    ws = windows(20, 8, 2)
    assert [(w.begin, w.end, w.score_from) for w in ws] == [
        (0, 8, 1), (2, 10, 8), (4, 12, 10), (6, 14, 12), (8, 16, 14), (10, 18, 16), (12, 20, 18),
    ]


@pytest.mark.parametrize("seq_len,stride", [(1, 1), (0, 1), (-4, 1), (8, 0), (8, 9), (8, -1)])
def test_windows_bad_settings_raise(seq_len, stride):
    with pytest.raises(ConfigError):
        windows(100, seq_len, stride)


@pytest.mark.parametrize("n", [0, 1])
def test_windows_too_few_tokens_raise(n):
    with pytest.raises(DataError):
        windows(n, 8, 8)


# ---- perplexity() -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qmodel(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    winq.prepare(model, QuantConfig(bits=4, group_size=-1, embed="float"))
    with torch.no_grad():  # move weights and scales off their initial values (codes change, not just init)
        g = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g) * (p.abs().mean() if n.endswith(".alpha") else 1.0))
    model.eval()
    return model


@pytest.fixture(scope="module")
def ids(qmodel):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, qmodel.config.vocab_size, (150,), generator=g)


def _reference_nll(model, ids: torch.Tensor, seq_len: int, stride: int) -> tuple[float, int]:
    """Brute force, without windows(): the window of target t is written down from its definition and the model
    is run on every window; each target's log-prob is read from its own window."""
    n = ids.numel()
    step = min(stride, seq_len - 1)
    cache: dict[tuple[int, int], torch.Tensor] = {}
    total, count = 0.0, 0
    for t in range(1, n):
        if t < seq_len:  # the first window [0, seq_len) scores targets 1..seq_len-1
            begin, end = 0, min(seq_len, n)
        else:  # later windows each score `step` further targets, extended left to seq_len tokens
            k = (t - seq_len) // step + 1
            end = min(seq_len + k * step, n)
            begin = max(0, end - seq_len)
        assert begin < t < end and end - begin <= seq_len
        if (begin, end) not in cache:
            with torch.no_grad():
                cache[(begin, end)] = torch.log_softmax(model(input_ids=ids[begin:end][None]).logits[0].double(), -1)
        total -= cache[(begin, end)][t - 1 - begin, ids[t]].item()
        count += 1
    return total / count, count


@pytest.mark.parametrize("seq_len,stride", [(32, 32), (32, 31), (16, 10), (24, 5), (8, 1)])
def test_perplexity_equals_brute_force(qmodel, ids, seq_len, stride):
    ids = ids if stride >= 5 else ids[:50]  # one model call per target: keep it short
    r = perplexity(qmodel, ids, seq_len=seq_len, stride=stride)
    ref, count = _reference_nll(qmodel, ids, seq_len, stride)
    assert isinstance(r, EvalResult)
    assert r.tokens == count == ids.numel() - 1
    assert r.windows == len(windows(ids.numel(), seq_len, stride))
    assert r.nll == pytest.approx(ref, rel=1e-5)
    assert r.ppl == pytest.approx(math.exp(ref), rel=1e-5)
    d = r.to_dict()
    assert set(d) == {"ppl", "nll", "tokens", "windows", "seconds"} and d["tokens"] == count


def test_perplexity_one_window_equals_hf_loss(qmodel, ids):
    x = ids[:40]
    with torch.no_grad():
        loss = qmodel(input_ids=x[None], labels=x[None]).loss.item()
    r = perplexity(qmodel, x, seq_len=64, stride=64)
    assert r.windows == 1 and r.tokens == 39
    assert r.nll == pytest.approx(loss, rel=1e-5)


def test_perplexity_more_context_changes_the_result(qmodel, ids):
    # a small stride must really use the overlapping context (not just rescore disjoint windows)
    a = perplexity(qmodel, ids, seq_len=16, stride=16).nll
    b = perplexity(qmodel, ids, seq_len=16, stride=4).nll
    assert a != pytest.approx(b, rel=1e-7)


def test_perplexity_hook_sees_every_window(qmodel, ids):
    seen = []

    def hook(w, logits):
        seen.append((w, tuple(logits.shape), logits.dtype))

    r = perplexity(qmodel, ids, seq_len=20, stride=7, logits_hook=hook)
    assert [s[0] for s in seen] == windows(ids.numel(), 20, 7)
    assert all(shape == (w.end - w.begin, qmodel.config.vocab_size) and dt == torch.float32 for w, shape, dt in seen)
    assert r.windows == len(seen)


def test_perplexity_puts_model_in_eval_mode(qmodel, ids):
    qmodel.train()
    try:
        a = perplexity(qmodel, ids[:50], seq_len=16, stride=16)
        assert not qmodel.training
        b = perplexity(qmodel, ids[:50], seq_len=16, stride=16)
        assert a.nll == b.nll  # deterministic (no training noise)
    finally:
        qmodel.eval()


def test_perplexity_of_a_perfect_predictor_is_one():
    class Oracle(torch.nn.Module):
        """Predicts token (x + 1) % V with certainty."""

        def forward(self, input_ids):
            V = 11
            logits = F.one_hot((input_ids + 1) % V, V).float() * 100.0

            class Out:
                pass

            o = Out()
            o.logits = logits
            return o

    ids = torch.arange(60) % 11
    r = perplexity(Oracle(), ids, seq_len=8, stride=3)
    assert r.ppl == pytest.approx(1.0, abs=1e-6) and r.tokens == 59


def test_eval_ids_cuts_to_max_tokens(tiny_llama, text_file):
    from transformers import AutoTokenizer

    from winq.data import token_ids

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    full = token_ids(str(text_file), "test", tok)
    assert full.numel() > 50
    cut = eval_ids(tok, str(text_file), "test", max_tokens=50)
    assert torch.equal(cut, full[:50])
    assert torch.equal(eval_ids(tok, str(text_file), "test", max_tokens=None), full)
