"""GATEWAY_TASKS: which task each served model does."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from distill_common.task import TaskError
from gateway.settings import Settings
from gateway.tasks import TaskRegistry

NEWS = Path(__file__).resolve().parents[1] / "configs" / "tasks" / "news.yaml"


def test_tasks_setting_maps_models_to_task_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_TASKS", f"news-student={NEWS}, other = {NEWS}")
    registry = TaskRegistry.load(Settings().tasks)
    assert len(registry) == 2
    task = registry.get("news-student")
    assert task is not None and "财经" in task.labels
    assert registry.get("unknown") is None and registry.get(None) is None


def test_tasks_setting_rejects_an_entry_without_a_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_TASKS", "news-student")
    with pytest.raises(ValidationError, match=r"model=path/to/task\.yaml"):
        Settings()


def test_a_bad_task_file_names_the_entry(tmp_path: Path) -> None:
    bad = tmp_path / "task.yaml"
    bad.write_text("name: x\nlabels: []\n", encoding="utf-8")
    with pytest.raises(TaskError, match=r"GATEWAY_TASKS entry m=.*task.yaml"):
        TaskRegistry.load({"m": bad})
