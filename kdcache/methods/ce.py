"""Plain cross-entropy with label smoothing: the no-teacher baseline (and teacher training).

Labels: int64 (B,) class indices, smoothed with `label_smoothing`, or soft (B, C) targets the
trainer already mixed and smoothed: then soft-target CE without further smoothing (timm's
`SoftTargetCrossEntropy`, the OFA-KD criterion under mixup; its distillers/_base.py line 42).
"""

from __future__ import annotations

from dataclasses import dataclass

from kdcache.methods.base import Method, register_method
from kdcache.methods.functional import ce_ls
from kdcache.targets import Needs


@register_method
class CE(Method):
    name = "ce"
    NEEDS = Needs()

    @dataclass
    class Options:
        label_smoothing: float = 0.1

    def forward(self, student, teacher, labels, *, epoch, step, total_epochs):
        return {"loss_ce": ce_ls(student.logits, labels, self.opts.label_smoothing)}
