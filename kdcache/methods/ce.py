"""Plain cross-entropy with label smoothing: the no-teacher baseline (and teacher training)."""

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
