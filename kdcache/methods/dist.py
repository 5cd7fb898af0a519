"""Knowledge Distillation from A Stronger Teacher (DIST; Huang, You, Wang, Qian, Xu; arXiv 2205.10536).

DIST matches relations instead of exact probabilities: Pearson correlation (a cosine of centred
vectors, invariant to positive affine maps) between student and teacher predictions
`p = softmax(z / T)`,

- inter-class: per sample, across classes (rows of the B x C matrix);
- intra-class: per class, across the batch (columns), so it needs the whole batch's teacher logits;

`w_gt * CE_ls(z_s, y) + beta * T^2 * (1 - mean_i pearson(p_s[i,:], p_t[i,:]))
                      + gamma * T^2 * (1 - mean_c pearson(p_s[:,c], p_t[:,c]))`.

Defaults beta = gamma = T = 1, weights 1 (the paper's ImageNet setting, as in the OFA-KD code).
With a batch of one the intra term is a constant 1 (a centred single value is zero): no gradient.
Under torchrun (DDP) the intra-class correlations are taken over each rank's own batch (global
batch / world size), not the global batch; the inter-class term is per sample and unaffected.

Labels: int64 (B,) or soft (B, C) targets; only `CE_ls` reads them (soft-target CE for soft labels,
as the OFA-KD criterion, distillers/dist.py line 21). Both relation terms, the intra-class one
included, are label-free (per class across the batch, not per ground-truth class), so no argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdcache.methods.base import Method, register_method
from kdcache.methods.functional import ce_ls
from kdcache.targets import Needs

EPS = 1e-8


def pearson(a: torch.Tensor, b: torch.Tensor, dim: int = 1, eps: float = EPS) -> torch.Tensor:
    """Pearson correlation of a and b along `dim` (one value per slice along the other dim)."""
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)


def inter_class_relation(p_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """1 - mean over samples of the correlation of the two class distributions (rows)."""
    return 1.0 - pearson(p_s, p_t, dim=1).mean()


def intra_class_relation(p_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """1 - mean over classes of the correlation of the two batch columns."""
    return 1.0 - pearson(p_s, p_t, dim=0).mean()


def dist_relations(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   T: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(inter, intra) relation losses on softmax(z / T) in fp32; no T^2."""
    p_s = torch.softmax(student_logits.float() / T, dim=1)
    p_t = torch.softmax(teacher_logits.float() / T, dim=1)
    return inter_class_relation(p_s, p_t), intra_class_relation(p_s, p_t)


@register_method
class DIST(Method):
    name = "dist"
    NEEDS = Needs(logits=True)
    PRESETS = {"ofa": {}}

    @dataclass
    class Options:
        beta: float = 1.0  # inter-class weight
        gamma: float = 1.0  # intra-class weight
        T: float = 1.0  # the paper's tau
        w_gt: float = 1.0
        label_smoothing: float = 0.1

    def forward(self, student, teacher, labels, *, epoch, step, total_epochs):
        o = self.opts
        inter, intra = dist_relations(student.logits, teacher.logits.detach(), o.T)
        return {
            "loss_ce": o.w_gt * ce_ls(student.logits, labels, o.label_smoothing),
            "loss_inter": o.beta * o.T**2 * inter,
            "loss_intra": o.gamma * o.T**2 * intra,
        }
