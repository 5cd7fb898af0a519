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

__all__ = ["METHODS", "Method", "Needs", "TeacherInfo", "TeacherTargets", "build_options",
           "options_dict", "register_method", "resolve_method"]
