"""Read task inputs from JSONL or CSV, validate them against the task, de-duplicate, split."""

from __future__ import annotations

import csv
import hashlib
import json
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from distill_common.task import Task


class InputError(ValueError):
    """A bad input file; the message reads ``file:line: what was expected``."""


@dataclass(frozen=True)
class InputRow:
    """One validated input: its id, the original record, its gold label and where it came from."""

    id: str
    record: dict[str, Any]
    gold: str | None
    line: int
    split: str = "train"
    fixed_split: str | None = None  # from the input's split field, when it has one
    messages: list[dict[str, str]] = field(default_factory=list, compare=False)


@dataclass
class Inputs:
    rows: list[InputRow]
    duplicates: int = 0


def _records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) pairs; line numbers are 1-based physical lines."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise InputError(f"{path}: cannot read input file: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    out: list[tuple[int, dict[str, Any]]] = []
    if path.suffix.lower() in {".csv", ".tsv"}:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        reader = csv.DictReader(text.splitlines(keepends=True), delimiter=delimiter)
        if not reader.fieldnames:
            raise InputError(f"{path}:1: expected a header row naming the columns")
        for record in reader:
            line = reader.line_num
            if None in record:
                raise InputError(f"{path}:{line}: more cells than the header has columns")
            out.append((line, {k: v for k, v in record.items() if v is not None}))
        return out
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise InputError(
                f"{path}:{line}: expected one JSON object per line ({e.msg} at column {e.colno})"
            ) from None
        if not isinstance(record, dict):
            raise InputError(f"{path}:{line}: expected a JSON object, got {type(record).__name__}")
        out.append((line, record))
    return out


def _norm(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def read_inputs(path: str | Path, task: Task, *, require_gold: bool = False) -> Inputs:
    """Read and validate every row; drop exact duplicates (same rendered user message).

    Errors name the file and line: malformed JSON, a missing or empty field, a gold label
    outside the task's label set, the same id used for two different inputs.
    """
    path = Path(path)
    spec = task.input
    rows: list[InputRow] = []
    seen_text: dict[str, int] = {}
    seen_id: dict[str, int] = {}
    duplicates = 0
    for line, record in _records(path):
        for name in spec.fields:
            value = record.get(name)
            if value is None or not str(value).strip():
                what = "missing" if name not in record else "empty"
                raise InputError(f"{path}:{line}: {what} field '{name}' (task input.fields)")
        gold = record.get(spec.label_field)
        gold = str(gold).strip() if gold is not None and str(gold).strip() else None
        if gold is not None and gold not in task.labels:
            raise InputError(
                f"{path}:{line}: unknown gold label {gold!r} in field '{spec.label_field}'; "
                f"expected one of {task.labels}"
            )
        if gold is None and require_gold:
            raise InputError(
                f"{path}:{line}: missing gold label field '{spec.label_field}' "
                "(needed by --require-gold-match)"
            )
        fixed_split = _fixed_split(path, line, record, spec.split_field)
        messages = task.messages(record)
        text = _norm(messages[-1]["content"])
        raw_id = record.get(spec.id_field)
        row_id = (
            str(raw_id).strip()
            if raw_id is not None and str(raw_id).strip()
            else hashlib.sha256(text.encode()).hexdigest()[:16]
        )
        if text in seen_text:
            duplicates += 1
            continue
        if row_id in seen_id:
            raise InputError(
                f"{path}:{line}: duplicate id {row_id!r} for a different input "
                f"(first seen on line {seen_id[row_id]}); expected unique '{spec.id_field}' values"
            )
        seen_text[text] = line
        seen_id[row_id] = line
        row = InputRow(row_id, record, gold, line, fixed_split=fixed_split, messages=messages)
        rows.append(row)
    if not rows:
        raise InputError(f"{path}: no input rows found")
    _check_split_all_or_none(path, rows, spec.split_field)
    return Inputs(rows, duplicates)


SPLITS = ("train", "test")


def _fixed_split(path: Path, line: int, record: dict[str, Any], name: str) -> str | None:
    value = record.get(name)
    if value is None:
        return None
    if value not in SPLITS:
        raise InputError(f"{path}:{line}: field '{name}' is {value!r}; expected 'train' or 'test'")
    return value


def _check_split_all_or_none(path: Path, rows: list[InputRow], name: str) -> None:
    """A split given for some rows but not others is ambiguous: refuse it."""
    given = [r for r in rows if r.fixed_split is not None]
    if given and len(given) < len(rows):
        missing = next(r for r in rows if r.fixed_split is None)
        raise InputError(
            f"{path}:{missing.line}: no '{name}' field, but {len(given)} other rows have one; "
            f"expected every row to name its split ('train' or 'test') or none"
        )


def split_rows(rows: list[InputRow], *, test_ratio: float, seed: int) -> list[InputRow]:
    """Mark a stratified, seeded share of rows as ``test`` (by gold label), in input order.

    Which rows are held out depends only on their ids, gold labels and the seed — never on
    the teacher — so the held-out set is the same whatever the teacher got right. Rows that
    name their split (the task's ``split_field``) keep it: adding training rows to such a
    file never moves a held-out row.
    """
    if not 0 <= test_ratio < 1:
        raise ValueError(f"test ratio must be in [0, 1), got {test_ratio}")
    if rows and all(r.fixed_split for r in rows):
        return [replace(r, split=r.fixed_split) for r in rows]
    strata: dict[str, list[InputRow]] = defaultdict(list)
    for row in rows:
        strata[row.gold or ""].append(row)
    test_ids: set[str] = set()
    for members in strata.values():
        ranked = sorted(members, key=lambda r: hashlib.sha256(f"{seed}:{r.id}".encode()).digest())
        test_ids.update(r.id for r in ranked[: int(len(members) * test_ratio + 0.5)])
    return [replace(r, split="test" if r.id in test_ids else "train") for r in rows]
