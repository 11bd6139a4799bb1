"""Which task each served model does (``GATEWAY_TASKS``): model name -> task definition.

The task file is the same YAML that ``distill generate`` reads (labels, system prompt, user
template, answer rule). Features that need to know a model's task (system-prompt injection,
answers constrained to the label set, shadow agreement) look it up here; a model with no entry is
served untouched.
"""

from __future__ import annotations

from pathlib import Path

from distill_common.task import Task, TaskError, load_task


class TaskRegistry:
    """Tasks by served model name, loaded once at start-up."""

    def __init__(self, tasks: dict[str, Task] | None = None) -> None:
        self._tasks = dict(tasks or {})

    @classmethod
    def load(cls, files: dict[str, Path]) -> TaskRegistry:
        """Load every ``model -> task.yaml``; a bad file fails start-up with its name and field."""
        tasks = {}
        for model, path in files.items():
            try:
                tasks[model] = load_task(path)
            except TaskError as exc:
                raise TaskError(f"GATEWAY_TASKS entry {model}={path}: {exc}") from exc
        return cls(tasks)

    def get(self, model: str | None) -> Task | None:
        """The task ``model`` serves, or ``None`` when it has none."""
        return self._tasks.get(model) if model else None

    def __contains__(self, model: object) -> bool:
        return model in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)
