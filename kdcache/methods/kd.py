"""Distilling the Knowledge in a Neural Network (Hinton, Vinyals, Dean; arXiv 1503.02531).

`w_gt * CE_ls(z_s, y) + w_kd * T^2 * KL(p_t || p_s)`. Defaults follow the OFA-KD code (T=1,
weights 1); the mdistiller CIFAR setting (T=4, CE 0.1, KD 0.9) is the preset `kd:mdistiller`.

Labels: int64 (B,) or soft (B, C) targets; only `CE_ls` reads them (soft-target CE for soft labels,
the OFA-KD criterion, distillers/kd.py line 23).
"""

from __future__ import annotations

from dataclasses import dataclass

from kdcache.methods.base import Method, register_method
from kdcache.methods.functional import ce_ls, kl_div
from kdcache.targets import Needs


@register_method
class KD(Method):
    name = "kd"
    NEEDS = Needs(logits=True)
    PRESETS = {"ofa": {}, "mdistiller": {"T": 4.0, "w_gt": 0.1, "w_kd": 0.9}}

    @dataclass
    class Options:
        T: float = 1.0
        w_gt: float = 1.0
        w_kd: float = 1.0
        label_smoothing: float = 0.1

    def forward(self, student, teacher, labels, *, epoch, step, total_epochs):
        o = self.opts
        return {
            "loss_ce": o.w_gt * ce_ls(student.logits, labels, o.label_smoothing),
            "loss_kd": o.w_kd * o.T**2 * kl_div(teacher.logits, student.logits, o.T),
        }
