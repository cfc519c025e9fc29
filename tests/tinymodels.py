"""Tiny seeded Hugging Face models and a tiny byte-level BPE tokenizer for fast tests."""

from __future__ import annotations

import random
from pathlib import Path

import torch

WORDS = (
    "the a market stock price rose fell sharply today yesterday investors traders said company shares "
    "bank rates year quarter profit loss new york exchange index points percent analysts expect growth"
).split()


def synthetic_text(n_lines: int = 400, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))))
    return "\n".join(lines) + "\n"


def make_tokenizer(text: str, vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(text.splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


ARCHS = ("llama", "qwen2", "mistral")


def make_config(arch: str, vocab_size: int, hidden: int = 32, layers: int = 2, inter: int = 64, tie: bool = True):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
    return cls(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=tie,
        eos_token_id=0, bos_token_id=0, pad_token_id=0,
    )


def make_model_dir(path: Path, arch: str = "llama", seed: int = 0, text: str | None = None, **cfg) -> Path:
    """Write a tiny seeded HF model + tokenizer folder and return it."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tok = make_tokenizer(text or synthetic_text())
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(arch, len(tok), **cfg), dtype=torch.float32)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def default_checkpoint(out: Path, **quant):
    """The built-in default model prepare()d with QuantConfig(**quant), saved untrained:
    (checkpoint, model, tokenizer)."""
    import winq
    from winq.checkpoint import save_checkpoint
    from winq.models import load_base_model

    net, tok, _ = load_base_model(None)
    cfg = winq.QuantConfig(**quant)
    ck = save_checkpoint(out, winq.prepare(net, cfg), tok, cfg, None)
    return ck, net, tok
