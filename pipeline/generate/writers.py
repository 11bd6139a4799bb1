"""Write the generate stage's files: alpaca JSON, sharegpt JSONL, dataset_info, rejects, stats,
and a ready LLaMA-Factory training config.

Every file is written whole to a temporary file and renamed into place, so a killed run never
leaves a half-written output; content is ordered by input order, so a resumed run writes the
same bytes as an uninterrupted one. The data files get the permissions any normal write would
(0666 minus the umask), so a trainer running as another user can read them; only files marked
private (the ledger, see ledger.py) stay 0600.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TRAIN = "train.json"
TEST = "test.json"
SHAREGPT = "train.sharegpt.jsonl"
DATASET_INFO = "dataset_info.json"
REJECTS = "rejects.jsonl"
STATS = "stats.json"
LLAMAFACTORY_YAML = "llamafactory_sft.yaml"

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read without changing it where Linux allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # elsewhere the only way to read it is to set it and put it back
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write(path: Path, text: str, *, private: bool = False) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder and an atomic rename.

    The file ends up 0666 minus the umask (``mkstemp`` alone would leave every file 0600), or
    0600 when ``private``.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600 if private else 0o666 & ~current_umask())
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
    """LLaMA-Factory's ``dataset_info.json`` for the files written here.

    ``<task>_train`` trains with the task's system prompt; ``<task>_train_bare`` is the same
    file without the system column, so each example renders as a bare client request does
    (the chat template's own default system line, the user message, the answer). The held-out
    split is listed only as ``<task>_test_eval_only``, a name nobody puts in a training list by
    accident.
    """
    bare_columns = {"prompt": "instruction", "query": "input", "response": "output"}
    alpaca_columns = {**bare_columns, "system": "system"}
    return {
        f"{task_name}_train": {"file_name": TRAIN, "columns": alpaca_columns},
        f"{task_name}_train_bare": {"file_name": TRAIN, "columns": bare_columns},
        f"{task_name}_test_eval_only": {"file_name": TEST, "columns": alpaca_columns},
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
    llamafactory: str | None = None,
) -> None:
    """Write all output files atomically (stats last: its presence marks a finished write)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in (TRAIN, TEST, SHAREGPT, DATASET_INFO, REJECTS, LLAMAFACTORY_YAML, STATS):
        for stale in out.glob(f".{name}.*.tmp"):  # left by a run killed mid-write
            stale.unlink(missing_ok=True)
    atomic_write(out / TRAIN, _json(train))
    atomic_write(out / TEST, _json(test))
    atomic_write(out / SHAREGPT, _jsonl(sharegpt))
    atomic_write(out / DATASET_INFO, _json(dataset_info(task_name)))
    atomic_write(out / REJECTS, _jsonl(rejects))
    if llamafactory is not None:
        atomic_write(out / LLAMAFACTORY_YAML, llamafactory)
    atomic_write(out / STATS, _json(stats))
