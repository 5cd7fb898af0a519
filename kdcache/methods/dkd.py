"""Decoupled Knowledge Distillation (Zhao, Cui, Song, Qiu, Liang; arXiv 2203.08679).

KD's KL splits into a target-class part and a non-target part,
`KL(p_t || p_s) = TCKD + (1 - p_t[y]) * NCKD`; DKD drops the coupling factor and weighs the two
freely: `w_gt * CE_ls(z_s, y) + warm * T^2 * (alpha * TCKD + beta * NCKD)`.

- TCKD: KL between the binary distributions (p[y], 1 - p[y]) of teacher and student. Computed from
  log-sum-exps (log p[y] and log of the non-target mass) rather than log of summed probabilities,
  so it stays finite when the student is very confident.
- NCKD: KL over the non-target classes; the target logit is masked by subtracting 1000 from
  `z / T` before the (log-)softmax, which leaves the renormalised non-target distribution.

Defaults follow the OFA-KD code (alpha=1, beta=2, T=1; its own DKD cannot run as shipped). The
mdistiller CIFAR setting (beta=8, T=4, warm-up over 20 epochs) is the preset `dkd:mdistiller`.

Warm-up: `warm = min((epoch + 1) / warmup_epochs, 1)` with the trainer's 0-based `epoch`, i.e.
mdistiller's `min(epoch / warmup, 1)` with its 1-based epochs: the first epoch already trains with
1/warmup of the KD part, and epoch index `warmup_epochs - 1` onwards with all of it.
`warmup_epochs=0` (default) means no warm-up. CE is never scaled.

Labels: int64 (B,) or soft (B, C) targets (mixed and smoothed by the trainer). `CE_ls` takes them
as they are (soft-target CE for soft labels, the OFA-KD criterion; distillers/dkd.py line 27); the
target masks of TCKD and NCKD use `hard_labels(labels)`, the argmax, as the OFA-KD code does
(distillers/dkd.py lines 22-25: `target = label.max(1)[1]` for 2-D labels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdcache.methods.base import Method, register_method
from kdcache.methods.functional import ce_ls, hard_labels
from kdcache.targets import Needs

MASK = 1000.0  # subtracted from the scaled target logit before the NCKD softmax


def target_mask(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Boolean (B, C) mask, True at each row's target class (the argmax of soft labels)."""
    return F.one_hot(hard_labels(labels).long(), logits.shape[1]).bool()


def binary_log_probs(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, 2) log-probabilities of (target, non-target) under softmax(logits), in fp32."""
    z = logits.float()
    log_total = torch.logsumexp(z, dim=1)
    log_target = (z * mask).sum(1) - log_total
    log_other = torch.logsumexp(z.masked_fill(mask, float("-inf")), dim=1) - log_total
    return torch.stack([log_target, log_other], dim=1)


def tckd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              T: float = 1.0) -> torch.Tensor:
    """Target-class KD: KL(b_t || b_s) of the binary (target, rest) distributions; batch mean, no T^2."""
    mask = target_mask(student_logits, labels)
    log_b_s = binary_log_probs(student_logits.float() / T, mask)
    log_b_t = binary_log_probs(teacher_logits.float() / T, mask)
    return (log_b_t.exp() * (log_b_t - log_b_s)).sum(1).mean()


def nckd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              T: float = 1.0) -> torch.Tensor:
    """Non-target-class KD: KL over the classes other than y (target logit minus 1000); batch mean, no T^2."""
    shift = MASK * target_mask(student_logits, labels).float()
    log_q_s = F.log_softmax(student_logits.float() / T - shift, dim=1)
    log_q_t = F.log_softmax(teacher_logits.float() / T - shift, dim=1)
    return (log_q_t.exp() * (log_q_t - log_q_s)).sum(1).mean()


def warmup_factor(epoch: int, warmup_epochs: float) -> float:
    """min((epoch + 1) / warmup_epochs, 1) for a 0-based epoch; 1 when there is no warm-up."""
    if warmup_epochs <= 0:
        return 1.0
    return min((epoch + 1) / warmup_epochs, 1.0)


@register_method
class DKD(Method):
    name = "dkd"
    NEEDS = Needs(logits=True)
    PRESETS = {"ofa": {}, "mdistiller": {"beta": 8.0, "T": 4.0, "warmup_epochs": 20.0}}

    @dataclass
    class Options:
        alpha: float = 1.0  # TCKD weight
        beta: float = 2.0  # NCKD weight
        T: float = 1.0
        w_gt: float = 1.0
        warmup_epochs: float = 0.0  # linear warm-up of the KD terms; 0 = none
        label_smoothing: float = 0.1

    def forward(self, student, teacher, labels, *, epoch, step, total_epochs):
        o = self.opts
        z_s, z_t = student.logits, teacher.logits.detach()
        scale = warmup_factor(epoch, o.warmup_epochs) * o.T**2
        return {
            "loss_ce": o.w_gt * ce_ls(z_s, labels, o.label_smoothing),
            "loss_tckd": scale * o.alpha * tckd_loss(z_s, z_t, labels, o.T),
            "loss_nckd": scale * o.beta * nckd_loss(z_s, z_t, labels, o.T),
        }
