"""Distillation methods: one file per method, registered under its file name.

Importing this package imports every method module, so `METHODS` holds them all.
"""

import importlib
import pkgutil

from kdcache.methods.base import (
    METHODS,
    Method,
    Needs,
    TeacherInfo,
    TeacherTargets,
    build_options,
    options_dict,
    register_method,
    resolve_method,
)

_SKIP = {"base", "functional", "projectors"}
for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in _SKIP and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")



def method_needs(methods: tuple[str, ...], teacher_family: str, student_family: str) -> Needs:
    """What a store must hold to serve every one of `methods` (each `NAME` or `NAME:PRESET`) for a
    pair of families; logits and embeddings always (they are small and every report needs them)."""
    needs = Needs(logits=True, embed=True)
    for name in methods:
        cls, opts = resolve_method(name)
        needs = needs.union(cls.needs(opts, teacher_family, student_family))
    return needs


__all__ = ["METHODS", "Method", "Needs", "TeacherInfo", "TeacherTargets", "build_options", "method_needs",
           "options_dict", "register_method", "resolve_method"]
