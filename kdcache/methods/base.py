"""The one method interface (mdistiller style, with cached targets instead of a live teacher).

A method is a small `nn.Module` in its own file. It:
- declares what it reads from the cache (`needs`), so the trainer can refuse a store that lacks it
  before the first step and print the extract command that adds it;
- owns its extra trainable modules (projectors, gates, fusion parts), built in `__init__` from the
  measured shapes of the student (`ModelInfo`) and teacher (`TeacherInfo`);
- maps (student outputs, teacher targets, labels) to a dict of named losses; the trainer sums the
  dict and logs every entry by name.
Options are a typed dataclass per method; `--opt key=value` on the command line overrides them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from kdcache.errors import KDCacheError
from kdcache.models import ModelInfo, ModelOutputs
from kdcache.registry import Registry


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


class Method(nn.Module):
    """Base of every distillation method; subclasses set `name`, `Options` and `NEEDS`."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = dataclass(type("NoOptions", (), {}))
    NEEDS: ClassVar[Needs] = Needs()
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}  # named option sets, `--method NAME:PRESET`

    def __init__(self, opts: Any, student: ModelInfo, teacher: TeacherInfo | None,
                 tail: nn.Module | None = None):
        super().__init__()
        self.opts = opts
        self.student_info = student
        self.teacher_info = teacher

    @classmethod
    def needs(cls, opts: Any, teacher_family: str | None = None, student_family: str | None = None) -> Needs:
        """What this method reads for a given pair; override when it depends on the families."""
        return cls.NEEDS

    def forward(self, student: ModelOutputs, teacher: TeacherTargets | None, labels: torch.Tensor,
                *, epoch: int, step: int, total_epochs: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError


METHODS: Registry[type[Method]] = Registry("method", "--method")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: registers a method under its `name` (equal to its file name)."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    return METHODS.register(cls.name)(cls)


def _coerce(value: str, target: Any, key: str, method: str) -> Any:
    """Turn a command-line string into the option's declared type."""
    kind = target if isinstance(target, type) else type(target)
    try:
        if kind is bool or isinstance(target, bool):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(target, tuple):
            items = [v for v in value.replace(",", " ").split() if v]
            elem = type(target[0]) if target else float
            return tuple(elem(v) for v in items)
        if isinstance(target, (int, float, str)):
            return type(target)(value)
    except ValueError as exc:
        raise KDCacheError(
            f"option {key}={value!r} of method {method} is not a valid {type(target).__name__}",
            expected=f"a {type(target).__name__} like {target!r}",
            fix=f"--opt {key}={target!r}",
        ) from exc
    return value


def build_options(method: type[Method], overrides: dict[str, Any] | list[str] | None = None,
                  base: Any = None) -> Any:
    """The method's Options (or `base`) with overrides (`["T=4", "eps=1.5"]` or a dict) applied and checked."""
    opts = base if base is not None else method.Options()
    if not overrides:
        return opts
    if isinstance(overrides, list):
        pairs = {}
        for item in overrides:
            if "=" not in item:
                raise KDCacheError(f"option {item!r} has no '='", expected="KEY=VALUE, e.g. --opt T=4")
            k, v = item.split("=", 1)
            pairs[k.strip()] = v.strip()
        overrides = pairs
    valid = {f.name for f in dataclasses.fields(opts)}
    changes = {}
    for key, value in overrides.items():
        if key not in valid:
            raise KDCacheError(
                f"method {method.name} has no option {key!r}",
                expected=f"one of: {', '.join(sorted(valid)) or '(none)'}",
                fix="kdcache list   # lists every method with its options, defaults and presets",
            )
        default = getattr(opts, key)
        changes[key] = _coerce(value, default, key, method.name) if isinstance(value, str) else value
    return dataclasses.replace(opts, **changes)


def resolve_method(spec: str, overrides: list[str] | dict[str, Any] | None = None) -> tuple[type[Method], Any]:
    """`kd` or `kd:mdistiller` (a named preset of the method) plus KEY=VALUE overrides, applied
    in that order -> (method class, options)."""
    name, _, preset = spec.partition(":")
    cls = METHODS.get(name)
    base: dict[str, Any] = {}
    if preset:
        if preset not in cls.PRESETS:
            raise KDCacheError(f"method {name} has no preset {preset!r}",
                               expected=f"one of: {', '.join(cls.PRESETS) or '(none)'}",
                               fix=f"--method {name}:PRESET, or --method {name} with --opt KEY=VALUE")
        base = dict(cls.PRESETS[preset])
    return cls, build_options(cls, overrides, base=build_options(cls, base))


def options_dict(opts: Any) -> dict[str, Any]:
    return dataclasses.asdict(opts) if dataclasses.is_dataclass(opts) else {}
