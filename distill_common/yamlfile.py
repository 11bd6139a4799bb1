"""Config as data: read a YAML file into a pydantic model, with errors that name the file,
the line (for YAML syntax) or the field (for content) and what was expected."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def describe(err: ValidationError) -> str:
    """``field 'a.b': message; ...`` for every problem pydantic found."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        parts.append(f"field '{loc}': {'field required' if e['type'] == 'missing' else e['msg']}")
    return "; ".join(parts)


def load_yaml_model(
    path: str | Path,
    model: type[M],
    error: type[Exception],
    *,
    what: str,
    expected: str,
    prepare: Callable[[Any], Any] | None = None,
) -> M:
    """Load ``path`` as ``model``; any problem raises ``error`` naming the file.

    ``what`` names the file's role in messages ("task file"), ``expected`` describes the top
    level ("a mapping of task fields"), ``prepare`` may reshape the raw YAML first.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror}); expected {expected}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or e
        raise error(f"{path}:{where} not valid YAML ({problem})") from None
    if prepare is not None:
        raw = prepare(raw)
    if not isinstance(raw, dict):
        raise error(f"{path}: expected {expected} at the top level")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise error(f"{path}: {describe(e)}") from None
