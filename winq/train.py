"""WinQ / ParetoQ quantization-aware training loop on top of Hugging Face accelerate.

One loop for every setting: one CPU, one GPU, or many processes launched with `torchrun`
or `accelerate launch` (DDP; FSDP through an accelerate config). accelerate owns the
process group, device placement, mixed precision and gradient synchronisation; this file
owns what makes it WinQ:

* noise (ARCHITECTURE §4.2): every QuantLinear draws N(0, sigma^2) for W and for alpha in
  each training forward, from one seeded generator (same on every rank, saved in the
  checkpoint, so a resumed run draws the same noise);
* periodic re-initialisation (§4.1): after every `reinit_every` optimizer steps (not at the
  last step), W <- a W + (1 - a) Q(W) for every QuantLinear;
* `method="qat"` turns both off: the ParetoQ baseline in the same loop.

Optimiser: AdamW over all parameters (latent weights, learned scales, embeddings, norms),
linear warm-up then cosine decay, gradient accumulation, gradient-norm clipping.
Data: block b of micro-step m is a pure function of (seed, m, rank), so resuming from a
checkpoint at step s replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .checkpoint import is_checkpoint, load_checkpoint, load_trainer_state, read_info, save_checkpoint
from .config import QuantConfig, TrainConfig
from .data import PackedBlocks, batch_indices, token_ids
from .errors import CheckpointError, ConfigError
from .models import load_base_model
from .prepare import prepare, quant_layers

METRICS = "metrics.jsonl"


@dataclass
class TrainResult:
    out: Path
    step: int
    final_loss: float | None
    seconds: float
    records: list[dict] = field(default_factory=list)


def lr_factor(step: int, tcfg: TrainConfig) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warm-up, then cosine."""
    warm = tcfg.effective_warmup
    if step < warm:
        return (step + 1) / warm
    span = max(1, tcfg.steps - warm)
    progress = min(1.0, (step - warm) / span)
    return tcfg.min_lr_ratio + (1 - tcfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _param_groups(model, tcfg: TrainConfig):
    scale, other = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (scale if n.endswith(".alpha") or n.endswith(".zero_point") else other).append(p)
    return [
        {"params": other, "lr": tcfg.lr, "weight_decay": tcfg.weight_decay, "base_lr": tcfg.lr},
        {"params": scale, "lr": tcfg.scale_lr or tcfg.lr, "weight_decay": 0.0, "base_lr": tcfg.scale_lr or tcfg.lr},
    ]


def optimizer_state_tensors(opt, model) -> dict[str, torch.Tensor]:
    """AdamW state as {param name.key: tensor} (safetensors-friendly)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, st in opt.state.items():
        n = names[id(p)]
        for k, v in st.items():
            if torch.is_tensor(v):
                out[f"{n}::{k}"] = v.detach().to("cpu").reshape(-1).contiguous() if v.dim() == 0 else v.detach().to("cpu").contiguous()
    return out


def load_optimizer_state(opt, model, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for key, v in tensors.items():
        n, k = key.split("::")
        if n not in params:
            raise CheckpointError(f"optimizer state names parameter {n!r}, which the model does not have")
        p = params[n]
        st = opt.state[p]
        st[k] = v.reshape(()).to(p.device) if k == "step" else v.to(p.device)


def _rng_state(noise_gen: torch.Generator) -> dict[str, torch.Tensor]:
    st = {"cpu": torch.get_rng_state(), "noise": noise_gen.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(st: dict[str, torch.Tensor], noise_gen: torch.Generator) -> None:
    torch.set_rng_state(st["cpu"])
    noise_gen.set_state(st["noise"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def lm_loss(model, block: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a (B, T + 1) block of ids."""
    logits = model(input_ids=block[:, :-1]).logits  # (B, T, V)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), block[:, 1:].reshape(-1))


@torch.no_grad()
def heldout_loss(model, blocks: PackedBlocks, n_blocks: int, batch_size: int, device) -> float:
    """Mean loss over the first n_blocks held-out blocks (fixed, so curves are comparable)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    n = min(n_blocks, len(blocks))
    for s in range(0, n, batch_size):
        b = blocks.batch(range(s, min(n, s + batch_size))).to(device)
        total += lm_loss(model, b).item() * b.shape[0]
        count += b.shape[0]
    model.train(was)
    return total / count


@torch.no_grad()
def winq_reinit(model, a: float) -> int:
    """W <- a W + (1 - a) Q(W) for every QuantLinear; returns how many layers were reset."""
    layers = quant_layers(model)
    for m in layers.values():
        m.reinit(a)
    return len(layers)


def set_noise(model, sigma: float, generator: torch.Generator | None) -> None:
    for m in quant_layers(model).values():
        m.noise_sigma = sigma
        m.noise_generator = generator


def _prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    if resume:
        return
    if out.exists() and not is_checkpoint(out) and all(p.name == METRICS for p in out.iterdir()):
        import shutil

        shutil.rmtree(out)  # the log of an earlier run that failed before its first save
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{out} already exists: pass --resume to continue that run or --overwrite to replace it")
        if not is_checkpoint(out) and any(p.name != METRICS for p in out.iterdir()):
            raise CheckpointError(f"{out} exists and is not a winq checkpoint; refusing to overwrite it")
        import shutil

        shutil.rmtree(out)


def train(
    model: str | None,
    data: str,
    qcfg: QuantConfig,
    tcfg: TrainConfig,
    out,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    callbacks: list[Callable[[dict], None]] | None = None,
    eval_data: str | None = None,
    threads: int | None = None,
    hessian_every: int = 0,
    hessian_options: dict | None = None,
) -> TrainResult:
    """Quantization-aware training of `model` (a local HF folder or None for the default) on `data`.

    hessian_every=N > 0 adds a "hessian" entry (winq.analysis.HessianSummary.brief()) to the
    metrics record of every N-th step (after that step's reset, if any), measured on fixed
    training batches; hessian_options: batches (2), batch_size, seq_len (the run's), and any
    winq.analysis.spectrum() keyword (top_k 4, probes 2, steps 8 by default). Single process only.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    t_start = time.time()
    state = None
    if resume:
        if not is_checkpoint(out):
            raise CheckpointError(f"--resume: {out} holds no winq checkpoint to resume; run without --resume to start one")
        info = read_info(out)
        qcfg = QuantConfig.from_dict(info["quant"])
        tcfg = TrainConfig.from_dict(info["train"])
        model, data, eval_data = info.get("base_model"), info.get("data", data), info.get("eval_data", eval_data)
        state = load_trainer_state(out)
        if state is None:
            raise CheckpointError(f"{out} has no trainer_state/: it is a final export-only checkpoint and cannot be resumed")
        if state["json"].get("fsdp"):
            raise CheckpointError(
                f"{out} was written by an FSDP run, whose sharded AdamW state winq does not save: exact resume is "
                "supported for single-process and DDP runs (the weights themselves load with winq.checkpoint.load_checkpoint)"
            )
    _prepare_out(out, resume, overwrite)

    # mixed precision is our own autocast (accelerate's is process-global state: two runs in one
    # process with different precisions would clash)
    # cpu=True without a GPU: accelerate then runs torchrun-launched CPU processes as DDP over gloo
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device = accelerator.device
    is_main = accelerator.is_main_process
    torch.manual_seed(tcfg.seed)

    if resume:
        net, tok, _ = load_checkpoint(out, device="cpu")
        base_path = model
    else:
        net, tok, base_path = load_base_model(model)
        prepare(net, qcfg)
    net.config.use_cache = False
    net.train()

    ids = token_ids(data, "train", tok, progress=progress and is_main)
    blocks = PackedBlocks(ids, tcfg.seq_len)
    held = None
    if tcfg.eval_every:
        held = PackedBlocks(token_ids(eval_data or data, "valid", tok, progress=progress and is_main), tcfg.seq_len)

    net.to(device)
    noise_gen = torch.Generator(device=device).manual_seed(tcfg.seed + 1)
    set_noise(net, tcfg.effective_noise, noise_gen)
    opt = torch.optim.AdamW(_param_groups(net, tcfg), betas=(0.9, 0.95), eps=1e-8)

    start_step = 0
    records: list[dict] = []
    if state is not None:
        load_optimizer_state(opt, net, state["optimizer"])
        _set_rng_state(state["rng"], noise_gen)
        start_step = int(state["json"]["step"])
        if (out / METRICS).exists():
            records = [json.loads(l) for l in (out / METRICS).read_text().splitlines() if l.strip()]
            records = [r for r in records if r.get("step", 0) <= start_step]

    model_w, opt_w = accelerator.prepare(net, opt)
    world, rank = accelerator.num_processes, accelerator.process_index
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    R = tcfg.effective_reinit_every
    hess_batches, hess_kw = None, {}
    if hessian_every:
        if hessian_every < 0 or world > 1:
            raise ConfigError(f"hessian_every={hessian_every}: must be >= 0, and the Hessian log runs in single-process training only (world size {world})")
        from .analysis import fixed_batches

        hess_kw = {"top_k": 4, "probes": 2, "steps": 8, **(hessian_options or {})}
        nb, hb, hl = hess_kw.pop("batches", 2), hess_kw.pop("batch_size", tcfg.batch_size), hess_kw.pop("seq_len", tcfg.seq_len)
        hess_batches = [b.to(device) for b in fixed_batches(blocks.ids, nb, hb, hl)]
    tokens_per_step = tcfg.batch_size * tcfg.grad_accum * tcfg.seq_len * world

    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / METRICS, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    meta = {
        "base_model": str(base_path) if base_path is not None else None,
        "data": data,
        "eval_data": eval_data,
        "method": tcfg.method,
        "world_size": world,
    }

    def _save(step: int, final: bool) -> None:
        sd = accelerator.get_state_dict(model_w) if fsdp else None
        if not is_main:
            return
        unwrapped = accelerator.unwrap_model(model_w)
        if sd is not None:
            sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
            if getattr(unwrapped.config, "tie_word_embeddings", False):
                sd.pop("lm_head.weight", None)
        ts = {
            "optimizer": optimizer_state_tensors(opt, unwrapped) if not fsdp else {},
            "rng": _rng_state(noise_gen),
            "json": {"step": step, "world_size": world, "final": final, "fsdp": fsdp},
        }
        save_checkpoint(out, unwrapped, tok, qcfg, tcfg, {**meta, "step": step}, ts, state_dict=sd)

    if held is not None and start_step == 0:  # the starting point of the held-out curve
        rec0 = {"step": 0, "eval_loss": round(heldout_loss(accelerator.unwrap_model(model_w), held, tcfg.eval_batches * tcfg.batch_size, tcfg.batch_size, device), 6)}
        records.append(rec0)
        if is_main:
            with open(out / METRICS, "a") as f:
                f.write(json.dumps(rec0) + "\n")
    last_loss = None
    bar = None
    if progress and is_main:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        bar = Progress(
            TextColumn(f"[bold]{tcfg.method} {qcfg.grid}{qcfg.bits}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        )
        bar.start()
        task = bar.add_task("train", total=tcfg.steps, completed=start_step, info="")
    saved_any = is_checkpoint(out)
    try:
        for step in range(start_step, tcfg.steps):
            t0 = time.time()
            factor = lr_factor(step, tcfg)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor
            loss_sum = torch.zeros((), device=device)
            for micro in range(tcfg.grad_accum):
                idx = batch_indices(len(blocks), tcfg.seed, step * tcfg.grad_accum + micro, tcfg.batch_size, rank, world)
                batch = blocks.batch(idx).to(device)
                sync = micro == tcfg.grad_accum - 1
                ctx = accelerator.no_sync(model_w) if (not sync and world > 1) else _null()
                amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tcfg.precision == "bf16")
                with ctx, amp:
                    loss = lm_loss(model_w, batch) / tcfg.grad_accum
                accelerator.backward(loss)
                loss_sum += loss.detach()
            if tcfg.max_grad_norm > 0:
                gnorm = accelerator.clip_grad_norm_(model_w.parameters(), tcfg.max_grad_norm)
            else:
                gnorm = None
            opt_w.step()
            opt_w.zero_grad(set_to_none=True)
            done = step + 1
            reset = bool(R) and done % R == 0 and done < tcfg.steps
            if reset:
                if fsdp:
                    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

                    with FSDP.summon_full_params(model_w, writeback=True):
                        winq_reinit(accelerator.unwrap_model(model_w), tcfg.reinit_alpha)
                else:
                    winq_reinit(accelerator.unwrap_model(model_w), tcfg.reinit_alpha)
            loss_val = accelerator.reduce(loss_sum, reduction="mean").item()
            if not math.isfinite(loss_val):
                raise ConfigError(f"loss became {loss_val} at step {done}: lower --lr (now {tcfg.lr}) or use --precision fp32")
            last_loss = loss_val
            dt = time.time() - t0
            rec = {
                "step": done, "loss": round(loss_val, 6), "lr": opt.param_groups[0]["lr"],
                "grad_norm": round(float(gnorm), 6) if gnorm is not None else None,
                "tokens_per_s": round(tokens_per_step / dt, 2), "step_s": round(dt, 4), "reset": reset,
            }
            if held is not None and (done % tcfg.eval_every == 0 or done == tcfg.steps):
                rec["eval_loss"] = round(heldout_loss(accelerator.unwrap_model(model_w), held, tcfg.eval_batches * tcfg.batch_size, tcfg.batch_size, device), 6)
            if hess_batches is not None and done % hessian_every == 0:
                from .analysis import model_spectrum

                rec["hessian"] = model_spectrum(accelerator.unwrap_model(model_w), hess_batches, **hess_kw).brief()
            records.append(rec)
            if is_main:
                with open(out / METRICS, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            if bar is not None:
                info = f"loss {loss_val:.4f} lr {rec['lr']:.2e} {rec['tokens_per_s']:.0f} tok/s" + (" [reset]" if reset else "")
                if "eval_loss" in rec:
                    info += f" eval {rec['eval_loss']:.4f}"
                bar.update(task, completed=done, info=info)
            if tcfg.save_every and done % tcfg.save_every == 0 and done < tcfg.steps:
                _save(done, final=False)
            for cb in callbacks or ():
                cb(dict(rec, out=str(out)))
        _save(tcfg.steps, final=True)
    except BaseException:
        # a run that never saved leaves nothing behind (its live log included)
        if is_main and not saved_any and not is_checkpoint(out):
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.stop()
    accelerator.wait_for_everyone()
    return TrainResult(out=out, step=tcfg.steps, final_loss=last_loss, seconds=time.time() - t_start, records=records)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
