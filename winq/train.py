"""WinQ / ParetoQ quantization-aware training loop on top of Hugging Face accelerate.

One loop for every setting: one CPU, one GPU, or many processes launched with `torchrun`
or `accelerate launch` (DDP; FSDP through an accelerate config). accelerate owns the
process group, device placement, mixed precision and gradient synchronisation; this file
owns what makes it WinQ:

* noise (ARCHITECTURE §4.2): every QuantLinear adds sigma * N(0, 1) to W and to alpha in
  each training forward, from one buffer refilled per forward (winq.noise: seeded, the same on
  every rank, its draw counter saved in the checkpoint, so a resumed run draws the same noise);
* re-initialisation (§4.1): W <- a W + (1 - a) Q(W) for every QuantLinear, every
  `reinit_every` optimizer steps (not at the last step) or, with reinit_every="auto", when
  the travel or plateau trigger of winq.schedule fires;
* code-flip diagnostics (winq.diagnostics: flip_rate, oscillation, boundary_margin, travel)
  after every optimizer step, in metrics.jsonl and the progress line;
* `method="qat"` turns noise and resets off: the ParetoQ baseline in the same loop.

The run goes build() -> loop(); each optimizer step is step() (forward/backward over the
micro-batches, clip, AdamW) then after_step() (diagnostics, reset).

Optimiser: AdamW over all parameters (latent weights, learned scales, embeddings, norms),
linear warm-up then cosine decay, gradient accumulation, gradient-norm clipping.
Data: block b of micro-step m is a pure function of (seed, m, rank), so resuming from a
checkpoint at step s replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from .actplan import plan_record, train_act_plan
from .checkpoint import is_checkpoint, load_checkpoint, load_trainer_state, read_info, save_checkpoint
from .config import QuantConfig, TrainConfig
from .data import PackedBlocks, batch_indices, parts, token_ids
from .generated import is_generated
from .diagnostics import CodeTracker
from .errors import CheckpointError, ConfigError, DataError
from .calibrate import calibration_batches, collect_hessians, initialize
from .evaluate import kd_loss, lm_loss
from .models import load_base_model
from .noise import NoiseSource
from .prepare import prepare, quant_layers, target_linears
from .teacher import fits_in_memory, heldout_scores, make_teacher
from .reset_schedule import ResetSchedule

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
    """AdamW groups: the latent weights at lr; the scales at scale_lr (default lr) times their grid's
    scale_factor / step_scale, so a scale moves by the same share of itself on every grid (Adam's step is about the
    lr, whatever the gradient: nl4's alpha is a sixteenth of a level step, lsq's one step, so nl4's scale lr is
    a sixteenth); zero points at scale_lr."""
    from .prepare import quant_layers

    base = tcfg.scale_lr or tcfg.lr
    unit = {}  # alpha parameter id -> its lr factor
    for m in quant_layers(model).values():
        unit[id(m.alpha)] = m.spec.scale_factor / m.spec.step_scale
    groups: dict[float, list] = {}
    other = []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if n.endswith(".alpha") or n.endswith(".zero_point"):
            groups.setdefault(unit.get(id(p), 1.0), []).append(p)
        else:
            other.append(p)
    out = [{"params": other, "lr": tcfg.lr, "weight_decay": tcfg.weight_decay, "base_lr": tcfg.lr}]
    for f, ps in sorted(groups.items(), reverse=True):
        out.append({"params": ps, "lr": base * f, "weight_decay": 0.0, "base_lr": base * f})
    return out


def optimizer_state_tensors(opt, model) -> dict[str, torch.Tensor]:
    """AdamW state as {param name.key: tensor} (safetensors-friendly)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, st in opt.state.items():
        n = names[id(p)]
        for k, v in st.items():
            if torch.is_tensor(v):
                out[f"{n}::{k}"] = (
                    v.detach().to("cpu").reshape(-1).contiguous() if v.dim() == 0 else v.detach().to("cpu").contiguous()
                )
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


def _rng_state() -> dict[str, torch.Tensor]:
    st = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(st: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(st["cpu"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


@torch.no_grad()
def heldout_loss(model, blocks: PackedBlocks, n_blocks: int, batch_size: int, device) -> float:
    """Mean loss over n_blocks held-out blocks spread over the stream (fixed, so curves are comparable)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    idx = blocks.spread(n_blocks)
    for s in range(0, len(idx), batch_size):
        b = blocks.batch(idx[s : s + batch_size]).to(device)
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


def _prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    if resume:
        return
    if out.exists() and not is_checkpoint(out) and all(p.name == METRICS for p in out.iterdir()):
        shutil.rmtree(out)  # the log of an earlier run that failed before its first save
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(
                f"{out} already exists: pass --resume to continue that run or --overwrite to replace it"
            )
        if not is_checkpoint(out) and any(p.name != METRICS for p in out.iterdir()):
            raise CheckpointError(f"{out} exists and is not a winq checkpoint; refusing to overwrite it")
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
    teacher: str | None = None,
    calib_data: str | None = None,
) -> TrainResult:
    """Quantization-aware training of `model` (a local HF folder or None for the default) on `data`.

    hessian_every=N > 0 adds a "hessian" entry (winq.analysis.HessianSummary.brief()) to the
    metrics record of every N-th step (after that step's reset, if any), measured on fixed
    training batches; hessian_options: batches (2), batch_size, seq_len (the run's), and any
    winq.analysis.spectrum() keyword (top_k 4, probes 2, steps 8 by default). Single process only.

    teacher: a local HF folder to distil from (tcfg.distill > 0; None: the base model itself, float).
    calib_data: the data spec of the step-0 quantizer's calibration tokens (qcfg.init search / gptq; None: `data`).
    """
    if threads:
        torch.set_num_threads(threads)
    run = _Run(Path(out), model, data, eval_data, qcfg, tcfg, resume, overwrite, teacher, calib_data)
    run.build(progress)
    run.setup_hessian(hessian_every, hessian_options)
    return run.loop(progress, callbacks or [])


class _Run:
    """One training run, in the order train() calls it: resolve (here), build, loop."""

    def __init__(self, out: Path, model, data, eval_data, qcfg, tcfg, resume: bool, overwrite: bool,
                 teacher: str | None = None, calib_data: str | None = None):
        self.out, self.t_start, self.state = out, time.time(), None
        if resume:
            if not is_checkpoint(out):
                raise CheckpointError(
                    f"--resume: {out} holds no winq checkpoint to resume; run without --resume to start one"
                )
            info = read_info(out)
            qcfg, tcfg = QuantConfig.from_dict(info["quant"]), TrainConfig.from_dict(info["train"])
            model, data, eval_data = info.get("base_model"), info.get("data", data), info.get("eval_data", eval_data)
            teacher, calib_data = info.get("teacher"), info.get("calib_data")
            self.state = load_trainer_state(out)
            if self.state is None:
                raise CheckpointError(
                    f"{out} has no trainer_state/: it is a final export-only checkpoint and cannot be resumed"
                )
            if self.state["json"].get("fsdp"):
                raise CheckpointError(
                    f"{out} was written by an FSDP run, whose sharded AdamW state winq does not save: exact resume is "
                    "supported for single-process and DDP runs "
                    "(the weights themselves load with winq.checkpoint.load_checkpoint)"
                )
        self.model_arg, self.data, self.eval_data, self.qcfg, self.tcfg = model, data, eval_data, qcfg, tcfg
        self.teacher_arg, self.calib_data = teacher, calib_data
        self.teacher, self.init_info, self.best, self.kept = None, None, None, None
        _prepare_out(out, resume, overwrite)

    # ---- build: accelerator, model, data, noise, optimizer, diagnostics, schedule -------------
    def build(self, progress: bool) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        tcfg = self.tcfg
        # mixed precision is our own autocast (accelerate's is process-global state: two runs in one
        # process with different precisions would clash)
        # cpu=True without a GPU: accelerate then runs torchrun-launched CPU processes as DDP over gloo
        # gradient accumulation through accelerate: accumulate() skips the DDP all-reduce on all but the
        # last micro-batch, backward() divides the loss by grad_accum
        acc = self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(), gradient_accumulation_steps=tcfg.grad_accum
        )
        self.device, self.is_main = acc.device, acc.is_main_process
        torch.manual_seed(tcfg.seed)
        show = progress and self.is_main
        if self.state is not None:
            net, tok, _ = load_checkpoint(self.out, device="cpu")
            self.base_path = self.model_arg
            base = None  # the float model: the teacher's copy, and the sampler of `generated` data on a cache miss
            if tcfg.distill > 0 or self._samples():
                base = load_base_model(self.model_arg)[0]
            train_ids, held_ids = self._data(tok, base, show)
            if tcfg.distill > 0:
                self.teacher = make_teacher(base, tok, self.teacher_arg, self.device)
        else:
            net, tok, self.base_path = load_base_model(self.model_arg)
            train_ids, held_ids = self._data(tok, net, show)
            PackedBlocks(train_ids, tcfg.seq_len)  # too little data: refused before the teacher and the calibration
            self._start(net, tok, train_ids, show)
        net.config.use_cache = False
        net.train()
        self.tok = tok
        self.blocks = PackedBlocks(train_ids, tcfg.seq_len)
        self.held = PackedBlocks(held_ids, tcfg.seq_len) if held_ids is not None else None

        net.to(self.device)
        layers = quant_layers(net)
        # --act-quant: a runtime's activation quantizers, straight-through; a per-layer plan (llamacpp) is resolved
        # here, on the prepared model, and stored resolved (resume and the exporters' check read it back)
        act = train_act_plan(net, tcfg.act_quant)
        self.tcfg = tcfg = replace(tcfg, act_quant=plan_record(tcfg.act_quant, act))
        for n, m in layers.items():
            m.noise_sigma = tcfg.effective_noise
            m.act_quant = act[n]
        self.noise = NoiseSource(net, tcfg.seed + 1, layers) if tcfg.effective_noise > 0 else None
        self.opt = torch.optim.AdamW(_param_groups(net, tcfg), betas=(0.9, 0.95), eps=1e-8)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, tcfg))
        self.model_w, self.opt_w = acc.prepare(net, self.opt)
        self.world, self.rank = acc.num_processes, acc.process_index
        self.fsdp = acc.distributed_type == DistributedType.FSDP
        self.schedule = ResetSchedule.from_config(tcfg)
        if self.fsdp and self.schedule.needs_diagnostics:
            raise ConfigError(
                "--reinit-every auto reads the weights every step; it runs with DDP or one process, not FSDP"
            )
        self.tracker = CodeTracker(layers, tcfg.diag_sample) if tcfg.diag_every and not self.fsdp else None
        self.tokens_per_step = tcfg.batch_size * tcfg.grad_accum * tcfg.seq_len * self.world
        self.start_step, self.records = 0, []
        if self.state is not None:
            self._restore(self.state, net)
        elif self.tracker is not None:
            self.tracker.start()
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / METRICS, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.records)

    def _samples(self) -> bool:
        """Does any data spec of the run name text sampled from the model (winq/generated.py)?"""
        specs = [self.data, self.eval_data or self.data, self.calib_data or self.data]
        return any(is_generated(p) for s in specs for p in parts(s))

    def _data(self, tok, float_net, show: bool):
        """(train ids, held-out ids or None), read while `float_net` is still the float model: the `generated`
        spec samples from it (and, for calib_data, before prepare)."""
        kw = {"progress": show, "model": float_net, "model_dir": self.base_path}
        train_ids = token_ids(self.data, "train", tok, **kw)
        held = token_ids(self.eval_data or self.data, "valid", tok, **kw) if self.tcfg.eval_every else None
        if held is not None and (held.numel() - 1) // self.tcfg.seq_len < 1:
            raise DataError(f"held-out data {self.eval_data or self.data!r} (valid split): {held.numel()} tokens, "
                            f"fewer than one evaluation block of seq_len + 1 = {self.tcfg.seq_len + 1}: give more "
                            "text (a file's last 5% of documents is held out), a smaller --seq-len, or --eval-every 0")
        self.calib_ids = None
        if self.calib_data is not None and self.state is None and self.qcfg.init != "max":
            self.calib_ids = token_ids(self.calib_data, "train", tok, **kw)
        return train_ids, held

    def _start(self, net, tok, train_ids, show: bool) -> None:
        """A new run: the teacher (a float copy, before anything is quantized), the calibration statistics of
        the float model, prepare() and the step-0 quantizer (winq.calibrate)."""
        qcfg, tcfg = self.qcfg, self.tcfg
        if tcfg.distill > 0:
            if self.teacher_arg is None and not fits_in_memory(net):
                raise ConfigError("distillation keeps a float copy of the model as teacher, and the available "
                                  "memory does not hold another copy: use --distill 0")
            self.teacher = make_teacher(net, tok, self.teacher_arg, self.device)
        hess = None
        if qcfg.init != "max":
            ids = train_ids if self.calib_ids is None else self.calib_ids
            t0 = time.time()
            batches = calibration_batches(ids, qcfg.calib_tokens, tcfg.seed)
            net.to(self.device)
            hess = collect_hessians(net, target_linears(net, qcfg), [b.to(self.device) for b in batches],
                                    diag=qcfg.init == "search")
            calib_s = time.time() - t0
        prepare(net, qcfg)
        self.init_info = initialize(net, qcfg.init, hess, progress=show)
        if hess is not None:
            self.init_info["calibration_s"] = round(calib_s, 2)
            self.init_info["calibration_tokens"] = sum(int(b.numel()) for b in batches)
        del hess

    def _restore(self, state: dict, net) -> None:
        load_optimizer_state(self.opt, net, state["optimizer"])
        _set_rng_state(state["rng"])
        js = state["json"]
        self.start_step = int(js["step"])
        self.sched.last_epoch = self.start_step  # the lr of the next step, as an uninterrupted run has it
        for g in self.opt.param_groups:
            g["lr"] = g["initial_lr"] * lr_factor(self.start_step, self.tcfg)
        if self.noise is not None and "noise" in js:
            self.noise.load_state_dict(js["noise"])
        self.schedule.load_state(js.get("schedule", {}))
        if "best" in js:  # keep_best across the interruption: the saved best, or this very state
            kept = state.get("best") or {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
            self.best = (int(js["best"]["step"]), float(js["best"]["score"]), kept)
        if self.tracker is not None:
            self.tracker.load_state_tensors(state.get("diagnostics", {}))
            if self.tracker.reset_codes is None:
                self.tracker.start()
        if (self.out / METRICS).exists():
            recs = [json.loads(line) for line in (self.out / METRICS).read_text().splitlines() if line.strip()]
            self.records = [r for r in recs if r.get("step", 0) <= self.start_step]

    def setup_hessian(self, every: int, options: dict | None) -> None:
        self.hessian_every, self.hess_batches, self.hess_kw = every, None, {}
        if not every:
            return
        if every < 0 or self.world > 1:
            raise ConfigError(
                f"hessian_every={every}: must be >= 0, and the Hessian log runs in single-process training only "
                f"(world size {self.world})"
            )
        from .hessian import fixed_batches

        kw = {"top_k": 4, "probes": 2, "steps": 8, **(options or {})}
        nb, hb, hl = (
            kw.pop("batches", 2),
            kw.pop("batch_size", self.tcfg.batch_size),
            kw.pop("seq_len", self.tcfg.seq_len),
        )
        self.hess_batches = [b.to(self.device) for b in fixed_batches(self.blocks.ids, nb, hb, hl)]
        self.hess_kw = kw

    # ---- one optimizer step -------------------------------------------------------------------
    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.model_w)

    def step(self, step: int) -> tuple[float, float | None]:
        """Forward/backward over the micro-batches of optimizer step `step` (0-based) and the update."""
        tcfg, acc = self.tcfg, self.accelerator
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(tcfg.grad_accum):
            idx = batch_indices(
                len(self.blocks), tcfg.seed, step * tcfg.grad_accum + micro, tcfg.batch_size, self.rank, self.world
            )
            batch = self.blocks.batch(idx).to(self.device)
            amp = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=tcfg.precision == "bf16")
            with acc.accumulate(self.model_w):
                with amp:
                    if self.teacher is not None:
                        loss = kd_loss(self.model_w, batch, self.teacher, tcfg.distill)
                    else:
                        loss = lm_loss(self.model_w, batch)
                acc.backward(loss)
            loss_sum += loss.detach() / tcfg.grad_accum
        gnorm = acc.clip_grad_norm_(self.model_w.parameters(), tcfg.max_grad_norm) if tcfg.max_grad_norm > 0 else None
        self.opt_w.step()
        self.sched.step()
        self.opt_w.zero_grad(set_to_none=True)
        loss_val = acc.reduce(loss_sum, reduction="mean").item()
        if not math.isfinite(loss_val):
            raise ConfigError(
                f"loss became {loss_val} at step {step + 1}: lower --lr (now {tcfg.lr}) or use --precision fp32"
            )
        return loss_val, (float(gnorm) if gnorm is not None else None)

    def after_step(self, done: int, lr: float) -> tuple[dict | None, dict | None]:
        """Diagnostics of the updated weights, then the reset if the schedule calls for one."""
        diag = None
        if self.tracker is not None and (done % self.tcfg.diag_every == 0 or self.schedule.needs_diagnostics):
            diag = self.tracker.measure(lr)
        self.schedule.observe(done, diag)
        trigger = self.schedule.decide(done, diag)
        if self.world > 1 and self.schedule.needs_diagnostics:
            from accelerate.utils import broadcast_object_list

            trigger = broadcast_object_list([trigger], from_process=0)[0]  # rank 0 decides for all
        if trigger is None:
            return diag, None
        if self.fsdp:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            with FSDP.summon_full_params(self.model_w, writeback=True):
                winq_reinit(self._unwrapped(), self.tcfg.reinit_alpha)
        else:
            winq_reinit(self._unwrapped(), self.tcfg.reinit_alpha)
        entry = self.schedule.record(done, trigger, diag)
        if self.tracker is not None:
            self.tracker.start()
        return diag, entry

    # ---- logging, progress, checkpoints -------------------------------------------------------
    def _log(self, rec: dict) -> None:
        self.records.append(rec)
        if self.is_main:
            with open(self.out / METRICS, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def _heldout(self) -> dict:
        """{"eval_loss"} (and "eval_kl" to the teacher when distilling) on the fixed held-out blocks; keeps the
        best state so far (keep_best: the lowest eval_kl when distilling, else eval_loss)."""
        t = self.tcfg
        n, net = t.eval_batches * t.batch_size, self._unwrapped()
        if self.teacher is None:
            return {"eval_loss": round(heldout_loss(net, self.held, n, t.batch_size, self.device), 6)}
        loss, kl = heldout_scores(net, self.teacher, self.held, n, t.batch_size, self.device)
        return {"eval_loss": round(loss, 6), "eval_kl": round(kl, 6)}

    def _track_best(self, done: int, rec: dict) -> None:
        if not self.tcfg.keep_best or self.fsdp:
            return
        score = rec.get("eval_kl", rec["eval_loss"])
        if self.best is None or score < self.best[1]:
            state = {k: v.detach().to("cpu", copy=True) for k, v in self._unwrapped().state_dict().items()}
            self.best = (done, score, state)

    def _restore_best(self) -> int | None:
        """Load the best evaluated state into the model when it is not the last one; returns its step."""
        if self.best is None:
            return None
        step, _, state = self.best
        last = self.records[-1] if self.records else {}
        if step != self.tcfg.steps or "eval_loss" not in last:
            self._unwrapped().load_state_dict(state)
        return step

    def save(self, step: int, final: bool) -> None:
        acc = self.accelerator
        sd = acc.get_state_dict(self.model_w) if self.fsdp else None
        if not self.is_main:
            return
        unwrapped = self._unwrapped()
        if sd is not None:
            sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
            if getattr(unwrapped.config, "tie_word_embeddings", False):
                sd.pop("lm_head.weight", None)
        js = {
            "step": step,
            "world_size": self.world,
            "final": final,
            "fsdp": self.fsdp,
            "schedule": self.schedule.state(),
        }
        if self.noise is not None:
            js["noise"] = self.noise.state_dict()
        best = {}
        if self.best is not None and not final:  # resume continues the keep_best comparison exactly
            js["best"] = {"step": self.best[0], "score": self.best[1]}
            if self.best[0] != step:
                best = {k: v.contiguous() for k, v in self.best[2].items()}
        ts = {
            "optimizer": optimizer_state_tensors(self.opt, unwrapped) if not self.fsdp else {},
            "rng": _rng_state(),
            "diagnostics": self.tracker.state_tensors() if self.tracker is not None else {},
            "best": best,
            "json": js,
        }
        meta = {
            "base_model": str(self.base_path) if self.base_path is not None else None,
            "data": self.data,
            "eval_data": self.eval_data,
            "method": self.tcfg.method,
            "world_size": self.world,
            "step": step,
            "teacher": self.teacher_arg,
            "calib_data": self.calib_data,
        }
        if self.init_info is not None:
            meta["init"] = self.init_info
        if final and self.kept is not None:
            meta["kept"] = self.kept  # keep_best: the evaluated state these weights are
        save_checkpoint(self.out, unwrapped, self.tok, self.qcfg, self.tcfg, meta, ts, state_dict=sd)

    def loop(self, progress: bool, callbacks: list) -> TrainResult:
        tcfg = self.tcfg
        if self.held is not None and self.start_step == 0:  # the starting point of the held-out curve
            rec0 = {"step": 0, **self._heldout()}
            if self.init_info is not None:
                rec0["init"] = self.init_info
            self._track_best(0, rec0)
            self._log(rec0)
        bar = (
            Progress(tcfg.steps, self.start_step, f"{tcfg.method} {self.qcfg.grid}{self.qcfg.bits}")
            if progress and self.is_main
            else None
        )
        saved_any, last_loss = is_checkpoint(self.out), None
        try:
            for step in range(self.start_step, tcfg.steps):
                t0 = time.time()
                lr = self.opt.param_groups[0]["lr"]
                loss, gnorm = self.step(step)
                done = step + 1
                diag, reset = self.after_step(done, lr)
                dt = time.time() - t0
                last_loss = loss
                rec = {
                    "step": done,
                    "loss": round(loss, 6),
                    "lr": lr,
                    "grad_norm": round(gnorm, 6) if gnorm is not None else None,
                    "tokens_per_s": round(self.tokens_per_step / dt, 2),
                    "step_s": round(dt, 4),
                    "reset": reset is not None,
                }
                if diag is not None:
                    rec.update({k: float(f"{v:.6g}") for k, v in diag.items()})
                if reset is not None:
                    rec["reset_info"] = reset
                if self.held is not None and (done % tcfg.eval_every == 0 or done == tcfg.steps):
                    rec.update(self._heldout())
                    self._track_best(done, rec)
                if self.hess_batches is not None and done % self.hessian_every == 0:
                    from .hessian import model_spectrum

                    rec["hessian"] = model_spectrum(self._unwrapped(), self.hess_batches, **self.hess_kw).brief()
                self._log(rec)
                if bar is not None:
                    bar.update(rec)
                if tcfg.save_every and done % tcfg.save_every == 0 and done < tcfg.steps:
                    self.save(done, final=False)
                for cb in callbacks:
                    cb(dict(rec, out=str(self.out)))
            best = self._restore_best()
            if best is not None:
                self.kept = {"step": best, "score": self.best[1],
                             "metric": "eval_kl" if self.teacher is not None else "eval_loss"}
                self.best = None
            self.save(tcfg.steps, final=True)
        except BaseException:
            # a run that never saved leaves nothing behind (its live log included)
            if self.is_main and not saved_any and not is_checkpoint(self.out):
                shutil.rmtree(self.out, ignore_errors=True)
            raise
        finally:
            if bar is not None:
                bar.stop()
            if self.noise is not None:
                self.noise.remove()
        self.accelerator.wait_for_everyone()
        return TrainResult(
            out=self.out,
            step=tcfg.steps,
            final_loss=last_loss,
            seconds=time.time() - self.t_start,
            records=self.records,
        )


def _brief(rec: dict) -> str:
    """The short form of a metrics record for the progress line."""
    info = f"loss {rec['loss']:.4f} lr {rec['lr']:.2e} {rec['tokens_per_s']:.0f} tok/s"
    if "flip_rate" in rec:
        info += f" flip {rec['flip_rate']:.1e} travel {rec['travel']:.2f}"
    if rec.get("reset"):
        info += f" [reset: {rec['reset_info']['trigger']}]"
    if "eval_loss" in rec:
        info += f" eval {rec['eval_loss']:.4f}"
    return info


class Progress:
    """A rich progress bar on a terminal; elsewhere (a log file, CI) a plain line now and then."""

    EVERY, SECONDS = 10, 30.0

    def __init__(self, total: int, start: int, label: str):
        self.total, self.label = total, label
        self.tty = sys.stdout.isatty()
        self.last_print = time.time()
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn(f"[bold]{label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
            )
            self.bar.start()
            self.task = self.bar.add_task("train", total=total, completed=start, info="")

    def update(self, rec: dict) -> None:
        done = rec["step"]
        if self.tty:
            self.bar.update(self.task, completed=done, info=_brief(rec))
            return
        now = time.time()
        if (
            done in (1, self.total)
            or done % self.EVERY == 0
            or rec.get("reset")
            or "eval_loss" in rec
            or now - self.last_print >= self.SECONDS
        ):
            print(f"{self.label} step {done}/{self.total} {_brief(rec)}", flush=True)
            self.last_print = now

    def stop(self) -> None:
        if self.tty:
            self.bar.stop()
