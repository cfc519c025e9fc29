"""Backend `ort`: an ONNX export (`winq export --format onnx`) run by onnxruntime on CPU.

    fn = load_ort("runs/winq-onnx", threads=2)                 # logits_fn: int64 ids (T,) -> float32 logits (T, V)
    fn = load_ort("runs/winq-onnx", accuracy_level=4)          # int8 activations in every MatMulNBits
    generate_ids("runs/winq-onnx", prompt_ids, n_new=32)       # greedy, prefill then one token at a time
    bench("runs/winq-onnx", prompt_ids, n_gen=32, threads=2)   # prefill / decode tokens per second
    export_fp32("runs/winq", "runs/winq-onnx-fp32")            # the same model as plain float32 MatMuls (bench baseline)

The graph takes input_ids, attention_mask, position_ids and past_key_values.N.key/value and
returns logits and present.N.key/value (see winq.exporters.onnx). `load_ort` runs a whole
window as one prefill with an empty past; `OrtDecoder.step` feeds the presents back as the
next past. `accuracy_level` overrides the MatMulNBits attribute at load time: the graph is
read without its weights, every MatMulNBits node rewritten, and the session created from
those bytes with the weights read from the folder's model.onnx.data (nothing is written).
Level 0 keeps activations in float32 (matches fake-quant to ~1e-6 in the logits); level 4
quantizes activations to int8 per block (faster, about 0.5% relative error per layer).

Needs the extra: `pip install "winq[onnx]"`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from winq.errors import ConfigError, MissingDependencyError, ModelError

PIP = 'pip install "winq[onnx]"'
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
ACCURACY_LEVELS = (0, 4)  # MatMulNBits: 0 float32 activations (exact), 4 int8 activations (the fast integer path)


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError(f"backend ort needs onnxruntime: run `{PIP}`") from None
    return onnxruntime


def _onnx():
    try:
        import onnx
    except ImportError:
        raise MissingDependencyError(f"backend ort needs onnx to rewrite accuracy_level: run `{PIP}`") from None
    return onnx


def _check(folder) -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise ModelError(f"ONNX export {folder} not found; make one with `winq export --format onnx --out {folder}`")
    if not folder.is_dir() or not (folder / MODEL_FILE).is_file():
        raise ModelError(f"{folder} is not an ONNX export (no {MODEL_FILE} inside); make one with `winq export --format onnx`")
    return folder


def open_session(folder, threads: int | None = None, accuracy_level: int | None = None):
    """An onnxruntime CPU InferenceSession of folder/model.onnx (accuracy_level rewrites every MatMulNBits)."""
    folder = _check(folder)
    ort = _ort()
    if accuracy_level is not None and (isinstance(accuracy_level, bool) or accuracy_level not in ACCURACY_LEVELS):
        raise ConfigError(f"accuracy_level={accuracy_level!r}: choose 0 (float32 activations, exact) or 4 (int8 activations)")
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    try:
        if accuracy_level is None:
            return ort.InferenceSession(str(folder / MODEL_FILE), so, providers=["CPUExecutionProvider"])
        onnx = _onnx()
        from onnx import helper

        m = onnx.load(str(folder / MODEL_FILE), load_external_data=False)  # the graph only: small
        n = 0
        for node in m.graph.node:
            if node.op_type == "MatMulNBits":
                kept = [a for a in node.attribute if a.name != "accuracy_level"]
                del node.attribute[:]
                node.attribute.extend(kept + [helper.make_attribute("accuracy_level", int(accuracy_level))])
                n += 1
        if n == 0:
            raise ConfigError(f"{folder / MODEL_FILE} has no MatMulNBits nodes: accuracy_level applies to quantized exports only")
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder.resolve()))
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except (ConfigError, MissingDependencyError):
        raise
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...) for unreadable files
        raise ModelError(f"onnxruntime cannot load {folder / MODEL_FILE}: {type(e).__name__}: {e}") from None


class OrtDecoder:
    """A session plus the KV-cache plumbing: `prefill(ids)` then `step(token)`, batch 1."""

    def __init__(self, folder, threads: int | None = None, accuracy_level: int | None = None):
        self.folder = Path(folder)
        self.session = open_session(folder, threads=threads, accuracy_level=accuracy_level)
        ins = {i.name: i for i in self.session.get_inputs()}
        need = {"input_ids", "attention_mask", "position_ids"}
        if not need <= set(ins):
            raise ModelError(f"{self.folder / MODEL_FILE}: inputs {sorted(ins)} lack {sorted(need - set(ins))}; not a winq decoder export")
        self.past_names = [n for n in ins if n.startswith("past_key_values.")]
        self.kv = {n: (ins[n].shape[1], ins[n].shape[3]) for n in self.past_names}  # (kv heads, head dim), static
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.reset()

    def reset(self) -> None:
        self.past = {n: np.zeros((1, h, 0, d), dtype=np.float32) for n, (h, d) in self.kv.items()}
        self.length = 0

    def run(self, ids: np.ndarray) -> np.ndarray:
        """Logits float32 (T, V) of the next T tokens ids (T,) given the cache; the cache grows by T."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        T = ids.shape[1]
        feeds = {
            "input_ids": ids,
            "attention_mask": np.ones((1, self.length + T), dtype=np.int64),
            "position_ids": np.arange(self.length, self.length + T, dtype=np.int64)[None],
            **self.past,
        }
        out = dict(zip(self.output_names, self.session.run(None, feeds)))
        self.past = {n: out[n.replace("past_key_values.", "present.", 1)] for n in self.past_names}
        self.length += T
        return out["logits"][0]

    def prefill(self, ids) -> np.ndarray:
        self.reset()
        return self.run(ids)

    def step(self, token: int) -> np.ndarray:
        return self.run(np.array([token], dtype=np.int64))[0]

    def generate(self, prompt_ids, n_new: int, eos_token_id: int | None = None) -> list[int]:
        """Greedy continuation of prompt_ids: up to n_new new ids (stops after eos_token_id)."""
        prompt = _as_list(prompt_ids)
        if not prompt:
            raise ConfigError("generate needs at least one prompt token")
        nxt = int(np.argmax(self.prefill(prompt)[-1]))
        out = []
        for i in range(n_new):
            out.append(nxt)
            if nxt == eos_token_id or i == n_new - 1:
                break
            nxt = int(np.argmax(self.step(nxt)))
        return out


def _as_list(ids) -> list[int]:
    return [int(t) for t in (ids.tolist() if hasattr(ids, "tolist") else ids)]


def load_ort(folder, threads: int | None = None, accuracy_level: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """logits_fn of an ONNX export: int64 ids (T,) -> float32 logits (T, V), one prefill with an empty past."""
    dec = OrtDecoder(folder, threads=threads, accuracy_level=accuracy_level)

    def fn(ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(dec.prefill(ids.reshape(-1).to(torch.int64).numpy())))

    fn.decoder = dec
    return fn


def generate_ids(folder, prompt_ids, n_new: int = 32, threads: int | None = None, accuracy_level: int | None = None,
                 eos_token_id: int | None = None) -> list[int]:
    """Greedy decoding with the KV cache: the prompt as one prefill, then one token per run."""
    return OrtDecoder(folder, threads=threads, accuracy_level=accuracy_level).generate(prompt_ids, n_new, eos_token_id)


def bench(folder, prompt_ids, n_gen: int = 32, threads: int | None = None, repeats: int = 3,
          accuracy_level: int | None = None) -> dict:
    """Prefill and decode speed (greedy, one token at a time with the KV cache).

    A warm-up run first (not timed), then the median over `repeats` runs; only session runs
    and the argmax are inside the timed regions. Returns prefill_tok_s, decode_tok_s,
    prefill_s, decode_s (medians), n_prompt, n_gen.
    """
    prompt = _as_list(prompt_ids)
    if not prompt:
        raise ConfigError("bench needs at least one prompt token")
    dec = OrtDecoder(folder, threads=threads, accuracy_level=accuracy_level)
    pre, gen = [], []
    for r in range(repeats + 1):
        dec.reset()
        t0 = time.perf_counter()
        logits = dec.run(prompt)
        t1 = time.perf_counter()
        nxt = int(np.argmax(logits[-1]))
        for _ in range(n_gen):
            nxt = int(np.argmax(dec.step(nxt)))
        t2 = time.perf_counter()
        if r:  # the first run warms caches, threads and onnxruntime's lazy kernel set-up
            pre.append(t1 - t0)
            gen.append(t2 - t1)
    p, d = float(np.median(pre)), float(np.median(gen))
    return {"prefill_tok_s": len(prompt) / p, "decode_tok_s": n_gen / d if n_gen else None, "prefill_s": p, "decode_s": d,
            "n_prompt": len(prompt), "n_gen": n_gen}


def export_fp32(checkpoint_or_model_folder, out_folder) -> Path:
    """Write a float32 ONNX (plain MatMul) of a winq checkpoint (its fake-quant weights) or a Hugging Face model folder.

    The same graph as `winq export --format onnx` (same inputs, outputs and tracing) with
    every layer kept in float32: the baseline `winq bench --backend ort` compares with. The
    folder is written under a temporary name and renamed when complete.
    """
    import os
    import shutil

    src = Path(checkpoint_or_model_folder)
    out = Path(out_folder)
    if out.exists() and (out.is_file() or any(out.iterdir())) and not (out / MODEL_FILE).is_file():
        raise ModelError(f"{out} exists and is not an ONNX export; refusing to overwrite it")
    try:  # the tracing is shared with the quantized export so that the two graphs differ only in their MatMuls
        from winq.exporters.onnx import export_float, require_onnx
    except ImportError as e:
        raise MissingDependencyError(f"export_fp32 needs onnx: run `{PIP}` ({e})") from None
    require_onnx()
    from winq.checkpoint import is_checkpoint, load_checkpoint
    from winq.models import load_base_model

    if is_checkpoint(src):
        model, tok, _ = load_checkpoint(src)
        kind = "checkpoint"
    else:
        model, tok, _ = load_base_model(str(src))
        kind = "model"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        export_float(model, tmp, metadata={"format": "onnx-fp32", "source": str(src), "source_kind": kind})
        if tok is not None:
            tok.save_pretrained(str(tmp))
        model.config.save_pretrained(str(tmp))
        from winq.fsutil import swap_into_place

        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


__all__ = ["load_ort", "generate_ids", "bench", "export_fp32", "open_session", "OrtDecoder"]
