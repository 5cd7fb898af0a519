"""Cross-Architecture Distillation Made Simple with Redundancy Suppression (RSD; Zhang, Liu, Ran, Ma;
ICCV 2025, arXiv 2507.21844). Official code: github spacewanderx/RSD (built on OFA-KD), read at
commit e4c7b3d: `distillers/rsd.py` (projector and loss), `train.py` (defaults `--rsd-stage -1`,
`--rsd-loss-weight 0.1`, `--rsd-kappa 0.01`, `--rsd-gamma 2`), `distillers/utils.py`
(`init_weights`), `custom_forward/*.py` (stage -1 = the pooled pre-logit feature).

A Barlow-Twins-style objective between the student's and the teacher's pooled pre-logit features:
make each feature dimension of the (projected) student perfectly correlated with the same dimension
of the teacher (invariance maximisation) and uncorrelated with the others (decorrelation, the
redundancy suppression). A small projector decouples the objective from the student's own features.

    S = P(f_s)                     f_s = ModelOutputs.embed (B, D_s); P below; S is (B, D_t)
    T = f_t                        the cached teacher embedding (B, D_t), a constant (detached)
    n(f) = (f - mean_b f) / (std_b f + eps)       per dimension over the batch; std biased; eps 1e-5
    C = n(T)^T n(S) / B                           (D_t, D_t) cross-correlation, C_ij = mean_b n(T)_bi n(S)_bj
    L_rsd = sum_i (C_ii - 1)^2 + kappa * sum_{i != j} C_ij^2

    loss_ce  = w_gt  * CE_ls(z_s, y)
    loss_rsd = w_rsd * L_rsd

Defaults as the official code: gamma = 2, kappa = 0.01, w_rsd = 0.1, w_gt = 1 (its `loss_gt` is
the criterion unweighted), label smoothing 0.1 (its CIFAR and ImageNet cnn/vit_mlp configs), eps
1e-5. There is no logit KD term; the method reads only the teacher embedding (`Needs(embed=True)`).

Projector P (official `self.projector`): Linear(D_s -> gamma*D_s, no bias), BatchNorm1d(gamma*D_s),
GELU, Linear(gamma*D_s -> D_t, no bias). Init as the official `init_weights`: Linear weights
truncated normal (std 0.02, cut at +-2 absolute, as timm's); BatchNorm1d left at PyTorch's default
(weight 1, bias 0). D_s and D_t are read from `ModelInfo.embed_dim` / `TeacherInfo.embed_dim`.

Notes and choices:
- The official code has one setting for every pair (train.sh runs all CIFAR pairs with the
  defaults; its configs differ only in the training recipe), so there are no presets.
- Feature tap: the official `--rsd-stage` defaults to -1, the pooled pre-logit feature, which is
  `ModelOutputs.embed` here and the store's teacher embedding. (Its stages 1..4 would hand a
  (C, H, W) shape to `nn.Linear`, so only -1 runs there; no stage option here.)
- [decide] Numerics: the loss (standardisation, C and the sums) is computed in fp32 with autocast
  off (float64 stays float64), even under bf16 autocast; the official code ran under whatever AMP
  it was given. The projector runs under the trainer's autocast like the student.
- [decide] A batch of one has no batch statistics (the official BatchNorm1d would raise in
  training): `loss_rsd` is then 0, with no gradient, and the projector is skipped. The trainer keeps
  a last short batch, so this can happen when the training set size is 1 mod the batch size.
- Under torchrun (DDP) the batch standardisation, the cross-correlation C and the projector's
  BatchNorm1d use each rank's own batch (global batch / world size), not the global batch
  (`--sync-bn` on GPUs syncs the BatchNorm1d only).
- Labels: int64 (B,) or soft (B, C) targets (mixed and smoothed by the trainer). As the official
  criterion, which becomes timm's soft-target CE when mixup/cutmix is on (its vit_mlp configs),
  `loss_ce` is `CE_ls` on the labels as given: label-smoothed CE for class indices, soft-target CE
  without further smoothing for soft targets. (Its ImageNet "stronger" config's BCE is not
  offered.) The RSD term is label-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kdcache.errors import KDCacheError
from kdcache.methods.base import Method, register_method
from kdcache.methods.functional import ce_ls
from kdcache.methods.projectors import init_projector_weights
from kdcache.targets import Needs


def _wide(x: torch.Tensor) -> torch.Tensor:
    """fp32, or float64 when given float64 (tests)."""
    return x if x.dtype == torch.float64 else x.float()


def standardise(f: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-dimension standardisation over the batch: (f - mean_b) / (biased std_b + eps)."""
    return (f - f.mean(dim=0)) / (f.std(dim=0, unbiased=False) + eps)


def cross_correlation(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """C = n(T)^T n(S) / B, (D_t, D_t): rows index teacher dimensions, columns student dimensions."""
    return standardise(teacher, eps).T @ standardise(student, eps) / student.shape[0]


def rsd_loss(student: torch.Tensor, teacher: torch.Tensor, kappa: float = 0.01, eps: float = 1e-5) -> torch.Tensor:
    """sum_i (C_ii - 1)^2 + kappa * sum_{i != j} C_ij^2, in fp32 (float64 kept) with autocast off.
    `student` is the projected student feature S, `teacher` the teacher embedding T, both (B, D_t)."""
    with torch.autocast(device_type=student.device.type, enabled=False):
        c = cross_correlation(_wide(student), _wide(teacher), eps)
        diag = torch.diagonal(c)
        on_diag = (diag - 1).pow(2).sum()
        off_diag = c.pow(2).sum() - diag.pow(2).sum()
        return on_diag + kappa * off_diag


class RSDProjector(nn.Sequential):
    """Linear(D_s -> gamma*D_s, no bias), BatchNorm1d, GELU, Linear(gamma*D_s -> D_t, no bias)."""

    def __init__(self, d_s: int, d_t: int, gamma: int = 2):
        hidden = d_s * gamma
        super().__init__(nn.Linear(d_s, hidden, bias=False), nn.BatchNorm1d(hidden), nn.GELU(),
                         nn.Linear(hidden, d_t, bias=False))
        init_projector_weights(self)


@register_method
class RSD(Method):
    name = "rsd"
    NEEDS = Needs(embed=True)

    @dataclass
    class Options:
        gamma: int = 2  # projector hidden width = gamma * D_s (official --rsd-gamma)
        kappa: float = 0.01  # weight of the off-diagonal (decorrelation) terms (--rsd-kappa)
        w_rsd: float = 0.1  # weight of the RSD loss (--rsd-loss-weight)
        w_gt: float = 1.0
        eps: float = 1e-5  # added to the batch std before dividing
        label_smoothing: float = 0.1

    def __init__(self, opts, student, teacher):
        super().__init__(opts, student, teacher)
        if teacher is None:
            raise KDCacheError("method rsd distils from a teacher, but none was described",
                               fix="kdcache train --method rsd --teacher NAME ...")
        if int(opts.gamma) != opts.gamma or opts.gamma < 1:
            raise KDCacheError(f"rsd gamma={opts.gamma!r} is not a positive integer",
                               expected="an integer >= 1 (official: 2)", fix="--method-opt gamma=2")
        if opts.kappa < 0:
            raise KDCacheError(f"rsd kappa={opts.kappa} is negative", expected="kappa >= 0 (official: 0.01)",
                               fix="--method-opt kappa=0.01")
        if opts.eps <= 0:
            raise KDCacheError(f"rsd eps={opts.eps} is not positive", expected="eps > 0 (official: 1e-5)",
                               fix="--method-opt eps=1e-5")
        self.projector = RSDProjector(student.embed_dim, teacher.embed_dim, int(opts.gamma))

    def forward(self, student, teacher, labels, *, epoch, step, total_epochs):
        o = self.opts
        if teacher is None or teacher.embed is None:
            raise KDCacheError("rsd needs the teacher's pooled embedding f_t, the batch has none",
                               fix="re-extract the teacher (extraction always stores embeddings)")
        f_t = teacher.embed.detach()
        d_t = self.teacher_info.embed_dim
        if f_t.dim() != 2 or f_t.shape[1] != d_t or f_t.shape[0] != student.embed.shape[0]:
            raise KDCacheError(f"rsd: cached teacher embedding {tuple(f_t.shape)} does not match "
                               f"(batch {student.embed.shape[0]}, embed_dim {d_t})",
                               expected="the teacher's embed_dim recorded in the store")
        losses = {"loss_ce": o.w_gt * ce_ls(student.logits, labels, o.label_smoothing)}
        if student.embed.shape[0] < 2:  # no batch statistics: see the docstring
            losses["loss_rsd"] = torch.zeros((), device=student.embed.device)
        else:
            losses["loss_rsd"] = o.w_rsd * rsd_loss(self.projector(student.embed), f_t, o.kappa, o.eps)
        return losses
