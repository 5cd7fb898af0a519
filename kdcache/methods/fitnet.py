"""FitNets: Hints for Thin Deep Nets (Romero, Ballas, Kahou, Chassang, Gatta, Bengio; arXiv 1412.6550).

A feature-hint baseline on the teacher's cached stage maps. For each chosen stage i a regressor
(1x1 conv, student stage-i width -> teacher stage-i width) maps the student's stage-i output onto
the grid of the cached teacher map, and the hint loss is their mean squared error:

`w_gt * CE_ls(z_s, y) + w_hint * sum_i MSE(r_i(F_s^i), F_t^i) [+ w_kd * T^2 * KL(p_t || p_s)]`.

- Grid: the cache may hold teacher maps pooled to a coarser grid, so the target grid is read from
  the cached tensor itself at each step (channels from `TeacherInfo.stage_shapes`). `resize="pool"`
  (default) averages the student map onto that grid (adaptive average pooling) when the grid is no
  larger in both sides, and interpolates bilinearly otherwise; `resize="bilinear"` always
  interpolates. Both resizes are linear with weights summing to one per output cell, so resizing
  before the 1x1 conv (done here: cheaper) equals the conv followed by the resize.
- Token models (ViT/DeiT/Mixer/ResMLP) already give NCHW grids, so every pair works.
- Defaults follow the OFA-KD code's FitNet (plain 1x1 conv, MSE with mean reduction, weight 1,
  CE weight 1) on stage 3 only; its default stages 1-4 are the preset `fitnet:ofa`. mdistiller's
  CIFAR setting (hint on stage 2, weight 100; its regressor adds BN + ReLU) is `fitnet:mdistiller`.
- Optional logit KD (`w_kd > 0`) also reads the teacher's logits.
- Labels: int64 (B,) or soft (B, C) targets; only `CE_ls` reads them (soft-target CE for soft
  labels, the OFA-KD criterion, distillers/fitnet.py line 51).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.errors import KDCacheError
from kdcache.methods.base import Method, register_method
from kdcache.methods.functional import ce_ls, kl_div, resize_to
from kdcache.targets import Needs

RESIZES = ("pool", "bilinear")


def hint_loss(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the regressed student map and the teacher map, in fp32."""
    return F.mse_loss(student_map.float(), teacher_map.float())


@register_method
class FitNet(Method):
    name = "fitnet"
    PRESETS = {"ofa": {"stages": (1, 2, 3, 4)}, "mdistiller": {"stages": (2,), "w_hint": 100.0}}

    @dataclass
    class Options:
        stages: tuple[int, ...] = (3,)  # 1-based stages that get a hint
        w_hint: float = 1.0  # weight of each stage's MSE
        w_gt: float = 1.0
        w_kd: float = 0.0  # optional logit KD on top
        T: float = 1.0
        resize: str = "pool"  # "pool" (average down, bilinear up) or "bilinear"
        label_smoothing: float = 0.1

    @classmethod
    def needs(cls, opts, teacher_family=None, student_family=None) -> Needs:
        return Needs(logits=opts.w_kd > 0, stages=tuple(opts.stages), student_stages=True)

    def __init__(self, opts, student, teacher):
        super().__init__(opts, student, teacher)
        bad = [s for s in opts.stages if s not in (1, 2, 3, 4)]
        if bad or not opts.stages or len(set(opts.stages)) != len(opts.stages):
            raise KDCacheError(f"fitnet stages {opts.stages!r} are not distinct stage numbers 1..4",
                               expected="e.g. stages=(3,) or stages=(1,2,3,4)", fix="--method-opt stages=3")
        if opts.resize not in RESIZES:
            raise KDCacheError(f"fitnet resize {opts.resize!r} is unknown", expected=" or ".join(RESIZES),
                               fix="--method-opt resize=pool")
        missing = [who for who, info in (("student", student), ("teacher", teacher))
                   if info is None or len(info.stage_shapes) < 4]
        if missing:
            raise KDCacheError(f"fitnet needs the four stage shapes of the {' and '.join(missing)}",
                               expected="stage_shapes with 4 (C, H, W) entries (measured by a dummy forward)",
                               fix="re-extract the teacher with --methods fitnet")
        self.regressors = nn.ModuleDict()
        for s in opts.stages:
            conv = nn.Conv2d(student.stage_shapes[s - 1][0], teacher.stage_shapes[s - 1][0], kernel_size=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            self.regressors[str(s)] = conv

    def regress(self, stage: int, student_map: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The student's stage map mapped onto the teacher's width and cached grid."""
        return self.regressors[str(stage)](resize_to(student_map, grid, self.opts.resize))

    def forward(self, student, teacher, labels, *, epoch, step, total_epochs):
        o = self.opts
        if student.stages is None:
            raise KDCacheError("fitnet got no student stage maps", fix="run the student with stages=True")
        losses = {"loss_ce": o.w_gt * ce_ls(student.logits, labels, o.label_smoothing)}
        for s in o.stages:
            if s not in teacher.stages:
                raise KDCacheError(f"fitnet needs the teacher's stage-{s} map, the batch has "
                                   f"{sorted(teacher.stages) or 'none'}", fix="re-extract with --methods fitnet")
            target = teacher.stages[s].detach()
            pred = self.regress(s, student.stages[s - 1], tuple(target.shape[-2:]))
            if pred.shape != target.shape:
                raise KDCacheError(f"fitnet stage {s}: regressed student map {tuple(pred.shape)} does not match "
                                   f"the cached teacher map {tuple(target.shape)}",
                                   expected="the channels recorded in the teacher's stage_shapes")
            losses[f"loss_hint_stage{s}"] = o.w_hint * hint_loss(pred, target)
        if o.w_kd > 0:
            losses["loss_kd"] = o.w_kd * o.T**2 * kl_div(teacher.logits.detach(), student.logits, o.T)
        return losses
