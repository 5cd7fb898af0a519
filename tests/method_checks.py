"""Checks shared by the method tests (ofa, mldr, hcd): where gradients go, and real students."""

from __future__ import annotations

import torch

from kdcache.methods import TeacherTargets
from kdcache.methods.projectors import TokenStageProjector


def assert_gradients_reach_only_trainables(method, losses, student_tensors, targets: TeacherTargets) -> None:
    """Backprop the summed losses: every parameter of the method and every student tensor gets a
    non-zero gradient; no cached target (teacher logits, embedding) gets one."""
    sum(losses.values()).backward()
    for name, p in method.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for i, s in enumerate(student_tensors):
        assert s.grad is not None and s.grad.abs().sum() > 0, f"student tensor {i}"
    for name in ("logits", "embed"):
        cached = getattr(targets, name)
        assert cached is None or cached.grad is None, f"teacher {name} got a gradient"


def assert_trains_on_real_student(make_method, alias: str, targets: TeacherTargets, n_losses: int) -> None:
    """A registered CPU student's real stage maps through the method (built by `make_method(info)`):
    `n_losses` finite named losses, a gradient for every parameter of the method, and for ViT/DeiT
    students through token stage projectors a gradient into the prefix (class) tokens of every stage."""
    from kdcache.models import build_model, describe

    torch.manual_seed(0)
    net = build_model(alias, targets.logits.shape[1])
    method = make_method(describe(net))
    out = net(torch.randn(targets.logits.shape[0], 3, 32, 32), stages=True)
    for p in out.prefix or []:  # ViT/DeiT: the class token tapped with each stage
        p.retain_grad()
    losses = method(out, targets, torch.randint(0, targets.logits.shape[1], (targets.logits.shape[0],)),
                    epoch=0, step=0, total_epochs=1)
    assert len(losses) == n_losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in method.parameters())
    # token stage projectors consume the prefix tokens (OFA keeps the class token as the descriptor)
    if any(isinstance(m, TokenStageProjector) for m in method.modules()):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in out.prefix or [])
