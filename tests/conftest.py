"""Shared test fixtures. Each area keeps its fixtures in ``tests/fixtures_<area>.py``."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from pipeline.task import Task, load_task

ROOT = Path(__file__).resolve().parents[1]
NEWS_TASK = ROOT / "configs" / "tasks" / "news.yaml"
HEADLINES = ROOT / "data" / "news" / "headlines.jsonl"

pytest_plugins = sorted(f"tests.{p.stem}" for p in Path(__file__).parent.glob("fixtures_*.py"))


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def news_task() -> Task:
    return load_task(NEWS_TASK)
