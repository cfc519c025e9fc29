"""A small pretrained Llama made here, for studies that need thousands of QAT steps on 2 CPU cores.

The built-in SmolLM2-135M takes about 5 s per 128-token step on one core, so a QAT run long
enough for its weights to travel a whole quantization step is out of reach on this machine.
This script builds `ptb-small`: a 4-layer Llama (hidden 256, MLP 768, 4 heads, tied
embeddings; widths are multiples of 256) with a word-level tokenizer over Penn Treebank's own
10k-word vocabulary (line ends become <eos>), pretrains it in float32 on PTB train, and saves a
Hugging Face folder to $WINQ_CACHE/models/ptb-small (default ~/.cache/winq/models/ptb-small).
Everything comes from registry packages (treebank); the weights are random-initialised, then
trained here, seeded.

    python benchmarks/small_model.py                 # ~4000 steps x 8 x 128 tokens, about 10 minutes on 2 cores
    python benchmarks/small_model.py --steps 200     # a quick, weaker model

Prints the PTB-valid perplexity of the result. Used by benchmarks/convergence.py --model small.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

NAME = "ptb-small"


def out_dir() -> Path:
    from winq.data import cache_dir

    return cache_dir() / "models" / NAME


def build_tokenizer(path: Path):
    """A WordLevel tokenizer over PTB train's words (+ <eos> for line ends, <unk> for anything else)."""
    import treebank
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(treebank.penn["train"].split()))
    vocab = {"<unk>": 0, "<eos>": 1}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace("\n", " <eos> ")
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(str(path))
    return fast


def build_model(vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help=f"folder to write (default: $WINQ_CACHE/models/{NAME})")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from winq.data import PackedBlocks, batch_indices, token_ids
    from winq.evaluate import lm_loss
    from winq.fsutil import swap_into_place

    out = Path(args.out) if args.out else out_dir()
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(tmp)
    model = build_model(len(tok), args.seed)
    train = PackedBlocks(token_ids("ptb", "train", tok), args.seq_len)
    valid = PackedBlocks(token_ids("ptb", "valid", tok), args.seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warm
            if s < warm
            else 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, args.steps - warm)))
        ),
    )
    t0 = time.time()
    model.train()
    for step in range(args.steps):
        b = train.batch(batch_indices(len(train), args.seed, step, args.batch_size))
        loss = lm_loss(model, b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 200 == 0 or step == 0:
            print(f"step {step + 1}/{args.steps} loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    with torch.no_grad():
        n = min(64, len(valid))
        vl = (
            sum(lm_loss(model, valid.batch(range(i, min(n, i + 8)))).item() * min(8, n - i) for i in range(0, n, 8)) / n
        )
    model.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "pretrain.json").write_text(
        json.dumps(
            {
                "command": "python " + " ".join(sys.argv),
                "steps": args.steps,
                "batch_size": args.batch_size,
                "seq_len": args.seq_len,
                "lr": args.lr,
                "seed": args.seed,
                "seconds": round(time.time() - t0, 1),
                "valid_loss": vl,
                "valid_ppl": math.exp(vl),
                "valid_tokens": n * args.seq_len,
            },
            indent=2,
        )
        + "\n"
    )
    swap_into_place(tmp, out)
    print(
        f"wrote {out}: PTB valid loss {vl:.3f} (ppl {math.exp(vl):.1f}) on {n * args.seq_len} tokens, "
        f"{time.time() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
