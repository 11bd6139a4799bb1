"""The repository's shape: no import cycles among our modules, and the docs name only files and
modules that exist."""

from __future__ import annotations

import re

import pytest

from tests.conftest import ROOT
from tests.imports import cycles, graph

PACKAGES = ("pipeline", "gateway", "distill_common")


def test_no_import_cycles():
    """No module of ours imports, directly or through others, a module that imports it back
    (function-level and type-checking imports count too)."""
    assert cycles(graph(*PACKAGES)) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


# A repository path: starts with one of our top-level folders (run-time paths such as runs/…
# and /runs/… do not); <placeholders> and * stand for any name.
TOPS = "|".join((*PACKAGES, "configs", "images", "compose", "tests", "bench", "data", "mk", "docs"))
REPO_PATH = re.compile(rf"(?<![\w/.-])(?:\./)?((?:{TOPS})/[\w./<>*-]*)")
MODULE = re.compile(rf"(?<![\w/.-])((?:{'|'.join(PACKAGES)})(?:\.[A-Za-z_]\w*)+)")
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def missing_paths(text: str) -> list[str]:
    out = []
    for match in REPO_PATH.finditer(text):
        path = match[1].rstrip(".,:;")
        if not any(ROOT.glob(re.sub(r"<[^>]*>", "*", path).rstrip("/"))):
            out.append(path)
    return out


def missing_modules(text: str) -> list[str]:
    """Dotted names whose module (the first two parts, e.g. ``pipeline.cli``) is not ours."""
    out = []
    for match in MODULE.finditer(text):
        base = ROOT.joinpath(*match[1].split(".")[:2])
        if not (base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()):
            out.append(match[1])
    return out


@pytest.mark.parametrize("doc", DOCS)
def test_docs_name_only_files_and_modules_that_exist(doc):
    text = (ROOT / doc).read_text(encoding="utf-8")
    assert missing_paths(text) == [] and missing_modules(text) == []


def test_the_docs_check_sees_a_missing_file_or_module():
    text = "see `pipeline/think.py`, pipeline.think.split_think, configs/train/*.yaml, runs/x"
    assert missing_paths(text) == ["pipeline/think.py"]
    assert missing_modules(text) == ["pipeline.think.split_think"]
    assert missing_paths("images/<stage>/Dockerfile and docs/design.md.") == []


def test_the_readme_points_to_the_design_notes():
    assert "docs/design.md" in (ROOT / "README.md").read_text(encoding="utf-8")
