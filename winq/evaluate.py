"""Perplexity on held-out text with strided windows (the same token ids for every backend).

The held-out split is tokenised into one stream of ids and cut to `max_tokens`. The
first window is ids[0:seq_len] and scores its seq_len - 1 targets. Every later window
scores the next min(stride, seq_len - 1) targets and is extended to the left to seq_len
tokens, so the tokens it scores see at least seq_len - stride tokens of context (and the
token before the first scored one is always inside the window). Every target t >= 1 is
scored exactly once. stride >= seq_len - 1 gives windows that overlap by one token
(fastest); a smaller stride gives more context per token (closer to the model's true
perplexity, at about seq_len / stride times the cost).

    ppl = exp( sum of NLL over scored targets / number of scored targets )

`windows()` is the single source of the ids and scored ranges: other backends (llama.cpp,
ONNX Runtime, GPTQ, the packed runtime) evaluate the same windows and compare logits.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ConfigError, DataError


def lm_loss(model, block: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a (B, T + 1) block of ids (training, held-out loss, Hessian)."""
    logits = model(input_ids=block[:, :-1]).logits  # (B, T, V)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), block[:, 1:].reshape(-1))


def kd_loss(model, block: torch.Tensor, teacher, weight: float = 1.0) -> torch.Tensor:
    """weight * KL(teacher || model) + (1 - weight) * cross-entropy, per token, of a (B, T + 1) block of ids.
    The teacher runs without gradients; KL is taken on the full next-token distributions (temperature 1)."""
    ids = block[:, :-1]
    logits = model(input_ids=ids).logits
    with torch.no_grad():
        t_logp = F.log_softmax(teacher(input_ids=ids).logits.float().reshape(-1, logits.shape[-1]), -1)  # (N, V)
    logp = F.log_softmax(logits.float().reshape(-1, logits.shape[-1]), -1)  # (N, V)
    kl = F.kl_div(logp, t_logp, log_target=True, reduction="batchmean")
    if weight >= 1.0:
        return kl
    ce = F.nll_loss(logp, block[:, 1:].reshape(-1))
    return weight * kl + (1.0 - weight) * ce


@dataclass(frozen=True)
class Window:
    begin: int  # first token of the window in the stream
    end: int  # one past the last token
    score_from: int  # targets at stream positions >= score_from (and < end) are scored


def windows(n_tokens: int, seq_len: int, stride: int) -> list[Window]:
    if seq_len < 2:
        raise ConfigError(f"seq_len={seq_len} must be >= 2")
    if not 1 <= stride <= seq_len:
        raise ConfigError(f"stride={stride} must be in [1, seq_len={seq_len}]")
    if n_tokens < 2:
        raise DataError(f"need at least 2 tokens to evaluate, got {n_tokens}")
    out, scored_to = [], 1
    while scored_to < n_tokens:
        if not out:
            begin, end = 0, min(seq_len, n_tokens)
        else:
            end = min(scored_to + min(stride, seq_len - 1), n_tokens)
            begin = max(0, end - seq_len)
        out.append(Window(begin, end, scored_to))
        scored_to = end
    return out


@dataclass
class EvalResult:
    ppl: float
    nll: float  # mean NLL per scored token (nats)
    tokens: int  # scored tokens
    windows: int
    seconds: float

    def to_dict(self) -> dict:
        return {
            "ppl": self.ppl,
            "nll": self.nll,
            "tokens": self.tokens,
            "windows": self.windows,
            "seconds": round(self.seconds, 3),
        }


@torch.no_grad()
def window_logits(model, ids: torch.Tensor, w: Window, device) -> torch.Tensor:
    """float32 logits (end - begin, V) of one window."""
    x = ids[w.begin : w.end].unsqueeze(0).to(device)  # (1, T)
    return model(input_ids=x).logits[0].float()  # (T, V)


@torch.no_grad()
def perplexity(
    model,
    ids: torch.Tensor,
    seq_len: int = 512,
    stride: int | None = None,
    device="cpu",
    progress: bool = False,
    logits_hook=None,
) -> EvalResult:
    """Perplexity of `model` on the id stream (see the module docstring for the windows).

    logits_hook(window, logits) is called for every window (e.g. to compare backends).
    """
    model.eval()
    ws = windows(ids.numel(), seq_len, stride or seq_len)  # default: windows overlapping by one token
    t0 = time.time()
    total, count = 0.0, 0
    it = ws
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task("perplexity", total=len(ws))
    try:
        for w in it:
            logits = window_logits(model, ids, w, device)  # (T, V)
            if logits_hook is not None:
                logits_hook(w, logits)
            k = w.score_from - w.begin  # first scored target's index inside the window
            targets = ids[w.begin + k : w.end].to(logits.device)  # (n,)
            preds = logits[k - 1 : w.end - w.begin - 1]  # (n, V): position j predicts token j + 1
            total += F.cross_entropy(preds, targets, reduction="sum").item()
            count += targets.numel()
            if bar is not None:
                bar.update(task, advance=1)
    finally:
        if bar is not None:
            bar.stop()
    nll = total / count
    return EvalResult(ppl=math.exp(nll), nll=nll, tokens=count, windows=len(ws), seconds=time.time() - t0)


def eval_ids(tokenizer, data: str = "ptb", split: str = "test", max_tokens: int | None = 16384) -> torch.Tensor:
    """The held-out id stream every backend is scored on (cut to max_tokens)."""
    from .data import token_ids

    ids = token_ids(data, split, tokenizer)
    return ids[:max_tokens] if max_tokens else ids
