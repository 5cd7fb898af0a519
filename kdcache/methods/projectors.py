"""OFA-KD's stage projectors, shared by ofa, mldr and hcd (docs/methods.md, "Stage projectors"), and the checks
those methods share on their options and on the (student, teacher) pair (`check_stages`, `check_pair`).

A projector maps one student stage map (NCHW, as `ModelOutputs.stages` gives for every family), and
for ViT/DeiT students that stage's prefix (class) tokens (`ModelOutputs.prefix`), to a pooled
descriptor (B, out_dim): `projector(feature, prefix)`. Each method adds what it needs on top: OFA and MLDR a
`Linear(out_dim, C)` stage head, HCD its feature mapper. Every size comes from the measured shapes
(`ModelInfo.stage_shapes`, `ModelInfo.embed_dim`, `TeacherInfo`), never from a table.

- CNN student (family "cnn"), `W = max(D_s, D_t)`: stage i < 4 gets (4 - i) SepConv blocks
  [dw3x3 s2, 1x1, BN, ReLU, dw3x3 s1, 1x1, BN, ReLU], channels doubling, the last block -> W;
  stage 4 a 1x1 conv -> W (with a bias as OFA's, distillers/ofa.py line 58; `stage4_bias=False`
  for MLDR-KD's, which has none); then global average pooling. out_dim = W.
- Token student (families "vit", "mlp", "swin"): Swin-style patch merging (2x2 neighbours
  concatenated, LayerNorm, Linear without bias) down to the stage-4 grid, the first merge projecting
  to D_s and followed by a GELU also when it is the only merge, later merges followed by a GELU
  except the last (Hao840/OFAKD distillers/ofa.py lines 74-86: `act_layer=nn.GELU` for i == 0,
  `nn.GELU if i != merge_num - 1 else nn.Identity` after); then max(4 - i, 1) timm transformer
  blocks (dim D_s, 4 heads). Descriptor: with prefix tokens (ViT/DeiT: `ModelInfo.prefix_tokens`
  > 0) the stage's prefix tokens skip the merging, are put in front of the merged patch tokens,
  go through the blocks with them, and the first (class) token is the descriptor (OFAKD
  distillers/ofa.py lines 91-103 with distillers/utils.py `TokenFnContext`, `TokenFilter`);
  without, the mean over tokens. out_dim = D_s.
  The stage-4 grid (OFA: 7x7 at 224) is read from measured shapes: the teacher's stage-4 grid when
  the teacher is hierarchical (cnn/swin), else the student's own when it is (swin), else
  input_size // 32 (at least 1); rescaled by the input-size ratio when teacher and student differ.
  Merges halve the grid (odd sides padded, as in Swin) while the result stays at least the target;
  if no merge is needed (CPU sizes: the grid is already small) a Linear(C_i -> D_s) takes the first
  merge's projection role (Identity when C_i == D_s); prefix tokens, which OFA passes on unchanged,
  get their own Linear(C_i -> D_s) only when C_i != D_s (never for ViT/DeiT, whose widths agree).
- Init (OFA): trunc_normal(std 0.02) for Linear weights with zero bias, kaiming_normal (fan_out, relu)
  for conv, BN weight 1 / bias 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.errors import KDCacheError
from kdcache.models import ModelInfo, ModelOutputs

TOKEN_FAMILIES = ("vit", "mlp", "swin")
HIERARCHICAL_FAMILIES = ("cnn", "swin")


def check_stages(method: str, stages: tuple[int, ...]) -> None:
    """Stages must be distinct numbers 1..4 (shared by ofa, mldr, hcd)."""
    if not stages or len(set(stages)) != len(stages) or any(s not in (1, 2, 3, 4) for s in stages):
        raise KDCacheError(f"{method} stages {stages!r} are not distinct stage numbers 1..4",
                           expected="e.g. stages=(1,2,3,4)", fix="--method-opt stages=1,2,3,4")


def check_pair(method: str, student, teacher) -> None:
    """A projector method needs the student's four stage shapes and a described teacher."""
    if teacher is None:
        raise KDCacheError(f"method {method} distils from a teacher, but none was described",
                           fix=f"kdcache train --method {method} --teacher NAME ...")
    if len(student.stage_shapes) < 4:
        raise KDCacheError(f"{method} needs the student's four stage shapes, {student.alias} has "
                           f"{len(student.stage_shapes)}", expected="four (C, H, W) entries from describe()")


def init_projector_weights(module: nn.Module) -> None:
    """OFA's init, applied to every submodule of a projector (and its heads)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class SepConv(nn.Sequential):
    """Depthwise-separable block that halves the grid: [dw3x3 s2, 1x1, BN, ReLU, dw3x3 s1, 1x1, BN, ReLU]."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(
            nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_in, 1, bias=False),
            nn.BatchNorm2d(c_in),
            nn.ReLU(),
            nn.Conv2d(c_in, c_in, 3, stride=1, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
        )


def stage_prefix(student: ModelOutputs, stage: int) -> torch.Tensor | None:
    """The prefix (class) tokens (B, P, C_i) tapped with stage `stage` (1..4), None when the student
    has none (CNN, Swin, MLP families)."""
    prefix = getattr(student, "prefix", None)
    return None if prefix is None else prefix[stage - 1]


class CNNStageProjector(nn.Module):
    """Stage-i map (B, C_i, H, W) -> pooled descriptor (B, width)."""

    def __init__(self, stage: int, in_channels: int, width: int, stage4_bias: bool = True):
        super().__init__()
        self.stage, self.out_dim = stage, width
        if stage == 4:
            self.body = nn.Sequential(nn.Conv2d(in_channels, width, 1, bias=stage4_bias))
        else:
            blocks, c = [], in_channels
            n = 4 - stage
            for j in range(n):
                c_out = width if j == n - 1 else 2 * c
                blocks.append(SepConv(c, c_out))
                c = c_out
            self.body = nn.Sequential(*blocks)
        init_projector_weights(self)

    def forward(self, x: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        if prefix is not None:
            raise KDCacheError("a CNN stage projector got prefix tokens", expected="prefix=None for CNN students")
        return self.body(x).mean(dim=(2, 3))


class PatchMerging(nn.Module):
    """Swin-style merge on NHWC tokens: 2x2 neighbours concatenated (odd sides zero-padded),
    LayerNorm(4C), Linear(4C -> out, no bias), optional GELU."""

    def __init__(self, dim: int, out_dim: int, act: bool):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, H // 2, W // 2, 4 * C)
        return self.act(self.reduction(self.norm(x)))


def merge_count(grid: tuple[int, int], target: tuple[int, int]) -> int:
    """How many halvings (ceil) take `grid` down to `target` without going below it."""
    (h, w), (th, tw), n = grid, target, 0
    while (h > th or w > tw) and (h + 1) // 2 >= th and (w + 1) // 2 >= tw:
        h, w, n = (h + 1) // 2, (w + 1) // 2, n + 1
    return n


def _heads(dim: int, wanted: int = 4) -> int:
    return max(h for h in range(1, wanted + 1) if dim % h == 0)


class TokenStageProjector(nn.Module):
    """Stage-i grid (B, C_i, H, W) [+ prefix tokens (B, P, C_i)] -> patch merging -> transformer
    blocks -> class token, or token mean without prefix tokens (B, width)."""

    def __init__(self, stage: int, in_channels: int, grid: tuple[int, int], width: int,
                 target_grid: tuple[int, int], num_heads: int = 4, prefix_tokens: int = 0):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.stage, self.out_dim, self.prefix_tokens = stage, width, prefix_tokens
        n = merge_count(grid, target_grid)
        if n == 0:
            self.merge = nn.Sequential(nn.Linear(in_channels, width) if in_channels != width else nn.Identity())
        else:  # GELU after the first merge (even the only one) and after every other merge but the last
            self.merge = nn.Sequential(*[PatchMerging(in_channels if j == 0 else width, width,
                                                      act=j == 0 or j < n - 1)
                                         for j in range(n)])
        self.prefix_proj = nn.Linear(in_channels, width) if prefix_tokens and in_channels != width else nn.Identity()
        self.num_merges = n
        self.blocks = nn.Sequential(*[Block(dim=width, num_heads=_heads(width, num_heads))
                                      for _ in range(max(4 - stage, 1))])
        init_projector_weights(self)

    def forward(self, x: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        got = 0 if prefix is None else prefix.shape[1]
        if got != self.prefix_tokens:
            raise KDCacheError(f"stage-{self.stage} token projector was built for {self.prefix_tokens} prefix "
                               f"token(s) and got {got}",
                               expected="ModelOutputs.prefix as the student's TapModel gives it (describe() "
                                        "measures prefix_tokens)")
        x = self.merge(x.permute(0, 2, 3, 1)).flatten(1, 2)  # NCHW -> NHWC -> (B, patches, width)
        if prefix is None:
            return self.blocks(x).mean(dim=1)
        x = self.blocks(torch.cat([self.prefix_proj(prefix), x], dim=1))
        return x[:, 0]  # the class token


def token_target_grid(student: ModelInfo, teacher) -> tuple[int, int]:
    """The stage-4 grid token projectors merge down to (module docstring gives the rule)."""
    def scaled(info) -> tuple[int, int]:
        _, h, w = info.stage_shapes[3]
        r = student.input_size / info.input_size
        return max(1, round(h * r)), max(1, round(w * r))

    if teacher is not None and teacher.family in HIERARCHICAL_FAMILIES and len(teacher.stage_shapes) >= 4:
        return scaled(teacher)
    if student.family in HIERARCHICAL_FAMILIES:
        return scaled(student)
    g = max(1, student.input_size // 32)
    return g, g


def cnn_width(student: ModelInfo, teacher) -> int:
    """W = max(D_s, D_t): the CNN projectors' output width."""
    return max(student.embed_dim, teacher.embed_dim if teacher is not None else 0)


def build_stage_projector(student: ModelInfo, teacher, stage: int, *, stage4_bias: bool = True) -> nn.Module:
    """The projector of student stage `stage` (1..4); it has `out_dim` and returns (B, out_dim).
    `stage4_bias`: whether a CNN student's stage-4 1x1 conv has a bias (OFA: yes; MLDR-KD: no)."""
    if len(student.stage_shapes) < 4:
        raise KDCacheError(f"student {student.alias} has {len(student.stage_shapes)} measured stage shapes",
                           expected="four (C, H, W) stage shapes from `describe`",
                           fix="measure the student with kdcache.models.describe(model)")
    if stage not in (1, 2, 3, 4):
        raise KDCacheError(f"stage {stage} is not a stage number", expected="1, 2, 3 or 4", fix="--method-opt stages=1,2,3,4")
    c, h, w = student.stage_shapes[stage - 1]
    if student.family == "cnn":
        return CNNStageProjector(stage, c, cnn_width(student, teacher), stage4_bias)
    if student.family in TOKEN_FAMILIES:
        return TokenStageProjector(stage, c, (h, w), student.embed_dim, token_target_grid(student, teacher),
                                   prefix_tokens=getattr(student, "prefix_tokens", 0))
    raise KDCacheError(f"no stage projector for student family {student.family!r}",
                       expected=f"one of cnn, {', '.join(TOKEN_FAMILIES)}")


def build_stage_projectors(student: ModelInfo, teacher, stages, *, stage4_bias: bool = True) -> nn.ModuleDict:
    """One projector per stage, keyed by the stage number as a string."""
    return nn.ModuleDict({str(s): build_stage_projector(student, teacher, s, stage4_bias=stage4_bias)
                          for s in stages})
