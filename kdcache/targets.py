"""The types every floor shares: what a method needs from a teacher, what the teacher is, and
the targets it gives for a batch. They live on the lowest floor so that data, models, store,
methods and the target sources can all speak of them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Needs:
    """What a method reads from the teacher's cache. `stages` are 1-based stage numbers."""

    logits: bool = False
    embed: bool = False
    stages: tuple[int, ...] = ()
    tail: bool = False  # the frozen teacher tail (last stage + norm + head), FBT
    student_stages: bool = False  # the student's four stage maps (projector-based methods)

    def union(self, other: "Needs") -> "Needs":
        return Needs(
            logits=self.logits or other.logits,
            embed=self.embed or other.embed,
            stages=tuple(sorted(set(self.stages) | set(other.stages))),
            tail=self.tail or other.tail,
            student_stages=self.student_stages or other.student_stages,
        )

    @property
    def teacher(self) -> bool:
        return self.logits or self.embed or bool(self.stages) or self.tail


@dataclass(frozen=True)
class TeacherInfo:
    """The teacher as the store describes it (no teacher weights needed at train time)."""

    alias: str
    family: str
    num_classes: int
    embed_dim: int
    input_size: int
    stage_shapes: tuple[tuple[int, int, int], ...] = ()  # (C, H, W) of stages 1..4 at input_size


@dataclass
class TeacherTargets:
    """The teacher's outputs for the batch's views (fp32 on the training device).

    `stages` maps a 1-based stage number to an NCHW tensor (possibly pooled to a coarser grid).
    """

    logits: torch.Tensor | None = None
    embed: torch.Tensor | None = None
    stages: dict[int, torch.Tensor] = field(default_factory=dict)
