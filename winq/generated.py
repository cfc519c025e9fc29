"""Text sampled from the float model itself: the `generated` data spec (`--data generated`, `ptb+generated`).

Why: a quantized model is judged by how closely it follows the float model on text of every kind,
and the built-in corpora are narrow (PTB: lowercased 1989 newswire; SOTU: speeches). The model's own
samples cover what it has learned (prose, code, lists, dialogue), so distilling on them, and
calibrating the step-0 quantizer on them, keeps the student close to the teacher beyond the
training corpora (the data-free distillation of LLM-QAT, arXiv 2305.17888).

How: each sequence starts from one token drawn uniformly from the ordinary (non-special) vocabulary,
then GEN_LEN tokens are sampled at temperature 1 from the full distribution (no top-k / top-p: the
student should see the teacher's distribution, tails included), end-of-text suppressed. Sequences are
joined with the EOS token into one stream, like any other data spec. The stream is a pure function of
(model files, tokenizer, split, token count, sampling settings), cached under $WINQ_CACHE/data, so
only the first run pays for it. `train` and `valid` are distinct sequences of one sampling pass; `test` is
`valid`.

Spec: `generated` (GEN_TOKENS tokens of train, GEN_HELD of valid) or `generated:N` (N train tokens).
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path

import torch

from .errors import DataError

SPEC = "generated"
GEN_TOKENS = 14336  # train tokens (56 sequences): a third of the default mixture's 8,192 calibration and 20,480
# training tokens, with room; sampling costs ~5.5 ms a token on 2 cores (about 90 s with the held-out rows, paid once)
GEN_HELD = 2048  # valid tokens (8 sequences, sampled in the same batch as train's 56): the default eval reads 8
# blocks of 256, a third of them from here in the mixture
GEN_LEN = 256  # sampled tokens a sequence (one training block)
GEN_BATCH = 64  # sequences sampled together
SEED = 0
MAX_TOKENS = 10_000_000


def is_generated(spec: str) -> bool:
    return spec == SPEC or spec.startswith(SPEC + ":")


def n_tokens(spec: str, split: str) -> int:
    """How many tokens the spec asks for in `split`."""
    if split != "train":
        return GEN_HELD
    if spec == SPEC:
        return GEN_TOKENS
    raw = spec[len(SPEC) + 1:]
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if not 2 * GEN_LEN <= n <= MAX_TOKENS:
        raise DataError(f"data {spec!r}: write generated:N with N a token count from {2 * GEN_LEN} to {MAX_TOKENS:,} "
                        f"(plain `generated` samples {GEN_TOKENS:,})")
    return n


def model_fingerprint(folder) -> str:
    """Names, sizes and modification times of a model folder's files (the cache key of its samples)."""
    if folder is None:
        raise DataError("data 'generated' samples text from the model: it needs the model's folder")
    p = Path(folder)
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    return ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


def cache_key(spec: str, split: str, folder, tok_hash: str) -> str:
    settings = f"len={GEN_LEN};batch={GEN_BATCH};T=1;first=uniform-ordinary;seed={SEED};held={GEN_HELD}"
    raw = f"{SPEC}|{n_tokens(spec, 'train')}|{split}|{settings}|{model_fingerprint(folder)}|{tok_hash}"
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def _first_tokens(tokenizer, n: int, g: torch.Generator) -> torch.Tensor:
    special = set(tokenizer.all_special_ids)
    vocab = len(tokenizer)
    ordinary = torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.long)
    return ordinary[torch.randint(0, len(ordinary), (n,), generator=g)]


@torch.no_grad()
def sequences(model, tokenizer, n_seq: int, seed: int, progress: bool = False) -> list[torch.Tensor]:
    """n_seq rows (int64, GEN_LEN + 1 each) of the model's own text: a uniform first token, then GEN_LEN sampled
    ones, GEN_BATCH rows at a time. The sampling settings are passed as a whole GenerationConfig, so a model's own
    generation defaults (top-k, repetition penalty) do not apply; the caller's random state is left as it was."""
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id
    g = torch.Generator().manual_seed(seed)
    firsts = _first_tokens(tokenizer, n_seq, g)
    was, device = model.training, next(model.parameters()).device
    model.eval()
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task("sampling text from the model", total=n_seq * GEN_LEN)
    cuda = [device.index or 0] if device.type == "cuda" else []
    settings = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=GEN_LEN,
                                min_new_tokens=GEN_LEN, pad_token_id=eos if eos is not None else 0,
                                eos_token_id=eos, use_cache=True)
    rows, t0 = [], time.time()
    try:
        for s in range(0, n_seq, GEN_BATCH):
            first = firsts[s : s + GEN_BATCH, None].to(device)
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(seed * 1_000_003 + s)
                out = model.generate(first, attention_mask=torch.ones_like(first), generation_config=settings)
            rows.extend(r.long() for r in out.cpu())
            if bar is not None:
                bar.update(task, advance=first.shape[0] * GEN_LEN)
    finally:
        if bar is not None:
            bar.stop()
        model.train(was)
    sequences.last_seconds = round(time.time() - t0, 2)
    return rows


def _per_seq(tokenizer) -> int:
    return GEN_LEN + 1 + (tokenizer.eos_token_id is not None)  # first token, sampled ones, EOS


def _rows_for(total: int, tokenizer) -> int:
    """Rows whose join (n rows: n * per - 1 tokens, no EOS after the last) holds `total` tokens."""
    return math.ceil((total + 1) / _per_seq(tokenizer))


def join(rows: list[torch.Tensor], tokenizer, total: int) -> torch.Tensor:
    """The rows joined by EOS into one stream, cut to `total` tokens; DataError when they hold fewer."""
    eos = tokenizer.eos_token_id
    pieces = []
    for row in rows:
        if pieces and eos is not None:
            pieces.append(torch.tensor([eos]))
        pieces.append(row)
    ids = torch.cat(pieces)[:total].long() if pieces else torch.zeros(0, dtype=torch.long)
    if ids.numel() < total:
        raise DataError(f"sampled {ids.numel()} tokens, fewer than the {total} asked for")
    return ids


def sample(model, tokenizer, total: int, seed: int, progress: bool = False) -> torch.Tensor:
    """`total` tokens of the model's own text: enough sequences (_rows_for) joined by EOS, cut to `total`."""
    n_seq = _rows_for(total, tokenizer)
    return join(sequences(model, tokenizer, n_seq, seed, progress), tokenizer, total)


def sample_splits(model, tokenizer, spec: str, progress: bool = False) -> dict[str, torch.Tensor]:
    """{"train", "valid"} of `spec` from one sampling pass (seed 0): the train tokens' sequences first, then the
    held-out ones (distinct sequences), so the default 56 + 8 rows fill one batch."""
    n_train, n_valid = n_tokens(spec, "train"), n_tokens(spec, "valid")
    s_train, s_valid = _rows_for(n_train, tokenizer), _rows_for(n_valid, tokenizer)
    rows = sequences(model, tokenizer, s_train + s_valid, SEED, progress)
    return {"train": join(rows[:s_train], tokenizer, n_train), "valid": join(rows[s_train:], tokenizer, n_valid)}


def token_ids(spec: str, split: str, tokenizer, model, folder, tok_hash: str, cache_root: Path, cache: bool = True,
              progress: bool = False) -> torch.Tensor:
    """The cached stream of `spec` (generated / generated:N) for `split`, sampled from `model` on a miss."""
    from safetensors.torch import load_file, save_file

    from .fsutil import atomic_file

    if model is None:
        raise DataError(f"data {spec!r} is text sampled from the model being trained; it is available to "
                        "`winq train` (and train() in Python), not here: pass a corpus or a file")
    split = "valid" if split == "test" else split
    paths = {sp: Path(cache_root) / f"generated-{cache_key(spec, sp, folder, tok_hash)}.safetensors"
             for sp in ("train", "valid")}
    if cache and paths[split].exists():
        try:
            return load_file(paths[split])["ids"].long()
        except Exception:  # a corrupt cache entry is sampled again, never trusted
            paths[split].unlink(missing_ok=True)
    streams = sample_splits(model, tokenizer, spec, progress=progress)
    if cache:
        for sp, ids in streams.items():
            with atomic_file(paths[sp]) as tmp:
                save_file({"ids": ids.to(torch.int32)}, str(tmp), metadata={"spec": spec, "split": sp,
                          "seconds": str(sequences.last_seconds)})
    return streams[split]
