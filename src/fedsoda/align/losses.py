"""Distillation losses of orchestrated distillation alignment (FedSODA equations 5-8)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def masked_mse(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over real tokens and hidden units: ``[B, T, H]`` with mask ``[B, T]``."""
    weights = mask.to(torch.float32)
    per_token = (teacher.float() - student.float()).pow(2).mean(dim=-1)
    return (per_token * weights).sum() / weights.sum()


def relative_mse(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Squared error relative to the teacher's norm, per real token, then averaged.

    Scale-free: a token whose hidden state carries a massive activation (SmolLM2's first
    token is ~1e3 times the others) weighs as much as any other token, so the loss follows
    the direction and size of every token's state instead of a handful of huge channels.
    """
    weights = mask.to(torch.float32)
    teacher, student = teacher.float(), student.float()
    error = (teacher - student).pow(2).sum(dim=-1)
    per_token = error / teacher.pow(2).sum(dim=-1).clamp_min(1e-6)
    return (per_token * weights).sum() / weights.sum()


REPRESENTATION_LOSSES = {"mse": masked_mse, "relative": relative_mse}


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """``KL(p_teacher || p_student)`` over the last dim, averaged over the rows (real tokens)."""
    teacher_log = F.log_softmax(teacher_logits.float(), dim=-1)
    student_log = F.log_softmax(student_logits.float(), dim=-1)
    return (teacher_log.exp() * (teacher_log - student_log)).sum(dim=-1).mean()


def option_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, rows: torch.Tensor,
              option_ids: list[int]) -> torch.Tensor:
    """``KL(p_teacher || p_student)`` over the options alone, at the logit rows ``rows`` (each
    example's decision position): how differently the two models rank the answers, which the
    vocabulary-wide KL hardly weighs (two tokens of 49k)."""
    choices = torch.tensor(option_ids)
    return kl_divergence(teacher_logits[rows][:, choices], student_logits[rows][:, choices])


def alignment_loss(inter: torch.Tensor, final: torch.Tensor, kl: torch.Tensor,
                   alpha: float, beta: float, options: torch.Tensor | None = None,
                   gamma: float = 0.0) -> torch.Tensor:
    """``alpha * (L_inter + L_final) + beta * L_KL (+ gamma * L_options)``."""
    loss = alpha * (inter + final) + beta * kl
    return loss + gamma * options if options is not None and gamma else loss
