"""The distillation teacher: the float model the student is trained to imitate (TrainConfig.distill).

By default the teacher is the student's own base model before quantization (a copy taken before
prepare()), so training minimises KL(float || quantized) per token, the gap every runtime's
quantization is measured by. A separate teacher (a local Hugging Face folder) must speak the same
vocabulary: the KL is taken over the same next-token ids, so its tokenizer vocabulary and its output
width must equal the student's.

Cost (measured on the default model, see docs/quality.md): one teacher forward without gradients per
micro-batch, and the teacher's float32 weights in memory.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .errors import ConfigError, ModelError


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def fits_in_memory(model: nn.Module, headroom: float = 2.0) -> bool:
    """Is there room for another copy of `model` (headroom x its parameter bytes of available memory)?"""
    try:
        import psutil

        return psutil.virtual_memory().available > headroom * _param_bytes(model)
    except Exception:  # no psutil / no /proc: assume it fits, the load itself will fail clearly if not
        return True


def check_teacher(teacher: nn.Module, teacher_tok, student: nn.Module, student_tok, where: str) -> None:
    """ConfigError when `teacher` cannot teach `student`: another vocabulary or another output width."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        only = sorted(set(tv) ^ set(sv))[:3]
        raise ConfigError(
            f"teacher {where} has another vocabulary than the student ({len(tv)} vs {len(sv)} tokens; e.g. "
            f"{only or 'the same tokens with other ids'}): distillation compares next-token distributions over "
            "the same ids; use a teacher with the student's tokenizer, or --distill 0"
        )
    t_out, s_out = teacher.get_output_embeddings(), student.get_output_embeddings()
    tw = getattr(t_out, "out_features", None) or t_out.weight.shape[0]
    sw = getattr(s_out, "out_features", None) or s_out.weight.shape[0]
    if tw != sw:
        raise ConfigError(
            f"teacher {where} predicts {tw} logits, the student {sw}: their architectures do not match; use a "
            "teacher with the student's vocabulary and head, or --distill 0"
        )


def make_teacher(student: nn.Module, student_tok, path: str | None, device) -> nn.Module:
    """The frozen, eval-mode teacher: a copy of the (not yet prepared) student, or the model at `path`."""
    if path is None:
        teacher = copy.deepcopy(student)
    else:
        from .models import load_base_model

        try:
            teacher, tok, _ = load_base_model(path)
        except ModelError as e:
            raise ConfigError(f"teacher: {e}") from None
        check_teacher(teacher, tok, student, student_tok, path)
    teacher.requires_grad_(False)
    teacher.eval()
    if hasattr(teacher.config, "use_cache"):
        teacher.config.use_cache = False
    return teacher.to(device)


@torch.no_grad()
def heldout_scores(model, teacher, blocks, n_blocks: int, batch_size: int, device) -> tuple[float, float]:
    """(mean next-token cross-entropy, mean per-token KL(teacher || model)) over n_blocks held-out blocks spread
    over the stream (PackedBlocks.spread, as train.heldout_loss), from one forward of the model per batch: the
    periodic evaluation of a distilled run."""
    import torch.nn.functional as F

    was = model.training
    model.eval()
    ce = kl = 0.0
    count = 0
    idx = blocks.spread(n_blocks)
    for s in range(0, len(idx), batch_size):
        b = blocks.batch(idx[s : s + batch_size]).to(device)
        x = b[:, :-1]
        logits = model(input_ids=x).logits.float()
        logp = F.log_softmax(logits.reshape(-1, logits.shape[-1]), -1)
        t_logp = F.log_softmax(teacher(input_ids=x).logits.float().reshape(-1, logits.shape[-1]), -1)
        ce += float(F.nll_loss(logp, b[:, 1:].reshape(-1), reduction="sum"))
        kl += float(F.kl_div(logp, t_logp, log_target=True, reduction="sum"))
        count += x.numel()
    model.train(was)
    return ce / count, kl / count
