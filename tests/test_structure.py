"""The repository's shape: no import cycles among our modules."""

from __future__ import annotations

from tests.imports import cycles, graph


def test_no_import_cycles():
    """No module of ours imports, directly or through others, a module that imports it back
    (function-level and type-checking imports count too)."""
    assert cycles(graph("pipeline", "gateway", "distill_common")) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
