"""``distill generate --import-shadow FILE``: the gateway's shadow answers into the request ledger.

Each row of the flywheel JSONL is an input row (the task's fields) plus ``shadow``: the teacher
model, the sampling parameters and the teacher's raw answer. The row's ledger key is computed
exactly as ``generate`` computes it (:func:`pipeline.generate.ledger.request_key` over the
messages :func:`pipeline.generate.inputs.read_inputs` renders, sample 0), so a later
``generate`` over the same inputs finds the answer and sends nothing for it. An answer from
another teacher model or with other sampling parameters than this run's is not imported: it
would stand for a request this run never makes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import orjson

from distill_common.task import load_task
from pipeline.generate.inputs import InputError, read_inputs
from pipeline.generate.ledger import Ledger, request_key
from pipeline.generate.runner import LEDGER, GenerateOptions


@dataclass
class ImportCounts:
    imported: int = 0
    already: int = 0  # the ledger already held an answer under that key
    other_teacher: int = 0  # teacher model or sampling parameters differ from this run's
    no_answer: int = 0  # a row without a ``shadow.response``

    def line(self) -> str:
        return (
            f"imported {self.imported}, already in the ledger {self.already}, "
            f"other teacher/params {self.other_teacher}, without an answer {self.no_answer}"
        )


def _shadows(path: Path) -> list[dict | None]:
    """Each non-empty line's ``shadow`` object (``None`` where it has none), in file order."""
    out: list[dict | None] = []
    for n, raw in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            shadow = orjson.loads(raw).get("shadow")
        except (orjson.JSONDecodeError, AttributeError):
            raise InputError(f"{path}:{n}: expected one JSON object per line") from None
        out.append(shadow if isinstance(shadow, dict) else None)
    return out


def import_shadow(opts: GenerateOptions, path: Path) -> ImportCounts:
    """Put every usable teacher answer in ``path`` into ``opts.out``'s ledger."""
    path = Path(path)
    task = load_task(opts.task)
    inputs = read_inputs(path, task)
    shadows = _shadows(path)
    # read_inputs keeps file order and drops exact duplicates; match rows by line number.
    text = path.read_text(encoding="utf-8-sig")
    lines = [n for n, raw in enumerate(text.splitlines(), start=1) if raw.strip()]
    by_line = dict(zip(lines, shadows, strict=True))
    model = opts.teachers.key_model
    counts = ImportCounts()
    ledger = Ledger(opts.out / LEDGER)
    try:
        stored = ledger.load()
        for row in inputs.rows:
            shadow = by_line.get(row.line)
            response = shadow.get("response") if shadow else None
            if not isinstance(response, dict):
                counts.no_answer += 1
                continue
            if shadow.get("teacher_model") != model or shadow.get("params") != opts.params:
                counts.other_teacher += 1
                continue
            key = request_key(row.messages, model, opts.params, 0)
            if key in stored and stored[key].ok:
                counts.already += 1
                continue
            ledger.put(
                key,
                row_id=row.id,
                sample=0,
                status="ok",
                response=response,
                endpoint="shadow",
                attempts=1,
            )
            counts.imported += 1
    finally:
        ledger.close()
    return counts
