"""Loss pieces several methods share (and `resize_to`, the map resize they use). Softmax and
log-softmax are always taken in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ce_ls(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """Cross-entropy with label smoothing (CE_ls of docs/methods.md)."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)


def kl_div(teacher_logits: torch.Tensor, student_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """KL(p_t || p_s) with temperature T, summed over classes, mean over the batch (no T^2)."""
    log_p_s = F.log_softmax(student_logits.float() / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / T, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()


def ofa_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             eps: float = 1.0, T: float = 1.0) -> torch.Tensor:
    """The OFA loss (One-for-All, arXiv 2310.19444), shared by ofa and fbt:
    `mean_b(-sum_c [(p_t + m)^eps - m]_c * log_softmax(z/T)_c)`.

    `m = onehot(y)`, `p_t = softmax(z_t/T)`; no T^2 factor. eps=1 is soft-label CE with the teacher's
    probabilities. The teacher side is a constant (detached); softmax in fp32.
    """
    log_p = F.log_softmax(logits.float() / T, dim=1)
    p_t = F.softmax(teacher_logits.detach().float() / T, dim=1)
    m = F.one_hot(labels, num_classes=log_p.shape[1]).to(log_p.dtype)
    target = (p_t + m).pow(eps) - m
    return -(target * log_p).sum(1).mean()


def resize_to(x: torch.Tensor, size: tuple[int, int], mode: str = "pool") -> torch.Tensor:
    """Resize an NCHW map to `size` (H, W): adaptive average pooling when shrinking (mode "pool"),
    bilinear interpolation otherwise or always (mode "bilinear"). Used by fitnet and fbt."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "pool" and x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
