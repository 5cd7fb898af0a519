"""One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge Distillation
(Hao, Guo, Han, Wang, Chen, Xu, Xu, Wang; arXiv 2310.19444, NeurIPS 2023).

`w_gt * CE_ls(z_s, y) + w_kd * ofa(z_s, z_t; eps) + w_ofa * sum_{i in stages} ofa(P_i(F_s^i), z_t; eps_i)`
with `ofa(z, z_t) = mean_b(-sum_c [(p_t + m)^eps - m]_c * log_softmax(z/T)_c)`, `m = onehot(y)`, no T^2
(the authors' code; `kdcache.methods.functional.ofa_loss`, shared with fbt). `P_i` is OFA's stage
projector (kdcache.methods.projectors: SepConv stack for CNN students, patch merging + transformer
blocks for ViT/MLP/Swin students) followed by Linear(out_dim, C); the heads are discarded after
training.

Options: `eps` is the last (logit) branch's eps; `stage_eps` gives one eps per entry of `stages`
(empty: every stage uses `eps`). Presets: `cifar` (eps 1, weights 1: Swin-T -> ResNet18 on CIFAR),
`authors_cifar` (w_ofa 0.1, the authors' own CIFAR runs), `imagenet` (eps 1.5).

Labels: int64 (B,) or soft (B, C) targets (mixed and smoothed by the trainer). As the authors' code
(Hao840/OFAKD distillers/ofa.py): `loss_ce` is the criterion on the labels as given (line 132;
soft-target CE for soft labels, `ce_ls`), and the target mask m of every OFA term is
`onehot(label.argmax(-1))` for soft labels (lines 116-119; `ofa_loss` takes `hard_labels`).

ViT/DeiT students (prefix tokens): the class token tapped with each stage (`ModelOutputs.prefix`)
skips the patch merging, goes through the projector's transformer blocks with the merged patch
tokens, and is the stage descriptor (distillers/ofa.py lines 91-103, `TokenFnContext` and
`TokenFilter(remove_mode=False)`); students without prefix tokens use the token mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kdcache.errors import KDCacheError
from kdcache.methods.base import Method, register_method
from kdcache.methods.functional import ce_ls, ofa_loss
from kdcache.methods.projectors import (build_stage_projectors, check_pair, check_stages, init_projector_weights,
                                        stage_prefix)
from kdcache.targets import Needs


@register_method
class OFA(Method):
    name = "ofa"
    NEEDS = Needs(logits=True, student_stages=True)
    PRESETS = {"cifar": {"eps": 1.0, "w_gt": 1.0, "w_kd": 1.0, "w_ofa": 1.0},
               "authors_cifar": {"w_ofa": 0.1},
               "imagenet": {"eps": 1.5}}

    @dataclass
    class Options:
        stages: tuple[int, ...] = (1, 2, 3, 4)
        T: float = 1.0
        w_gt: float = 1.0
        w_kd: float = 1.0
        w_ofa: float = 1.0
        eps: float = 1.0  # the logit (last) branch
        stage_eps: tuple[float, ...] = ()  # one per stage in `stages`; empty: all equal to eps
        label_smoothing: float = 0.1

    def __init__(self, opts, student, teacher):
        super().__init__(opts, student, teacher)
        check_stages(self.name, tuple(opts.stages))
        check_pair(self.name, student, teacher)
        if opts.stage_eps and len(opts.stage_eps) != len(opts.stages):
            raise KDCacheError(f"ofa stage_eps {opts.stage_eps!r} has {len(opts.stage_eps)} values for "
                               f"{len(opts.stages)} stages {opts.stages!r}",
                               expected="one eps per stage, or none (all equal to eps)",
                               fix="--method-opt stage_eps=1,1,1,1")
        self.projectors = build_stage_projectors(student, teacher, opts.stages)
        self.heads = nn.ModuleDict({k: nn.Linear(p.out_dim, student.num_classes) for k, p in self.projectors.items()})
        init_projector_weights(self.heads)

    def stage_eps(self) -> dict[int, float]:
        o = self.opts
        return dict(zip(o.stages, o.stage_eps or [o.eps] * len(o.stages)))

    def stage_logits(self, stage: int, feature: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """The stage-`stage` branch's logits H_i(P_i(F_s^i)); `prefix` the stage's class token(s), if any."""
        return self.heads[str(stage)](self.projectors[str(stage)](feature, prefix))

    def forward(self, student, teacher, labels, *, epoch, step, total_epochs):
        o = self.opts
        if student.stages is None:
            raise KDCacheError("ofa got no student stage maps", fix="run the student with stages=True")
        z_t = teacher.logits.detach()
        losses = {"loss_ce": o.w_gt * ce_ls(student.logits, labels, o.label_smoothing),
                  "loss_kd": o.w_kd * ofa_loss(student.logits, z_t, labels, o.eps, o.T)}
        for s, e in self.stage_eps().items():
            z_i = self.stage_logits(s, student.stages[s - 1], stage_prefix(student, s))
            losses[f"loss_ofa_stage{s}"] = o.w_ofa * ofa_loss(z_i, z_t, labels, e, o.T)
        return losses
