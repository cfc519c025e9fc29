"""Post-training quantization of the float embeddings / output head, and what it costs in perplexity.

The trained model's quantized layers are exported exactly; its float embedding table and float lm_head are
not trained in any grid, so storing them in a quantized type (GGUF `--keep q8_0|q6_k`, ONNX
`--keep-head int8|int4`) is post-training round-to-nearest: never exact. Such an export measures what it
costs: the perplexity of the fake-quant model (float head / embeddings, as trained) against the same model
with those tensors replaced by the values read back from the written file, on a fixed held-out slice (the
first `keep_eval_tokens` tokens of `keep_eval_data`'s test split, windows of up to 512 tokens). The result
goes to winq-export.json under info["post_training"] with `exact: false`; the CLI prints it as a note.

    keep_eval_tokens = -1   auto: measured (AUTO_TOKENS) when a quantized type is asked for, not for f16 / f32
    keep_eval_tokens = 0    not measured (recorded as skipped)
    keep_eval_tokens = N    N tokens (also for f16, whose rounding is small but not zero)
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from winq.errors import ConfigError, WinqError

AUTO_TOKENS = 4096
EVAL_SPLIT = "test"
MAX_SEQ = 512


def eval_tokens(option: int, lossy: bool) -> int:
    """Tokens to measure on: the option's value, or the auto choice for -1."""
    if isinstance(option, bool) or not isinstance(option, int) or option < -1:
        raise ConfigError(f"keep_eval_tokens={option!r}: give -1 (auto), 0 (do not measure) or a number of tokens")
    if option == -1:
        return AUTO_TOKENS if lossy else 0
    return option


def measure(model, tokenizer, replaced: dict[str, torch.Tensor], tokens: int, data: str, what: str) -> dict:
    """Perplexity of `model` as it is and with the parameters `replaced` ({state-dict name: values}) swapped
    in (restored afterwards), on the first `tokens` tokens of data's test split."""
    from winq.evaluate import eval_ids, perplexity

    try:
        ids = eval_ids(tokenizer, data, EVAL_SPLIT, max_tokens=tokens)
    except WinqError as e:
        raise ConfigError(f"measuring the perplexity cost of {what} needs held-out text ({e}); pass "
                          f"--keep-eval-data PATH or --keep-eval-tokens 0 to skip the measurement") from None
    seq = int(min(MAX_SEQ, getattr(model.config, "max_position_embeddings", MAX_SEQ) or MAX_SEQ, ids.numel()))
    t0 = time.time()
    ref = perplexity(model, ids, seq_len=seq)
    with swapped(model, replaced):
        got = perplexity(model, ids, seq_len=seq)
    return {
        "data": data, "split": EVAL_SPLIT, "tokens": ref.tokens, "seq_len": seq,
        "reference": "fake-quant model, float embeddings / head as trained",
        "ppl_reference": ref.ppl, "ppl_post_training": got.ppl, "delta_ppl": got.ppl - ref.ppl,
        "relative": (got.ppl - ref.ppl) / ref.ppl, "delta_nll": got.nll - ref.nll,
        "seconds": round(time.time() - t0, 1),
    }


@contextmanager
def swapped(model, replaced: dict[str, torch.Tensor]):
    """The model with the parameters `replaced` ({state-dict name: values}) swapped in, restored on exit (a tied
    embedding / head is one parameter: both uses see the new values)."""
    params = {n: model.get_parameter(n) for n in replaced}
    old = {n: p.data for n, p in params.items()}
    try:
        for n, p in params.items():
            p.data = replaced[n].to(p.dtype).reshape(p.shape)
        yield model
    finally:
        for n, p in params.items():
            p.data = old[n]


def record(method: str, tensors: list[dict], cost: dict | None, skipped: str | None = None) -> dict:
    """info["post_training"] of a manifest: never exact."""
    return {"exact": False, "method": method, "tensors": tensors, "ppl_cost": cost,
            **({"ppl_cost_skipped": skipped} if skipped else {})}


def note(what: str, rec: dict) -> str:
    """The line the CLI prints about a post-training quantized export."""
    c = rec.get("ppl_cost")
    if c is None:
        return (f"{what}: post-training rounding, NOT exact; perplexity cost not measured "
                f"({rec.get('ppl_cost_skipped')})")
    rel = c["relative"]
    return (f"{what}: post-training rounding, NOT exact; measured perplexity cost "
            f"{c['ppl_reference']:.4f} -> {c['ppl_post_training']:.4f} ({'+' if rel >= 0 else ''}{100 * rel:.3f}%, "
            f"{c['tokens']} tokens of {c['data']} {c['split']}; fake-quant model, weights only)")
