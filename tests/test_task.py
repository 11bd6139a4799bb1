"""The task file: what loads, and the errors a user gets when it is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distill_common.task import TaskError, load_task
from distill_common.think import format_answer
from tests.conftest import NEWS_TASK


def _write(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load(NEWS_TASK.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


def test_news_task_loads_with_15_labels_and_a_worked_example(news_task):
    assert len(news_task.labels) == 15
    assert "游戏" in news_task.labels and "证券" in news_task.labels
    assert "<think>" in news_task.system_prompt and "</think>" in news_task.system_prompt
    for label in news_task.labels:
        assert label in news_task.system_prompt


def test_messages_render_the_user_template(news_task):
    msgs = news_task.messages({"id": "x", "title": "  国足主场告负  ", "label": "体育"})
    assert msgs[0] == {"role": "system", "content": news_task.system_prompt}
    assert msgs[1] == {"role": "user", "content": "新闻分类:国足主场告负"}


@pytest.mark.parametrize(
    ("answer", "label"),
    [("体育", "体育"), (" 体育。\n", "体育"), ("体育新闻", None), ("sports", None), ("", None)],
)
def test_read_label_accepts_only_task_labels(news_task, answer, label):
    assert news_task.read_label(answer) == label


def test_label_of_needs_a_closed_think(news_task):
    assert news_task.label_of(format_answer("想一想", "财经")) == "财经"
    assert news_task.label_of("<think>\n还没想完") is None
    assert news_task.label_of("财经") is None


def test_missing_field_names_file_and_field(tmp_path):
    path = _write(tmp_path, user_template=None)
    with pytest.raises(TaskError) as err:
        load_task(path)
    assert str(path) in str(err.value) and "user_template" in str(err.value)


def test_empty_label_set_is_refused(tmp_path):
    path = _write(tmp_path, labels=[])
    with pytest.raises(TaskError, match=r"field 'labels'"):
        load_task(path)


def test_template_naming_an_unknown_field_is_refused(tmp_path):
    path = _write(tmp_path, user_template="新闻分类:{headline}")
    with pytest.raises(TaskError, match=r"headline") as err:
        load_task(path)
    assert str(path) in str(err.value)


def test_duplicate_labels_are_refused(tmp_path):
    path = _write(tmp_path, labels=["体育", "体育", "财经"])
    with pytest.raises(TaskError, match="duplicate"):
        load_task(path)


def test_unreadable_and_non_mapping_files(tmp_path):
    with pytest.raises(TaskError, match="cannot read"):
        load_task(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(TaskError, match="mapping"):
        load_task(bad)
