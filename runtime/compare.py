"""Evaluate several backends on the same token ids, window by window, and compare them.

Every backend is a function `logits_fn(ids (T,) int64) -> float32 logits (T, V)`, normally a
Session's `logits` (runtime/backends.py). The
windows are winq.evaluate.windows() (the same ids and scored positions for every backend).
Per backend: perplexity; against the reference backend (the first, normally fakequant):
relative perplexity difference, mean KL(reference || backend) per scored token and top-1
agreement; with `float_ref` (the float model's backend, `winq eval` adds it by default) also KL to the
float model and top-1 agreement with it, the gap quantization opened. Logits are compared as they
are produced, so memory stays at one window per backend whatever the number of tokens.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

from winq.evaluate import windows


def model_logits_fn(model, device="cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """logits_fn of a Hugging Face causal LM (fake-quant, packed or float)."""
    from .session import TorchSession

    return TorchSession(model, device).logits


@torch.no_grad()
def compare(backends: dict[str, Callable[[torch.Tensor], torch.Tensor]], ids: torch.Tensor, seq_len: int = 512,
            stride: int | None = None, progress: bool = False, float_ref: str | None = None) -> dict:
    """float_ref: the name of a float model's backend among `backends` (e.g. "fp"); every other backend then also
    gets kl_float / top1_float: KL(float || backend) and top-1 agreement with the float model."""
    names = list(backends)
    ref = names[0]
    if float_ref is not None and float_ref not in backends:
        raise ValueError(f"float_ref {float_ref!r} is not among the backends {names}")
    kl_f = {n: 0.0 for n in names if n != float_ref}
    agree_f = {n: 0 for n in names if n != float_ref}
    ws = windows(ids.numel(), seq_len, stride or seq_len)
    nll = {n: 0.0 for n in names}
    kl = {n: 0.0 for n in names[1:]}
    agree = {n: 0 for n in names[1:]}
    secs = {n: 0.0 for n in names}
    count = 0
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task(f"evaluating {', '.join(names)}", total=len(ws))
    try:
        for w in ws:
            x = ids[w.begin : w.end]
            k = w.score_from - w.begin
            targets = ids[w.score_from : w.end]  # (n,)
            logp = {}
            for n in names:
                t0 = time.time()
                logits = backends[n](x)  # (T, V)
                secs[n] += time.time() - t0
                logp[n] = F.log_softmax(logits[k - 1 : w.end - w.begin - 1].double(), dim=-1)  # (n, V)
                nll[n] -= logp[n].gather(1, targets[:, None]).sum().item()
            for n in names[1:]:
                p_ref = logp[ref].exp()
                kl[n] += (p_ref * (logp[ref] - logp[n])).sum().item()
                agree[n] += (logp[ref].argmax(-1) == logp[n].argmax(-1)).sum().item()
            if float_ref is not None:
                p_f, top_f = logp[float_ref].exp(), logp[float_ref].argmax(-1)
                for n in kl_f:
                    kl_f[n] += (p_f * (logp[float_ref] - logp[n])).sum().item()
                    agree_f[n] += (top_f == logp[n].argmax(-1)).sum().item()
            count += targets.numel()
            if bar is not None:
                bar.update(task, advance=1)
    finally:
        if bar is not None:
            bar.stop()
    out = {}
    for n in names:
        r = {"ppl": math.exp(nll[n] / count), "nll": nll[n] / count, "tokens": count, "windows": len(ws),
             "seconds": round(secs[n], 3)}
        if n != ref:
            r["ppl_rel_diff"] = r["ppl"] / math.exp(nll[ref] / count) - 1.0
            r["kl"] = kl[n] / count
            r["top1_agreement"] = agree[n] / count
        if float_ref is not None and n != float_ref:
            r["kl_float"] = kl_f[n] / count
            r["top1_float"] = agree_f[n] / count
        out[n] = r
    return {"reference": ref, "results": out, **({"float_reference": float_ref} if float_ref else {})}
