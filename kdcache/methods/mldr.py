"""Multi-Level Decoupled Relational Knowledge Distillation for heterogeneous architectures (MLDR-KD;
arXiv 2502.06189).

Two parts (docs/methods.md, "mldr"):
- DFRA(z, z_t) = L_cls + L_smp + alpha * L_prob on s = z/T, t = z_t/T (teacher detached), with
  scale C^-1/2: the class relation of each sample, R_cls[b] = s_b s_b^T * scale (C x C), and the
  sample relation of each class, R_smp[c] = s[:, c] s[:, c]^T * scale (B x B, the same scale);
  each relation is softmaxed over its rows and L_cls / L_smp are the mean over all rows (B*C and
  C*B) of KL(teacher row || student row); L_prob = KL(p_t || p_s), batch mean, no T^2. The sample
  relation couples the whole batch, so DFRA must see the teacher logits of the same batch.
  Under torchrun (DDP) the sample relations are taken over each rank's own batch (global batch /
  world size), not the global batch.
- MSDF: per stage i, OFA's projector up to the pooled descriptor d_i (CNN students: the SepConv
  stack, width max(D_s, D_t); ViT/MLP/Swin students: the token projector, width D_s), then
  Linear(-> C) stage logits z_i; a gate per stage (B x C), g_i = Linear(h -> C)(GELU(Linear(W -> h)(d_i))),
  h = 4*C (`gate_hidden` overrides); weights = softmax over the stage axis (B x S x C);
  z_fused = sum_i w_i * z_i. One gate MLP is shared by all stages (the authors' code applies the
  same MLP to the stacked descriptors).

Total: `w_gt*CE_ls(z_s, y) + w_logit*DFRA(z_s) + w_stage*sum_i DFRA(z_i) + w_fused*DFRA(z_fused)`,
all weights 1, alpha 2, T 1. Named losses: loss_ce, loss_dfra, loss_dfra_stage{i}, loss_dfra_fused.

As the authors' code (Ethan-Yang02/MLDR-KD, per shared/docs/methods.md; the repository itself was
not readable here): the CNN projector's stage-4 1x1 conv has no bias (`stage4_bias=False` of the
shared projector, OFA's has one), and its optimiser decays every parameter (the training preset
`mldr_cifar_cnn` sets `decay_all=True`). ViT/DeiT students: the class token goes through the
projector's blocks and is the descriptor, as in OFA (methods/projectors.py).

Labels: int64 (B,) or soft (B, C) targets (mixed and smoothed by the trainer). Only the student's
`CE_ls` reads them (soft-target CE for soft labels, the criterion of the OFA-KD framework MLDR-KD is
built on); DFRA and the fusion are label-free, so no argmax is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.errors import KDCacheError
from kdcache.methods.base import Method, register_method
from kdcache.methods.functional import ce_ls, kl_div
from kdcache.methods.projectors import build_stage_projectors, check_pair, check_stages, init_projector_weights
from kdcache.targets import Needs


def class_relation(s: torch.Tensor) -> torch.Tensor:
    """Per sample, the C x C outer product s_b s_b^T scaled by C^-1/2: (B, C, C)."""
    return s[:, :, None] * s[:, None, :] * s.shape[1] ** -0.5


def sample_relation(s: torch.Tensor) -> torch.Tensor:
    """Per class, the B x B outer product s[:, c] s[:, c]^T scaled by C^-1/2: (C, B, B)."""
    sc = s.t()
    return sc[:, :, None] * sc[:, None, :] * s.shape[1] ** -0.5


def row_kl(student_rel: torch.Tensor, teacher_rel: torch.Tensor) -> torch.Tensor:
    """Mean over all rows of KL(softmax(teacher row) || softmax(student row))."""
    log_s = F.log_softmax(student_rel, dim=-1)
    log_t = F.log_softmax(teacher_rel, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean()


def dfra_terms(logits: torch.Tensor, teacher_logits: torch.Tensor,
               T: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_cls, L_smp, L_prob) of DFRA in fp32; the teacher is detached."""
    s = logits.float() / T
    t = teacher_logits.detach().float() / T
    l_cls = row_kl(class_relation(s), class_relation(t))
    l_smp = row_kl(sample_relation(s), sample_relation(t))
    l_prob = kl_div(teacher_logits.detach(), logits, T)
    return l_cls, l_smp, l_prob


def dfra_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 1.0,
              alpha: float = 2.0) -> torch.Tensor:
    """DFRA(z, z_t) = L_cls + L_smp + alpha * L_prob."""
    l_cls, l_smp, l_prob = dfra_terms(logits, teacher_logits, T)
    return l_cls + l_smp + alpha * l_prob


def fuse_stage_logits(stage_logits: torch.Tensor, gate_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MSDF fusion: (B, S, C) stage logits and gates -> (z_fused (B, C), weights softmaxed over S)."""
    w = torch.softmax(gate_logits.float(), dim=1)
    return (w * stage_logits.float()).sum(1), w


@register_method
class MLDR(Method):
    name = "mldr"
    NEEDS = Needs(logits=True, student_stages=True)
    PRESETS = {"paper": {}}

    @dataclass
    class Options:
        stages: tuple[int, ...] = (1, 2, 3, 4)
        T: float = 1.0
        alpha: float = 2.0
        w_gt: float = 1.0
        w_logit: float = 1.0  # DFRA on the student's logits
        w_stage: float = 1.0  # DFRA on each stage's logits
        w_fused: float = 1.0  # DFRA on the fused logits
        gate_hidden: int = 0  # 0: 4 * num_classes
        label_smoothing: float = 0.1

    def __init__(self, opts, student, teacher):
        super().__init__(opts, student, teacher)
        check_stages(self.name, tuple(opts.stages))
        check_pair(self.name, student, teacher)
        if opts.gate_hidden < 0:
            raise KDCacheError(f"mldr gate_hidden={opts.gate_hidden} is negative",
                               expected="0 (4 * classes) or a positive width", fix="--method-opt gate_hidden=0")
        C = student.num_classes
        self.projectors = build_stage_projectors(student, teacher, opts.stages, stage4_bias=False)
        width = {p.out_dim for p in self.projectors.values()}
        if len(width) != 1:  # cannot happen with the shared builders; guards the shared gate
            raise KDCacheError(f"mldr stage descriptors differ in width {sorted(width)}")
        width = width.pop()
        hidden = opts.gate_hidden or 4 * C
        self.heads = nn.ModuleDict({k: nn.Linear(width, C) for k in self.projectors})
        self.gate = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, C))
        init_projector_weights(self.heads)
        init_projector_weights(self.gate)

    def branches(self, stages: list[torch.Tensor], prefix: list[torch.Tensor] | None = None
                 ) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Stage logits {i: z_i}, the fused logits and the fusion weights (B, S, C); `prefix` the
        student's per-stage prefix (class) tokens, if it has any."""
        desc = {s: self.projectors[str(s)](stages[s - 1], None if prefix is None else prefix[s - 1])
                for s in self.opts.stages}
        z = {s: self.heads[str(s)](d) for s, d in desc.items()}
        gates = torch.stack([self.gate(desc[s]) for s in self.opts.stages], 1)
        fused, w = fuse_stage_logits(torch.stack([z[s] for s in self.opts.stages], 1), gates)
        return z, fused, w

    def forward(self, student, teacher, labels, *, epoch, step, total_epochs):
        o = self.opts
        if student.stages is None:
            raise KDCacheError("mldr got no student stage maps", fix="run the student with stages=True")
        z_t = teacher.logits.detach()
        z, fused, _ = self.branches(student.stages, student.prefix)
        losses = {"loss_ce": o.w_gt * ce_ls(student.logits, labels, o.label_smoothing),
                  "loss_dfra": o.w_logit * dfra_loss(student.logits, z_t, o.T, o.alpha)}
        for s, z_i in z.items():
            losses[f"loss_dfra_stage{s}"] = o.w_stage * dfra_loss(z_i, z_t, o.T, o.alpha)
        losses["loss_dfra_fused"] = o.w_fused * dfra_loss(fused, z_t, o.T, o.alpha)
        return losses
