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


# ---------------------------------------------------------------------------------------------
# the architectures llama.cpp knows beyond llama/qwen2 (GGUF export)

MORE_ARCHS = ("qwen3", "gemma3", "phi3", "smollm3")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
TOKENIZER_TEXT_EXTRA = "\nIn 2024, 1,234 people paid $56.78 (about 9%) for it's 'x' -- don't! 1234567 99\n"


def make_pre_tokenizer(text: str, pre: str = "gpt-2", vocab_size: int = 400):
    """A byte-level BPE tokenizer with the pre-tokenizer of a model family: gpt-2 (GPT-2), qwen2 (Qwen2/Qwen3:
    single digits), llama-bpe (Llama 3 / SmolLM3: digit runs of up to three)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if pre == "gpt-2":
        pt = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        pat = {"qwen2": QWEN2_REGEX, "llama-bpe": LLAMA3_REGEX}[pre]
        pt = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pat), behavior="isolated"),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pt
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator((text + TOKENIZER_TEXT_EXTRA).splitlines(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def make_arch_config(arch: str, vocab_size: int, hidden: int = 256, inter: int = 512, tie: bool = True, **extra):
    """A tiny config of Qwen3 (head_dim 128 != hidden/heads), Gemma 3 text (6 layers: global every 3rd, not
    llama.cpp's default 6th; the others sliding with a 16-token window; final soft-capping), Phi-3 (fused
    qkv / gate_up) or SmolLM3 (4 layers: the 4th without rope); 4 heads, 2 kv heads."""
    from transformers import Gemma3TextConfig, Phi3Config, Qwen3Config, SmolLM3Config

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=tie,
                  eos_token_id=0, bos_token_id=0, pad_token_id=0)
    if arch == "qwen3":
        return Qwen3Config(**common, num_hidden_layers=2, head_dim=128, **extra)
    if arch == "gemma3":
        head_dim = hidden // 4
        return Gemma3TextConfig(**{**common, "num_hidden_layers": 6, "head_dim": head_dim,
                                   "query_pre_attn_scalar": head_dim, "sliding_window": 16,
                                   "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
                                   "final_logit_softcapping": 30.0, **extra})
    if arch == "phi3":
        return Phi3Config(**{**common, "num_hidden_layers": 2, "sliding_window": None, **extra})
    if arch == "smollm3":
        return SmolLM3Config(**common, num_hidden_layers=4, **extra)
    raise ValueError(arch)


def make_arch_dir(path: Path, arch: str, seed: int = 0, pre: str = "gpt-2", **cfg) -> Path:
    """Write a tiny seeded model of one of MORE_ARCHS with a byte-level tokenizer (`pre` style); return the folder."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tok = make_pre_tokenizer(synthetic_text(), pre)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_arch_config(arch, len(tok), **cfg), dtype=torch.float32)
    with torch.no_grad():  # Gemma's norm weights start at 0 (scale 1 + w): give them something to carry
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn(p.shape))
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def fused_and_composite(m, sigma: float, x_shape: tuple) -> tuple[list, list]:
    """One QuantLinear's training forward + backward (its fused autograd Function) and the same through the
    composite expression (fake_weight), with WinQ noise `sigma` (the same draw) and seeded x and output gradient.
    Returns ([y, dx, dW, dalpha, dbias, dzero...] fused, the same composite); both outputs must be equal."""
    from torch import nn
    from torch.nn import functional as F

    from winq.noise import NoiseSource

    net = nn.Sequential(m)
    NoiseSource(net, seed=2)
    m.noise_sigma = sigma
    net.train()
    x = torch.randn(*x_shape, generator=torch.Generator().manual_seed(1), requires_grad=True)
    gy = torch.randn(*x_shape[:-1], m.out_features, generator=torch.Generator().manual_seed(2))
    params = [p for p in (m.weight, m.alpha, m.bias, m.zero_point) if p is not None]
    res = []
    for forward in (net, lambda x: F.linear(x, m.fake_weight(noise=True), m.bias)):
        x.grad = None
        m.zero_grad()
        y = forward(x)
        y.backward(gy)
        res.append([y.detach(), x.grad.clone()] + [p.grad.clone() for p in params])
    return res[0], res[1]
