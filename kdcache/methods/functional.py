"""Loss pieces several methods share (and `resize_to`, the map resize they use). Softmax and
log-softmax are always taken in fp32.

Labels come in two forms, and every method accepts both (`Method.forward`):
- hard: int64 (B,) class indices (no mixup; `ce_ls` smooths them with the method's
  `label_smoothing`);
- soft: float (B, C) targets the trainer already mixed (mixup/cutmix, per-view lambda) and smoothed
  as timm's `Mixup(label_smoothing=...)` does; `ce_ls` then is timm's `SoftTargetCrossEntropy` and
  adds no smoothing of its own.
Where a method needs one class per sample (OFA's target mask, DKD's gt mask, HCD's ground-truth
column), it takes `hard_labels(labels)`, the argmax of soft targets, as the OFA-KD code does
(Hao840/OFAKD distillers/ofa.py lines 116-119, distillers/dkd.py lines 22-25).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcache.errors import KDCacheError


def is_soft(labels: torch.Tensor) -> bool:
    """True for (B, C) soft targets, False for (B,) class indices."""
    return labels.dim() == 2


def _check_labels(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if labels.dim() == 1 and not labels.is_floating_point() and labels.shape[0] == logits.shape[0]:
        return
    if labels.dim() == 2 and labels.is_floating_point() and labels.shape == logits.shape:
        return
    raise KDCacheError(f"labels of shape {tuple(labels.shape)} and dtype {labels.dtype} do not fit logits "
                       f"{tuple(logits.shape)}",
                       expected="int64 class indices (B,) or float soft targets (B, C) of the logits' shape")


def hard_labels(labels: torch.Tensor) -> torch.Tensor:
    """One class per sample: `labels.argmax(-1)` for (B, C) soft targets (OFAKD's `label.argmax(-1)`),
    the labels themselves for (B,) class indices."""
    return labels.argmax(-1) if is_soft(labels) else labels


def ce_ls(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """CE_ls of docs/methods.md, the criterion of the OFA-KD code (its train.py lines 509-525).

    Class indices (B,): cross-entropy with label smoothing `smoothing` (timm's
    `LabelSmoothingCrossEntropy`, equal to torch's `label_smoothing`). Soft targets (B, C): timm's
    `SoftTargetCrossEntropy`, `-(labels * log_softmax(logits)).sum(1).mean()`; `smoothing` is ignored,
    the targets already carry it. fp32 either way."""
    _check_labels(logits, labels)
    if is_soft(labels):
        return -(labels.float() * F.log_softmax(logits.float(), dim=1)).sum(1).mean()
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
    probabilities. The teacher side is a constant (detached); softmax in fp32. With soft (mixed,
    smoothed) labels `y` is their argmax, `hard_labels(labels)`, as in the authors' code
    (Hao840/OFAKD distillers/ofa.py lines 116-117: `F.one_hot(label.argmax(-1), num_classes)`).
    """
    _check_labels(logits, labels)
    log_p = F.log_softmax(logits.float() / T, dim=1)
    p_t = F.softmax(teacher_logits.detach().float() / T, dim=1)
    m = F.one_hot(hard_labels(labels), num_classes=log_p.shape[1]).to(log_p.dtype)
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
