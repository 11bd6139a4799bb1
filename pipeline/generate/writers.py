"""Write the generate stage's files: alpaca JSON, sharegpt JSONL, dataset_info, rejects, stats.

Every file is written whole to a temporary file and renamed into place, so a killed run never
leaves a half-written output; content is ordered by input order, so a resumed run writes the
same bytes as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TRAIN = "train.json"
TEST = "test.json"
SHAREGPT = "train.sharegpt.jsonl"
DATASET_INFO = "dataset_info.json"
REJECTS = "rejects.jsonl"
STATS = "stats.json"


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder and an atomic rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=2) + "\n"


def _jsonl(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def alpaca_record(
    row_id: str, messages: list[dict[str, str]], output: str, label: str | None, **extra: Any
) -> dict[str, Any]:
    """One alpaca row: ``instruction`` is the rendered user message, ``input`` stays empty."""
    return {
        "id": row_id,
        "system": messages[0]["content"],
        "instruction": messages[-1]["content"],
        "input": "",
        "output": output,
        "label": label,
        **extra,
    }


def sharegpt_record(row_id: str, messages: list[dict[str, str]], output: str, label: str) -> dict:
    """One messages-format row: system, user, assistant."""
    return {
        "id": row_id,
        "label": label,
        "messages": [*messages, {"role": "assistant", "content": output}],
    }


def dataset_info(task_name: str) -> dict[str, Any]:
    """LLaMA-Factory's ``dataset_info.json`` for the files written here."""
    alpaca_columns = {
        "prompt": "instruction",
        "query": "input",
        "response": "output",
        "system": "system",
    }
    return {
        f"{task_name}_train": {"file_name": TRAIN, "columns": alpaca_columns},
        f"{task_name}_test": {"file_name": TEST, "columns": alpaca_columns},
        f"{task_name}_train_sharegpt": {
            "file_name": SHAREGPT,
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "system_tag": "system",
            },
        },
    }


def write_outputs(
    out: Path,
    *,
    task_name: str,
    train: list[dict[str, Any]],
    test: list[dict[str, Any]],
    sharegpt: list[dict[str, Any]],
    rejects: list[dict[str, Any]],
    stats: dict[str, Any],
) -> None:
    """Write all output files atomically (stats last: its presence marks a finished write)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in (TRAIN, TEST, SHAREGPT, DATASET_INFO, REJECTS, STATS):
        for stale in out.glob(f".{name}.*.tmp"):  # left by a run killed mid-write
            stale.unlink(missing_ok=True)
    atomic_write(out / TRAIN, _json(train))
    atomic_write(out / TEST, _json(test))
    atomic_write(out / SHAREGPT, _jsonl(sharegpt))
    atomic_write(out / DATASET_INFO, _json(dataset_info(task_name)))
    atomic_write(out / REJECTS, _jsonl(rejects))
    atomic_write(out / STATS, _json(stats))
