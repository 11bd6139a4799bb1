"""Shared test fixtures. Each area keeps its fixtures in ``tests/fixtures_<area>.py``."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from distill_common.task import Task, load_task

ROOT = Path(__file__).resolve().parents[1]
NEWS_TASK = ROOT / "configs" / "tasks" / "news.yaml"
HEADLINES = ROOT / "data" / "news" / "headlines.jsonl"

pytest_plugins = sorted(f"tests.{p.stem}" for p in Path(__file__).parent.glob("fixtures_*.py"))


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_input(tmp_path: Path, n: int | None = None, start: int = 0) -> Path:
    """``n`` of the shipped headlines from ``start`` (all by default) without their fixed
    ``split`` column, written to a JSONL file: tests pick the split with ``--test-ratio``
    (and ``--test-ratio 0`` puts every row in train)."""
    lines = HEADLINES.read_text("utf-8").splitlines()[start : None if n is None else start + n]
    rows = [{k: v for k, v in json.loads(x).items() if k != "split"} for x in lines]
    path = tmp_path / f"in{n}_{start}.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


@pytest.fixture(scope="session")
def news_task() -> Task:
    return load_task(NEWS_TASK)
