"""Loss pieces several methods share. Softmax and log-softmax are always taken in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ce_ls(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """Cross-entropy with label smoothing (CE_ls of methods.md)."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)


def kl_div(teacher_logits: torch.Tensor, student_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """KL(p_t || p_s) with temperature T, summed over classes, mean over the batch (no T^2)."""
    log_p_s = F.log_softmax(student_logits.float() / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / T, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()
