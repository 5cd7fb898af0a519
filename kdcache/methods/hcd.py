"""HCD: heterogeneous complementary distillation (arXiv 2511.10942, AAAI 2026).

Per stage i (docs/methods.md, "hcd"): OFA's projector up to the pooled vector h_i (CNN students: the
SepConv stack, width W = max(D_s, D_t); ViT/MLP/Swin students: the token projector, width D_s, whose
descriptor is the class token for ViT/DeiT students, as in OFA);
a Complementary Feature Mapper on [h_i ; f_t] (teacher embedding, a constant) gives u_i (B, k*C),
reshaped to k sub-logits (B, k, C) and fused with the teacher logits, z_ij = u_ij + z_t. Per stage:
- CE_i = mean_j CE_ls(z_ij, y);
- KL_i = mean_j T^2 * KL(softmax(z_ij/T) || softmax(z_s/T)): the fused sub-logits are the target,
  the student's final logits the prediction;
- OL_i: the ground-truth column of the fused sub-logits zeroed, each of the k vectors L2-normalised,
  the k(k-1) off-diagonal pairwise cosines, OL_i = mean(ReLU(cos - 0.5)^2) over samples and pairs.
Total: `w_gt*(CE_ls(z_s, y) + S_i CE_i) + w_kd*T^2*KL(p_t || p_s) + w_hcd*S_i KL_i + w_div*S_i OL_i`,
k=4, w_gt=1, w_kd=1, w_hcd=6, w_div=1, T=1.

[decide] choices (the paper leaves these open; first option is the default):
- mapper_layers=2: u_i = Linear(D_t -> k*C)(ReLU(Linear(W + D_t -> D_t)([h_i ; f_t]))); option
  mapper_layers=1: u_i = Linear(W + D_t -> k*C)([h_i ; f_t]).
- detach_target=False: KL_i's target (the fused sub-logits) is not detached, so KL_i also trains the
  projector and mapper; option detach_target=True stops that gradient (they then learn only from
  CE_i and OL_i).
- stage_reduce="sum": S_i is a sum over the stages; option "mean".
Named losses: loss_ce, loss_kd, and per stage loss_ce_stage{i}, loss_hcd_stage{i}, loss_div_stage{i}
(each already weighted and, with stage_reduce=mean, divided by the number of stages).

Labels: int64 (B,) or soft (B, C) targets (mixed and smoothed by the trainer). Both CE terms, the
student's and every sub-logit's CE_i, use `CE_ls` as given (soft-target CE for soft labels, each
sub-logit against its sample's soft target): they are the criterion the OFA-KD framework HCD
reports against applies to every logit it supervises. [decide] The orthogonality loss zeroes one
ground-truth column per sample, `hard_labels(labels)` (the argmax), as OFA-KD takes the argmax for
its target mask (Hao840/OFAKD distillers/ofa.py lines 116-117); HCD's code was not available.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.errors import KDCacheError
from kdcache.methods.base import Method, register_method
from kdcache.methods.functional import ce_ls, hard_labels, kl_div
from kdcache.methods.projectors import (build_stage_projectors, check_pair, check_stages, init_projector_weights,
                                        stage_prefix)
from kdcache.targets import Needs

STAGE_REDUCES = ("sum", "mean")


def fuse_sub_logits(u: torch.Tensor, teacher_logits: torch.Tensor, k: int) -> torch.Tensor:
    """Sub-logit decoupling: u (B, k*C) -> (B, k, C), plus the (constant) teacher logits."""
    B, C = teacher_logits.shape
    return u.float().reshape(B, k, C) + teacher_logits.detach().float()[:, None, :]


def sub_logit_ce(fused: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """CE_i = mean over the k sub-logits of CE_ls(z_ij, y); y class indices (B,) or soft targets (B, C)."""
    B, k, C = fused.shape
    return ce_ls(fused.reshape(B * k, C), labels.repeat_interleave(k, dim=0), smoothing)


def sub_logit_kl(fused: torch.Tensor, student_logits: torch.Tensor, T: float = 1.0,
                 detach_target: bool = False) -> torch.Tensor:
    """KL_i = mean_j T^2 * KL(softmax(z_ij/T) || softmax(z_s/T)) (batch mean)."""
    B, k, C = fused.shape
    target = fused.detach() if detach_target else fused
    z_s = student_logits.float()[:, None, :].expand(B, k, C).reshape(B * k, C)
    return T**2 * kl_div(target.reshape(B * k, C), z_s, T)


def orthogonality_loss(fused: torch.Tensor, labels: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """OL_i: GT column zeroed, rows L2-normalised, mean over samples and the k(k-1) off-diagonal
    pairs of ReLU(cos - margin)^2. The ground truth of soft labels is their argmax."""
    B, k, C = fused.shape
    keep = 1.0 - F.one_hot(hard_labels(labels), C).to(fused.dtype)[:, None, :]
    v = F.normalize(fused * keep, dim=-1)
    cos = v @ v.transpose(1, 2)  # (B, k, k)
    off = ~torch.eye(k, dtype=torch.bool, device=fused.device)
    return F.relu(cos[:, off] - margin).pow(2).mean()


class ComplementaryMapper(nn.Module):
    """[h_i ; f_t] -> u_i (B, k*C): two layers (Linear, ReLU, Linear through width D_t) or one."""

    def __init__(self, width: int, teacher_dim: int, num_classes: int, k: int, layers: int = 2):
        super().__init__()
        if layers == 2:
            self.net = nn.Sequential(nn.Linear(width + teacher_dim, teacher_dim), nn.ReLU(),
                                     nn.Linear(teacher_dim, k * num_classes))
        elif layers == 1:
            self.net = nn.Sequential(nn.Linear(width + teacher_dim, k * num_classes))
        else:
            raise KDCacheError(f"hcd mapper_layers={layers} is not supported", expected="2 (default) or 1",
                               fix="--method-opt mapper_layers=2")
        init_projector_weights(self)

    def forward(self, h: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([h, f_t.detach().to(h.dtype)], dim=1))


@register_method
class HCD(Method):
    name = "hcd"
    NEEDS = Needs(logits=True, embed=True, student_stages=True)
    PRESETS = {"paper": {}}

    @dataclass
    class Options:
        stages: tuple[int, ...] = (1, 2, 3, 4)
        k: int = 4  # sub-logits per stage
        T: float = 1.0
        w_gt: float = 1.0
        w_kd: float = 1.0
        w_hcd: float = 6.0
        w_div: float = 1.0
        margin: float = 0.5  # cosine threshold of the orthogonality loss
        mapper_layers: int = 2  # [decide] 2 (default) or 1
        detach_target: bool = False  # [decide] KL_i's target not detached (default) or detached
        stage_reduce: str = "sum"  # [decide] "sum" (default) or "mean" over stages
        label_smoothing: float = 0.1

    def __init__(self, opts, student, teacher):
        super().__init__(opts, student, teacher)
        check_stages(self.name, tuple(opts.stages))
        check_pair(self.name, student, teacher)
        if opts.stage_reduce not in STAGE_REDUCES:
            raise KDCacheError(f"hcd stage_reduce {opts.stage_reduce!r} is unknown",
                               expected=" or ".join(STAGE_REDUCES), fix="--method-opt stage_reduce=sum")
        if opts.k < 2:
            raise KDCacheError(f"hcd k={opts.k} gives no pairs for the orthogonality loss",
                               expected="k >= 2 (paper: 4)", fix="--method-opt k=4")
        self.projectors = build_stage_projectors(student, teacher, opts.stages)
        self.mappers = nn.ModuleDict({
            key: ComplementaryMapper(p.out_dim, teacher.embed_dim, student.num_classes, opts.k, opts.mapper_layers)
            for key, p in self.projectors.items()})

    def fused_sub_logits(self, stage: int, feature: torch.Tensor, f_t: torch.Tensor,
                         z_t: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """(B, k, C) fused sub-logits z_ij of one stage; `prefix` the stage's class token(s), if any."""
        h = self.projectors[str(stage)](feature, prefix)
        return fuse_sub_logits(self.mappers[str(stage)](h, f_t), z_t, self.opts.k)

    def forward(self, student, teacher, labels, *, epoch, step, total_epochs):
        o = self.opts
        if student.stages is None:
            raise KDCacheError("hcd got no student stage maps", fix="run the student with stages=True")
        if teacher.embed is None:
            raise KDCacheError("hcd needs the teacher's pooled embedding f_t, the batch has none",
                               fix="re-extract the teacher with --methods hcd")
        z_t, f_t = teacher.logits.detach(), teacher.embed.detach()
        r = 1.0 / len(o.stages) if o.stage_reduce == "mean" else 1.0
        losses = {"loss_ce": o.w_gt * ce_ls(student.logits, labels, o.label_smoothing),
                  "loss_kd": o.w_kd * o.T**2 * kl_div(z_t, student.logits, o.T)}
        for s in o.stages:
            fused = self.fused_sub_logits(s, student.stages[s - 1], f_t, z_t, stage_prefix(student, s))
            losses[f"loss_ce_stage{s}"] = r * o.w_gt * sub_logit_ce(fused, labels, o.label_smoothing)
            losses[f"loss_hcd_stage{s}"] = r * o.w_hcd * sub_logit_kl(fused, student.logits, o.T, o.detach_target)
            losses[f"loss_div_stage{s}"] = r * o.w_div * orthogonality_loss(fused, labels, o.margin)
        return losses
