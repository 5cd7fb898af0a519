"""What is committed works on any machine: relative paths only, references that resolve, no lock files.

The files checked are those git would commit: tracked files plus untracked ones that .gitignore does
not exclude (`git ls-files --cached --others --exclude-standard`), as found in the working tree.
Binary files (a NUL byte in their first 8 KB: Parquet, PNG) are skipped. Without git or outside a
git checkout (an unpacked sdist) every test here is skipped.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Real system locations a user needs, spelled in full: an absolute path is allowed only when it is
# one of these or lies below one.
ALLOWED_ABSOLUTE = (
    "/usr/share/datasets/fashion-mnist",  # Debian's dataset-fashion-mnist package (make data, .ci/run)
    "/usr/bin/env",  # shebang lines
)
# First components of absolute paths that belong to one machine (home folders, scratch and
# temporary space, mounts, system trees). Built from words so this file holds no such path itself.
MACHINE_ROOTS = ("home", "root", "Users", "tmp", "var", "work", "workspace", "scratch", "mnt", "media", "data",
                 "opt", "srv", "usr", "etc", "private", "nfs", "content", "cache")
ABSOLUTE = re.compile(r"(?<![\w.~$:/})\]-])/(?:" + "|".join(MACHINE_ROOTS) + r")(?=/|\b)[^\s'\"`<>()\[\],;]*")
# .gitignore patterns start with "/" to mean "at the repository root": they are not paths.
NOT_PATHS = {".gitignore"}

# Relative references to files of the repository, checked against the repository root.
REFERENCE = re.compile(r"(?<![\w./-])((?:docs/[\w./-]+\.md)|(?:tests/test_\w+\.py)|(?:pipelines/[\w.-]+\.toml)"
                       r"|(?:kdcache/[\w/]+\.(?:py|csv)))\b")
# A bare Markdown file name (no folder) must exist beside the file that names it or at the root,
# unless it is the name of a file a command writes.
BARE_MD = re.compile(r"(?<![\w./-])([\w-]+\.md)\b")
WRITTEN_MD = {"report.md", "bench-stores.md"}  # written by kdcache report / bench-stores into their output folders
# Markdown links: relative targets resolve from the file's own folder.
MD_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)")
# A folder beside the repository that developers have and users do not.
OUTSIDE = "../" + "shared/"


def committed_files() -> list[str]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    probe = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=ROOT, capture_output=True, text=True)
    if probe.returncode != 0 or Path(probe.stdout.strip()).resolve() != ROOT:
        pytest.skip("not a git checkout of kdcache")
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout
    return sorted({name for name in out.decode().split("\0") if name})


def text_files() -> dict[str, str]:
    texts = {}
    for name in committed_files():
        path = ROOT / name
        if not path.is_file():  # deleted in the working tree, not yet in git
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue
        texts[name] = data.decode("utf-8", errors="replace")
    return texts


def lines_of(texts: dict[str, str]):
    for name, text in texts.items():
        for number, line in enumerate(text.splitlines(), 1):
            yield name, number, line


def absolute_path_problems(texts: dict[str, str]) -> list[str]:
    problems = []
    for name, number, line in lines_of(texts):
        if Path(name).name in NOT_PATHS:
            continue
        for m in ABSOLUTE.finditer(line):
            path = m.group(0).rstrip(".:")
            if any(path == a or path.startswith(a + "/") for a in ALLOWED_ABSOLUTE):
                continue
            problems.append(f"{name}:{number}: absolute path {path!r} (use a path relative to the repository "
                            "or to the folder a command runs in)")
    return problems


def reference_problems(texts: dict[str, str]) -> list[str]:
    problems = []
    for name, number, line in lines_of(texts):
        here = (ROOT / name).parent
        for m in REFERENCE.finditer(line):
            ref = m.group(1).rstrip(".")
            if not (ROOT / ref).exists():
                problems.append(f"{name}:{number}: {ref} does not exist")
        for m in BARE_MD.finditer(line):
            ref = m.group(1)
            if ref not in WRITTEN_MD and not (here / ref).exists() and not (ROOT / ref).exists():
                problems.append(f"{name}:{number}: {ref} exists neither beside {name} nor at the root "
                                "(a page of docs/? name it by its path from the root)")
        if name.endswith(".md"):
            for m in MD_LINK.finditer(line):
                target = m.group(1)
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                    continue
                resolved = (here / target).resolve()
                if not resolved.is_relative_to(ROOT):
                    problems.append(f"{name}:{number}: link {target} points outside the repository")
                elif not resolved.exists():
                    problems.append(f"{name}:{number}: link {target} does not resolve from {here.relative_to(ROOT)}/")
        if OUTSIDE in line:
            problems.append(f"{name}:{number}: {OUTSIDE} is not part of the repository (a user's clone has no "
                            "such folder); point at docs/")
    return problems


def test_no_absolute_paths_outside_the_allow_list():
    problems = absolute_path_problems(text_files())
    assert not problems, "\n".join(problems)


def test_every_file_reference_resolves():
    problems = reference_problems(text_files())
    assert not problems, "\n".join(problems)


def test_no_lock_file_is_committed():
    locks = [name for name in committed_files() if name.endswith(".lock")]
    assert not locks, f"lock files are runtime state, never committed (git rm --cached them): {locks}"


def test_make_clean_spares_committed_files():
    """Every path `make clean` removes with rm is runtime output: none is, or holds, a tracked file."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    committed = committed_files()
    recipe = subprocess.run(["make", "-n", "clean"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    removed = []
    for command in recipe.splitlines():
        words = command.split()
        if words[:1] == ["rm"]:
            removed += [w for w in words[1:] if not w.startswith("-")]
    assert removed, f"make clean removes nothing with rm:\n{recipe}"
    hit = []
    for pattern in removed:
        for path in ROOT.glob(pattern):
            rel = path.relative_to(ROOT).as_posix()
            hit += [f for f in committed if (f == rel or f.startswith(rel + "/")) and not f.endswith(".lock")]
    assert not hit, f"make clean would delete committed files: {hit}"


def test_the_checks_catch_what_they_must():
    """The patterns fire on an absolute path, a dangling reference, a bare docs name, a broken link and
    a reference outside the repository, and stay quiet on allowed and relative ones."""
    # The sample names are assembled from pieces, so that this file passes its own checks.
    md, py = ".md", ".py"
    user_dir = "/" + "/".join(("home", "someone", "kdcache"))
    bad = {"code": f"kdcache/nope{py}", "bare": f"design{md}", "doc": f"docs/nowhere{md}",
           "test": f"tests/test_nothing_here{py}", "link": f"missing{md}"}
    texts = {
        "a.py": f'p = "{user_dir}/cache"\nq = "/usr/share/datasets/fashion-mnist/train"\n# see {bad["code"]}\n',
        "b.toml": f"# {bad['bare']} and {bad['doc']} and {bad['test']}\nreport = 'report.md'\n",
        f"docs/c{md}": f"[x]({bad['link']}) [y](../../outside{md}) [z](https://example.org/a{md}) "
                       f"{OUTSIDE}docs/m{md}\n",
        f"d{md}": "relative cache/fashion-mnist and a URL https://example.org/tmp/x and $(OUT)/tmp/y\n",
        ".gitignore": "/" + "data/\n",
    }
    absolute = absolute_path_problems(texts)
    assert len(absolute) == 1 and "a.py:1" in absolute[0] and "home" in absolute[0]
    refs = "\n".join(reference_problems(texts))
    for needle in (*bad.values(), "points outside", OUTSIDE):
        assert needle in refs, needle
    assert "report.md" not in refs and "example.org" not in refs


def test_committed_tables_hold_no_absolute_path():
    """Results tables (Parquet) keep paths relative to the repository, as reports do."""
    import pyarrow.parquet as pq

    tables = [f for f in committed_files() if f.endswith(".parquet")]
    problems = []
    for name in tables:
        for row in pq.read_table(ROOT / name).to_pylist():
            for key, value in row.items():
                if isinstance(value, str) and ABSOLUTE.search(value):
                    problems.append(f"{name}: {key} = {ABSOLUTE.search(value).group(0)}")
    assert not problems, problems[:5]
