"""The one method interface (mdistiller style, with cached targets instead of a live teacher).

A method is a small `nn.Module` in its own file. It:
- declares what it reads from the cache (`needs`), so the trainer can refuse a store that lacks it
  before the first step and print the extract command that adds it;
- owns its extra trainable modules (projectors, gates, fusion parts), built in `__init__` from the
  measured shapes of the student (`ModelInfo`) and teacher (`TeacherInfo`), never from modules;
- receives live modules only through its one declared hook, `attach(student_model, tail)`, which
  the trainer calls once after construction and before the first step (the student module, and the
  frozen teacher tail when the method's needs include `tail`); the default does nothing, FBT
  overrides it. The trainer calls it on every method and never probes for method-specific hooks;
- maps (student outputs, teacher targets, labels) to a dict of named losses; the trainer sums the
  dict and logs every entry by name.
Options are a typed dataclass per method; `--method-opt key=value` on the command line overrides them.
`Needs`, `TeacherInfo` and `TeacherTargets` live in `kdcache.targets` and are re-exported here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from kdcache.errors import KDCacheError
from kdcache.models import ModelInfo, ModelOutputs
from kdcache.registry import Registry
from kdcache.targets import Needs, TeacherInfo, TeacherTargets


class Method(nn.Module):
    """Base of every distillation method; subclasses set `name`, `Options` and `NEEDS`."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = dataclass(type("NoOptions", (), {}))
    NEEDS: ClassVar[Needs] = Needs()
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}  # named option sets, `--method NAME:PRESET`

    def __init__(self, opts: Any, student: ModelInfo, teacher: TeacherInfo | None):
        super().__init__()
        self.opts = opts
        self.student_info = student
        self.teacher_info = teacher

    def attach(self, student_model: nn.Module, tail: nn.Module | None = None) -> None:
        """Called once by the trainer after construction and before the first step, with the student
        module and (when the method's needs include `tail`) the frozen teacher tail. The default
        does nothing; a method that runs live modules (FBT) overrides it."""

    @classmethod
    def needs(cls, opts: Any, teacher_family: str | None = None, student_family: str | None = None) -> Needs:
        """What this method reads for a given pair; override when it depends on the families."""
        return cls.NEEDS

    def forward(self, student: ModelOutputs, teacher: TeacherTargets | None, labels: torch.Tensor,
                *, epoch: int, step: int, total_epochs: int) -> dict[str, torch.Tensor]:
        """Named, weighted losses. `labels` are int64 class indices (B,) or float32 soft targets
        (B, C), already mixed (mixup/cutmix) and smoothed by the trainer; every method accepts both:
        its cross-entropy terms go through `functional.ce_ls` (soft-target CE, no extra smoothing,
        for soft targets) and anything that needs one class per sample through
        `functional.hard_labels` (the argmax)."""
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
            fix=f"--method-opt {key}={target!r}",
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
                raise KDCacheError(f"option {item!r} has no '='", expected="KEY=VALUE, e.g. --method-opt T=4")
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
                               fix=f"--method {name}:PRESET, or --method {name} with --method-opt KEY=VALUE")
        base = dict(cls.PRESETS[preset])
    return cls, build_options(cls, overrides, base=build_options(cls, base))


def options_dict(opts: Any) -> dict[str, Any]:
    return dataclasses.asdict(opts) if dataclasses.is_dataclass(opts) else {}
