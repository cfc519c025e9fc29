"""Backend `ort`: an ONNX export (`winq export --format onnx`) run by onnxruntime on CPU.

    s = OrtSession("runs/winq-onnx", LoadOptions(threads=2))        # a Session (runtime/backends.py)
    fn = load_ort("runs/winq-onnx", accuracy_level=4)               # logits_fn: int64 ids (T,) -> float32 (T, V)
    generate_ids("runs/winq-onnx", prompt_ids, n_new=32)            # greedy, prefill then one token at a time

The session and its KV-cache loop are winq.formats.onnx's `OrtDecoder` (the exporter's verify runs
the same one): `logits` runs a whole window as one prefill with an empty past. `accuracy_level`
overrides the MatMulNBits attribute at load time, in memory (nothing is written): level 0 keeps
activations in float32 (matches fake-quant to ~1e-6 in the logits); level 4 quantizes activations
to int8 per block (faster, about 0.5% relative error per layer). Needs `pip install "winq[onnx]"`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from winq.formats.onnx import OrtDecoder

from .session import LoadOptions, Session, generate


class OrtSession(Session):
    def __init__(self, folder, opts: LoadOptions = LoadOptions()):
        self.decoder = OrtDecoder(folder, threads=opts.threads, accuracy_level=opts.accuracy_level)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.decoder.prefill(ids.reshape(-1).to(torch.int64).numpy())
        return torch.from_numpy(np.ascontiguousarray(logits))

    def prefill(self, ids):
        return self.decoder.prefill(ids)[-1]

    def step(self, token: int):
        return self.decoder.step(token)


def load_ort(folder, threads: int | None = None, accuracy_level: int | None = None) -> Callable[[torch.Tensor],
                                                                                                torch.Tensor]:
    """logits_fn of an ONNX export: int64 ids (T,) -> float32 logits (T, V), one prefill with an empty past."""
    return OrtSession(folder, LoadOptions(threads=threads, accuracy_level=accuracy_level)).logits


def generate_ids(folder, prompt_ids, n_new: int = 32, threads: int | None = None, accuracy_level: int | None = None,
                 eos_token_id: int | None = None) -> list[int]:
    """Greedy decoding with the KV cache: the prompt as one prefill, then one token per run."""
    session = OrtSession(folder, LoadOptions(threads=threads, accuracy_level=accuracy_level))
    return generate(session, prompt_ids, n_new, eos_token_id)


__all__ = ["OrtSession", "OrtDecoder", "load_ort", "generate_ids"]
