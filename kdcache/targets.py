"""The types every floor shares: what a method needs from a teacher, what the teacher is, and
the targets it gives for a batch. They live on the lowest floor so that data, models, store,
methods and the target sources can all speak of them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kdcache.errors import KDCacheError


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


def ensemble_members(teacher: str) -> tuple[str, ...]:
    """`"swin_t,vit_s"` -> ("swin_t", "vit_s"); a single alias is a one-member ensemble. Empty names
    and repeated members are refused (a repeat would silently double one teacher's weight)."""
    members = tuple(m.strip() for m in str(teacher).split(","))
    if any(not m for m in members) or len(set(members)) != len(members):
        raise KDCacheError(f"--teacher {teacher!r} is not a list of distinct teachers",
                           expected="one alias (swin_t) or an ensemble of distinct aliases (swin_t,vit_s)")
    return members


def uses_only_logits(needs: Needs) -> bool:
    """What an ensemble can serve: logit targets (the members' embeddings and maps have different
    widths and meanings; averaging them is not a teacher any method was written for)."""
    return not (needs.embed or needs.stages or needs.tail)


def ensemble_logits(member_logits: list[torch.Tensor]) -> torch.Tensor:
    """Logits whose softmax is the mean of the members' probabilities: log(mean_i softmax(z_i)),
    computed as logsumexp_i(log_softmax(z_i)) - log(M) (stable for confident members). With
    one member it is that member's log-probabilities (softmax unchanged). Methods read them as
    teacher logits; a temperature T then softens the ensemble's distribution as a whole."""
    stacked = torch.stack([torch.log_softmax(z.float(), dim=-1) for z in member_logits])
    return torch.logsumexp(stacked, dim=0) - torch.log(torch.tensor(float(len(member_logits))))
