"""Fuse Before Transfer: Knowledge Fusion for Heterogeneous Distillation (arXiv 2410.12342, ICCV 2025).

A fusion ("assistant") model F is built from real modules of both networks plus one new part, L2G
(a patch embedding to the receiving network's stage-3 width and grid, then one timm Swin block:
local -> global). Which networks' parts, by the teacher's family:

- transformer/MLP teacher (family != "cnn") -> any student: `F = teacher_tail(L2G(F_s^3))`, with
  `F_s^3` the student's stage-3 map (so F shares the student's stages 1-3) and `teacher_tail` the
  teacher's last stage + final norm + head, loaded frozen from the cache (`tail.safetensors`) and
  handed over by `attach(student_model, tail)`, which freezes it and moves it to the method's device
  and dtype. FBT keeps it unregistered (out of checkpoints and the optimiser), a later `.to()` on
  the method moves it along, and gradients flow through it to L2G and the student, never into its
  weights. Needs: logits, embed, tail, student stage maps.
- CNN teacher -> any student: `F = student_tail(L2G(F_t^3))`, with `F_t^3` the teacher's cached
  stage-3 map and `student_tail = tail_of(student)` (the student's own last stage + norm + head,
  shared, so it trains). `attach(student_model)` binds it (no teacher tail is needed or used).
  Needs: logits, embed, teacher stage 3.
The trainer calls `attach` (the `Method` hook) once after construction and before the first step;
`forward` and `fuse` refuse to run before it.

Knowledge `K_m = {f_m, p_m}` (pooled pre-logit feature, logits) for m in teacher t, student s and
fusion f. `L = w_gt * CE_ls(z_s, y) + L(K_t, K_s) + L(K_t, K_f) + L(K_f, K_s)` with
`L(K_i, K_j) = w_nce * InfoNCE(f_i, f_j) + w_ofa * OFA(p_i -> p_j)` (OFA's target-enhanced soft CE,
`kdcache.methods.functional.ofa_loss`, the student-side logits p_j against target p_i).
Named losses: loss_ce, loss_{ts,tf,fs}_{nce,ofa}. `drop_teacher_fusion=True` removes L(K_t, K_f)
(the paper's ablation, 81.61 -> 25.57).

[decide] choices (first = default; alternatives as options):
- InfoNCE on L2-normalised features after one linear projection per model (t, s, f; shared by the
  pairs a model is in) to `proj_dim=256`; in-batch negatives (`negatives="batch"`: each sample
  against the other model's batch; `"batch+intra"` adds the same model's other samples, NT-Xent
  style); a learnable temperature per pair, initialised to `temperature=0.07`
  (`learn_temperature=False` fixes it; the learned scale 1/tau is capped at 100); symmetric, the
  mean of both directions (`symmetric=False`: only the second model's features pick their target).
- In each pair the first model is the target and is detached (`target="first"`): its raw feature
  and logits are constants (its projection still trains). `target="mutual"`: nothing is detached in
  InfoNCE and OFA is applied both ways wherever the first model can learn (OFA's target side is
  always a constant inside `ofa_loss`, so mutual OFA is the sum of the two one-way terms).
- L2G: patch embedding = Conv2d with kernel = stride = the integer grid ratio when the input grid
  is a multiple of the target grid, else 1x1 followed by resizing (adaptive average pooling down,
  bilinear up; also covers stage maps the cache stored on a coarser grid), then LayerNorm; one
  timm `SwinTransformerBlock` (window `l2g_window=7`, clipped to the grid by timm, no shift, heads =
  width // `l2g_head_dim` (32), MLP ratio 4). Init: trunc_normal(0.02) Linear, kaiming conv.
- A ViT tail's class token is not in the stage-3 map: the tail reconstructs it as the mean patch
  token at the tap (see kdcache/models/tails.py).

Labels: int64 (B,) or soft (B, C) targets (mixed and smoothed by the trainer). `loss_ce` is `CE_ls`
on the labels as given (soft-target CE for soft labels, the criterion of the OFA-KD framework);
every OFA term's target mask uses their argmax (`ofa_loss` takes `hard_labels`, as OFA-KD's
distillers/ofa.py lines 116-117). InfoNCE pairs samples by batch position, not by class, so it reads
no labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.errors import KDCacheError
from kdcache.methods.base import Method, register_method
from kdcache.methods.functional import ce_ls, ofa_loss, resize_to
from kdcache.targets import Needs

PAIRS = ("ts", "tf", "fs")  # (target, second) model pairs: teacher, student, fusion
NEGATIVES = ("batch", "batch+intra")
TARGETS = ("first", "mutual")
MAX_SCALE = 100.0  # cap on the learned 1/temperature (as CLIP)


def info_nce(target: torch.Tensor, pred: torch.Tensor, scale: torch.Tensor | float, *, symmetric: bool = True,
             intra: bool = False) -> torch.Tensor:
    """InfoNCE between two (B, D) feature batches; row b of each is the positive pair.

    Features are L2-normalised; logits are `scale * cos`. One direction: each `pred` row classifies
    its own target among the batch's `target` rows (cross-entropy, batch mean). `symmetric` averages
    it with the other direction. `intra` adds the anchor's own batch (minus itself) as negatives.
    Computed in fp32, autocast or not (a bf16 similarity times a scale of up to 100 is too coarse).
    """
    with torch.autocast(target.device.type, enabled=False):
        return _info_nce(target.float(), pred.float(), scale, symmetric, intra)


def _info_nce(target, pred, scale, symmetric, intra):
    t = F.normalize(target, dim=1)
    p = F.normalize(pred, dim=1)
    labels = torch.arange(t.shape[0], device=t.device)
    eye = torch.eye(t.shape[0], dtype=torch.bool, device=t.device)

    def one_way(anchor: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        logits = scale * anchor @ others.T
        if intra:
            same = (scale * anchor @ anchor.T).masked_fill(eye, float("-inf"))
            logits = torch.cat([logits, same], dim=1)
        return F.cross_entropy(logits, labels)

    loss = one_way(p, t)
    return 0.5 * (loss + one_way(t, p)) if symmetric else loss


def _heads(dim: int, head_dim: int) -> int:
    n = max(1, dim // head_dim)
    while dim % n:
        n -= 1
    return n


class L2G(nn.Module):
    """FBT's local-to-global bridge: patch embedding to `out_shape` (C, H, W), then one Swin block.
    NCHW in, NCHW out; the only new weights of the fusion model."""

    def __init__(self, in_shape: tuple[int, int, int], out_shape: tuple[int, int, int], window: int = 7,
                 head_dim: int = 32, mlp_ratio: float = 4.0):
        super().__init__()
        from timm.models.swin_transformer import SwinTransformerBlock

        c_in, h_in, w_in = in_shape
        c, h, w = out_shape
        r = h_in // h if h_in % h == 0 and w_in % w == 0 and h_in // h == w_in // w else 1
        self.grid = (h, w)
        self.proj = nn.Conv2d(c_in, c, kernel_size=r, stride=r)
        self.norm = nn.LayerNorm(c)
        self.block = SwinTransformerBlock(c, (h, w), num_heads=_heads(c, head_dim), window_size=window,
                                          shift_size=0, mlp_ratio=mlp_ratio)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = resize_to(self.proj(x), self.grid)
        x = self.block(self.norm(x.permute(0, 2, 3, 1)))  # timm's Swin block runs NHWC
        return x.permute(0, 3, 1, 2)


@register_method
class FBT(Method):
    name = "fbt"
    NEEDS = Needs(logits=True, embed=True, tail=True, student_stages=True)

    @dataclass
    class Options:
        w_gt: float = 1.0
        w_nce: float = 1.0  # weight of every pair's InfoNCE
        w_ofa: float = 1.0  # weight of every pair's OFA term
        eps: float = 1.0  # OFA target-enhancement exponent
        T: float = 1.0  # OFA temperature
        proj_dim: int = 256
        temperature: float = 0.07  # InfoNCE temperature (initial value when learned)
        learn_temperature: bool = True
        negatives: str = "batch"  # "batch" or "batch+intra"
        symmetric: bool = True
        target: str = "first"  # "first" (first model of a pair detached) or "mutual"
        drop_teacher_fusion: bool = False  # ablation: remove L(K_t, K_f)
        l2g_window: int = 7
        l2g_head_dim: int = 32
        label_smoothing: float = 0.1

    @classmethod
    def needs(cls, opts, teacher_family=None, student_family=None) -> Needs:
        if teacher_family == "cnn":
            return Needs(logits=True, embed=True, stages=(3,))
        return cls.NEEDS

    def __init__(self, opts, student, teacher):
        super().__init__(opts, student, teacher)
        if opts.negatives not in NEGATIVES or opts.target not in TARGETS:
            raise KDCacheError(f"fbt options negatives={opts.negatives!r} target={opts.target!r}",
                               expected=f"negatives in {NEGATIVES}, target in {TARGETS}",
                               fix="--method-opt negatives=batch --method-opt target=first")
        if opts.temperature <= 0 or opts.proj_dim < 1:
            raise KDCacheError(f"fbt temperature {opts.temperature} / proj_dim {opts.proj_dim} out of range",
                               expected="temperature > 0 and proj_dim >= 1", fix="--method-opt temperature=0.07")
        if teacher is None:
            raise KDCacheError("fbt needs a teacher", fix="pass --teacher ALIAS")
        missing = [who for who, info in (("student", student), ("teacher", teacher)) if len(info.stage_shapes) < 3]
        if missing:
            raise KDCacheError(f"fbt needs the stage-3 shape of the {' and '.join(missing)}",
                               expected="stage_shapes measured by a dummy forward")
        self.direction = "stage" if teacher.family == "cnn" else "tail"
        if self.direction == "tail":
            in_shape, out_shape, fused_dim = student.stage_shapes[2], teacher.stage_shapes[2], teacher.embed_dim
        else:
            in_shape, out_shape, fused_dim = teacher.stage_shapes[2], student.stage_shapes[2], student.embed_dim
        # Neither tail is a registered child: the teacher's must stay out of checkpoints and the
        # optimiser, the student's is already the student's. `_apply` moves the teacher tail along.
        # Both are set by `attach`, the one the direction uses.
        object.__setattr__(self, "_teacher_tail", None)
        object.__setattr__(self, "_student_tail", None)
        self.l2g = L2G(tuple(in_shape), tuple(out_shape), opts.l2g_window, opts.l2g_head_dim)
        self.proj = nn.ModuleDict({"t": nn.Linear(teacher.embed_dim, opts.proj_dim),
                                   "s": nn.Linear(student.embed_dim, opts.proj_dim),
                                   "f": nn.Linear(fused_dim, opts.proj_dim)})
        for lin in self.proj.values():
            nn.init.trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        self.pairs = tuple(p for p in PAIRS if not (opts.drop_teacher_fusion and p == "tf"))
        init = torch.full((len(self.pairs),), math.log(1.0 / opts.temperature))
        if opts.learn_temperature:
            self.log_scale = nn.Parameter(init)
        else:
            self.register_buffer("log_scale", init)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self._teacher_tail is not None:
            self._teacher_tail._apply(fn, *args, **kwargs)
        return self

    def attach(self, student_model: nn.Module, tail: nn.Module | None = None) -> None:
        """The `Method` hook (called once by the trainer after construction, before the first step).

        Transformer/MLP teacher ("tail" direction): `tail` is the teacher tail and is required; it is
        frozen, kept unregistered and moved to the method's device and dtype. CNN teacher ("stage"
        direction): binds `tail_of(student_model)`, the student's own tail (shared weights, it
        trains); `tail` is not used.
        """
        if self.direction == "tail":
            teacher = self.teacher_info
            if tail is None:
                raise KDCacheError(f"fbt with a {teacher.family} teacher needs the frozen teacher tail",
                                   expected="tail.safetensors in the teacher's cache (kdcache.models.tails.load_tail)",
                                   fix=f"kdcache extract --teacher {teacher.alias} --methods fbt")
            tail = tail.freeze() if hasattr(tail, "freeze") else tail.requires_grad_(False).eval()
            ref = self.l2g.proj.weight
            object.__setattr__(self, "_teacher_tail", tail.to(device=ref.device, dtype=ref.dtype))
            return
        from kdcache.models.tails import tail_of

        spec = getattr(student_model, "spec", None)
        if spec is not None and spec.alias != self.student_info.alias:
            raise KDCacheError(f"fbt was built for student {self.student_info.alias}, attached to {spec.alias}",
                               fix="attach the student module the method was built for")
        object.__setattr__(self, "_student_tail", tail_of(student_model))

    def scale(self, pair: str) -> torch.Tensor:
        return self.log_scale[self.pairs.index(pair)].exp().clamp(max=MAX_SCALE)

    def fuse(self, student, teacher) -> tuple[torch.Tensor, torch.Tensor]:
        """The fusion model's (pooled feature, logits); needs `attach` first."""
        if (self._teacher_tail if self.direction == "tail" else self._student_tail) is None:
            needed = "the frozen teacher tail" if self.direction == "tail" else "the student module for its tail"
            raise KDCacheError(f"fbt ({self.direction} direction) has not been attached: it needs {needed}",
                               fix="call method.attach(student_model, tail) first, once, before the first step")
        if self.direction == "tail":
            if student.stages is None:
                raise KDCacheError("fbt got no student stage maps", fix="run the student with stages=True")
            return self._teacher_tail(self.l2g(student.stages[2]))
        if 3 not in teacher.stages:
            raise KDCacheError(f"fbt needs the teacher's stage-3 map, the batch has {sorted(teacher.stages) or 'none'}",
                               fix="re-extract the teacher with --methods fbt")
        return self._student_tail(self.l2g(teacher.stages[3].detach().float()))

    def pair_losses(self, pair: str, first: tuple, second: tuple, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """L(K_i, K_j) for one pair: InfoNCE(f_i, f_j) and OFA(p_i -> p_j), i the target."""
        o = self.opts
        (f_i, z_i), (f_j, z_j) = first, second
        if o.target == "first":
            f_i, z_i = f_i.detach(), z_i.detach()
        i, j = pair
        nce = info_nce(self.proj[i](f_i), self.proj[j](f_j), self.scale(pair), symmetric=o.symmetric,
                       intra=o.negatives == "batch+intra")
        ofa = ofa_loss(z_j, z_i, labels, o.eps, o.T)
        if o.target == "mutual" and z_i.requires_grad:
            ofa = ofa + ofa_loss(z_i, z_j, labels, o.eps, o.T)
        return {f"loss_{pair}_nce": o.w_nce * nce, f"loss_{pair}_ofa": o.w_ofa * ofa}

    def forward(self, student, teacher, labels, *, epoch, step, total_epochs):
        o = self.opts
        f_f, z_f = self.fuse(student, teacher)
        know = {"t": (teacher.embed.detach().float(), teacher.logits.detach().float()),
                "s": (student.embed, student.logits), "f": (f_f, z_f)}
        losses = {"loss_ce": o.w_gt * ce_ls(student.logits, labels, o.label_smoothing)}
        for pair in self.pairs:
            losses.update(self.pair_losses(pair, know[pair[0]], know[pair[1]], labels))
        return losses
