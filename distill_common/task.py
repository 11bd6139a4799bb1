"""A task as data: labels, prompts and the answer rule, loaded from YAML into pydantic."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from distill_common.think import split_think
from distill_common.yamlfile import load_yaml_model


class TaskError(ValueError):
    """A task file is missing, unreadable or invalid; the message names the file and field."""


class InputSpec(BaseModel):
    """Which fields of an input row are used, and how rows are identified."""

    model_config = ConfigDict(extra="forbid")

    id_field: str = "id"
    label_field: str = "label"
    split_field: str = Field(
        "split",
        description="optional per-row 'train'/'test'; when every row has it, it fixes the split",
    )
    fields: list[str] = Field(min_length=1)


class AnswerRule(BaseModel):
    """How the label is read from the text after ``</think>``.

    ``exact``: the whole answer (after stripping ``strip_chars``) must be a label.
    ``first_line``: only the first non-empty line is read.
    """

    model_config = ConfigDict(extra="forbid")

    mode: Literal["exact", "first_line"] = "exact"
    strip_chars: str = " \t\r\n。.!！"


class Task(BaseModel):
    """One classification task the teacher answers with a ``<think>`` section and a label."""

    model_config = ConfigDict(extra="forbid")

    name: str
    labels: list[str] = Field(min_length=1)
    system_prompt: str = Field(min_length=1)
    user_template: str = Field(min_length=1)
    input: InputSpec
    answer: AnswerRule = AnswerRule()

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, labels: list[str]) -> list[str]:
        labels = [label.strip() for label in labels]
        if any(not label for label in labels):
            raise ValueError("labels must be non-empty strings")
        dupes = sorted({label for label in labels if labels.count(label) > 1})
        if dupes:
            raise ValueError(f"duplicate labels: {dupes}")
        return labels

    @model_validator(mode="after")
    def _template_uses_known_fields(self) -> Task:
        names = {name for _, name, _, _ in string.Formatter().parse(self.user_template) if name}
        unknown = sorted(names - set(self.input.fields))
        if unknown:
            raise ValueError(
                f"user_template names unknown field(s) {unknown}; "
                f"input.fields declares {self.input.fields}"
            )
        if not names:
            raise ValueError("user_template uses no input field, e.g. '新闻分类:{title}'")
        return self

    def render_user(self, row: dict) -> str:
        """The user message for one input row."""
        return self.user_template.format(**{f: str(row[f]).strip() for f in self.input.fields})

    def messages(self, row: dict) -> list[dict[str, str]]:
        """System + user chat messages for one input row."""
        return [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": self.render_user(row)},
        ]

    def read_label(self, answer: str) -> str | None:
        """The label an answer text names, or ``None`` if it is not one of the task's labels."""
        text = answer.strip()
        if self.answer.mode == "first_line":
            text = next((line for line in text.splitlines() if line.strip()), "")
        text = text.strip(self.answer.strip_chars)
        return text if text in self.labels else None

    def label_of(self, response: str) -> str | None:
        """The label of a whole response (reasoning + answer), or ``None``."""
        parts = split_think(response)
        return self.read_label(parts.answer) if parts.closed else None


def load_task(path: str | Path) -> Task:
    """Load and validate a task YAML; errors name the file and the offending field."""
    return load_yaml_model(
        path, Task, TaskError, what="task file", expected="a mapping of task fields"
    )
