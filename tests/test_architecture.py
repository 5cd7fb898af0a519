"""The floors of docs/architecture.md, kept by parsing every module's imports (lazy ones included).

Imports run downward only: a module may import a lower floor, or its own package on the same
floor (data/ inside data/, ...); never a higher floor, never a sibling on its floor (extract and
train never import each other; data, models and store share only floor-1 types). No private name
(`_x`) is imported from another file, and no method file imports another method file.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kdcache"

# errors sits under floor 1 (every floor reports through it), locations just over it (files' atomic
# writes and the store both take URLs through it); report sits over sweep (it reads a
# sweep's pipeline and run names); runs sits over results (a finished run appends its row);
# presets are floor-4 settings that only train-time code reads; dask_extract sits over extract (it
# spreads stage one's blocks over a Dask cluster with extract's own pieces).
FLOORS = {
    "kdcache": 0, "kdcache.errors": 0.5, "kdcache.locations": 0.75,
    "kdcache.registry": 1, "kdcache.devices": 1, "kdcache.files": 1, "kdcache.targets": 1, "kdcache.child": 1,
    "kdcache.distributed": 1,
    "kdcache.presets": 4,
    "kdcache.data": 2, "kdcache.models": 2, "kdcache.store": 2,
    "kdcache.methods": 3,
    "kdcache.evaluate": 4, "kdcache.sources": 4, "kdcache.results": 4.0, "kdcache.runs": 4.5,
    "kdcache.extract": 5, "kdcache.train": 5, "kdcache.dask_extract": 5.5,
    "kdcache.sweep": 6, "kdcache.report": 6.5, "kdcache.bench": 6, "kdcache.bench_data": 6, "kdcache.bench_stores": 6, "kdcache.demo": 6, "kdcache.verify": 6,
    "kdcache.inspect": 6, "kdcache.viewgrid": 6,
    "kdcache.cli": 7,
}
# In methods/, these hold what several methods share; every other file is one method.
METHOD_SHARED = {"kdcache.methods", "kdcache.methods.base", "kdcache.methods.functional",
                 "kdcache.methods.projectors"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    """The floor entry a module belongs to: its package (kdcache.data) or itself (kdcache.train)."""
    parts = module.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in FLOORS:
            return ".".join(parts[:k])
    raise KeyError(module)


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported kdcache module, names imported from it) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "kdcache"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                base = ".".join(anchor[:len(anchor) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] == "kdcache":
                out.append((node.lineno, base, [a.name for a in node.names]))
    return out


def all_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def violations(path: Path) -> list[str]:
    here = module_name(path)
    problems = []
    for line, target, names in imports(path):
        where = f"{path.relative_to(PACKAGE.parent)}:{line}"
        src, dst = unit(here), unit(target)
        if FLOORS[dst] > FLOORS[src]:
            problems.append(f"{where}: {here} (floor {FLOORS[src]}) imports {target} (floor {FLOORS[dst]}): upward")
        elif FLOORS[dst] == FLOORS[src] and dst != src:
            problems.append(f"{where}: {here} imports its floor-{FLOORS[src]} sibling {target}")
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if private and target != here:
            problems.append(f"{where}: imports private {', '.join(private)} from {target}")
        if (here.startswith("kdcache.methods.") and here not in METHOD_SHARED
                and target.startswith("kdcache.methods") and target not in METHOD_SHARED):
            problems.append(f"{where}: method file {here} imports method file {target}")
        if here in METHOD_SHARED - {"kdcache.methods"} and target.startswith("kdcache.methods") \
                and target not in METHOD_SHARED:
            problems.append(f"{where}: shared method helper {here} imports method file {target}")
    return problems


def test_every_module_has_a_floor():
    missing = [module_name(p) for p in all_modules() if not _has_unit(module_name(p))]
    assert not missing, f"modules on no floor (add them to FLOORS): {missing}"


def _has_unit(module: str) -> bool:
    try:
        unit(module)
        return True
    except KeyError:
        return False


@pytest.mark.parametrize("path", all_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_downward(path):
    assert violations(path) == []


def test_the_check_catches_what_it_must(tmp_path, monkeypatch):
    """The rules fire on an upward import, a sibling import, a private name and a method-to-method
    import (written into a throw-away copy of the package layout)."""
    fake = tmp_path / "kdcache"
    (fake / "methods").mkdir(parents=True)
    (fake / "store").mkdir()
    cases = {
        fake / "store" / "bad.py": "from kdcache.train import run_train\nfrom kdcache.data import load_dataset\n",
        fake / "extract.py": "import kdcache.train\n",
        fake / "sources.py": "from kdcache.store.store import _fix_extract\n",
        fake / "methods" / "hcd.py": "from kdcache.methods.ofa import OFA\nfrom .base import Method\n",
    }
    for p, text in cases.items():
        p.write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    found = {p.name: violations(p) for p in cases}
    assert any("upward" in v for v in found["bad.py"]) and any("sibling kdcache.data" in v for v in found["bad.py"])
    assert any("sibling kdcache.train" in v for v in found["extract.py"])
    assert any("private _fix_extract" in v for v in found["sources.py"])
    assert len(found["hcd.py"]) == 1 and "imports method file kdcache.methods.ofa" in found["hcd.py"][0]
