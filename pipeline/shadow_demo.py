"""The demo's shadow stage: is the student still good, measured live at the gateway?

The gateway (``python -m gateway``, as its image runs it) fronts the demo student's vLLM with
the stand-in teacher as shadow at rate 1.0; the held-out rows go through it in a burst, the
gateway's ``gateway_shadow_total`` counts are read from ``/metrics`` and printed beside the
offline figure: eval's student predictions against the teacher labels generate recorded for the
same rows. Both read labels with the task's answer rule, so they must match.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import orjson

from distill_common.task import Task, load_task
from pipeline.evaluate import load_rows, row_messages
from pipeline.serve import running_gateway

COUNTED = ("agree", "disagree", "student_invalid")


def offline_counts(test_json: Path, predictions: Path, task: Task) -> dict[str, int]:
    """Outcomes per row from eval's student predictions and generate's ``teacher_label``."""
    rows = load_rows(test_json, task)
    preds = {}
    for line in predictions.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        preds[rec["index"]] = rec.get("pred")
    counts = dict.fromkeys((*COUNTED, "teacher_invalid"), 0)
    for i, row in enumerate(rows):
        teacher, student = row.get("teacher_label"), preds.get(i)
        if teacher not in task.labels:
            counts["teacher_invalid"] += 1
        elif student not in task.labels:
            counts["student_invalid"] += 1
        else:
            counts["agree" if student == teacher else "disagree"] += 1
    return counts


def agreement(counts: dict[str, int]) -> float | None:
    """agree / (agree + disagree + student_invalid): as the dashboard and the alert compute it."""
    n = sum(counts.get(k, 0) for k in COUNTED)
    return counts.get("agree", 0) / n if n else None


def _live_counts(root: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in httpx.get(root + "/metrics", timeout=10).text.splitlines():
        if line.startswith("gateway_shadow_total{"):
            outcome = line.split('outcome="')[1].split('"')[0]
            counts[outcome] = counts.get(outcome, 0) + int(float(line.rsplit(" ", 1)[1]))
    return counts


async def _burst(base_url: str, rows: list[dict], task: Task, max_tokens: int) -> None:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="demo", max_retries=2, timeout=300)
    gate = asyncio.Semaphore(16)

    async def one(row: dict) -> None:
        async with gate:
            await client.chat.completions.create(
                model="student",
                messages=row_messages(row, task, bare=True),  # as clients ask
                temperature=0.0,  # as eval asks
                max_tokens=max_tokens,
            )

    try:
        await asyncio.gather(*(one(r) for r in rows))
    finally:
        await client.close()


def run_shadow_demo(
    *,
    task_path: Path,
    test_json: Path,
    predictions: Path,
    student_url: str,
    teacher_url: str,
    teacher_model: str,
    max_tokens: int,
    out: Path,
    port: int,
    gateway_env: dict[str, str] | None = None,
) -> tuple[dict[str, int], dict[str, int]]:
    """Serve the student behind a shadowing gateway (with any other ``GATEWAY_*`` settings in
    ``gateway_env``), send the held-out rows; (live, offline)."""
    task = load_task(task_path)
    rows = load_rows(test_json, task)
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **(gateway_env or {}),
        "GATEWAY_SHADOW_TEACHER": f"url={teacher_url},model={teacher_model}",
        "GATEWAY_SHADOW_RATE": "1.0",
        "GATEWAY_SHADOW_MAX_RPM": "100000",
        "GATEWAY_SHADOW_MAX_IN_FLIGHT": "8",
        "GATEWAY_SHADOW_QUEUE": str(len(rows) + 16),
        "GATEWAY_SHADOW_LOG": str(out / "flywheel.jsonl"),
    }
    log = out / "gateway.log"
    with running_gateway(student_url, {"student": task_path}, port, log, env) as base_url:
        asyncio.run(_burst(base_url, rows, task, max_tokens))
        root = base_url.removesuffix("/v1")
        deadline = time.monotonic() + 300
        while sum((live := _live_counts(root)).values()) < len(rows):
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
    live = {k: v for k, v in live.items() if v}
    return live, offline_counts(test_json, predictions, task)


def print_shadow(live: dict[str, int], offline: dict[str, int], flywheel: Path) -> bool:
    """Print both figures; True when they match."""
    from rich.console import Console

    console = Console()
    a_live, a_off = agreement(live), agreement(offline)
    same = all(live.get(k, 0) == offline.get(k, 0) for k in (*COUNTED, "teacher_invalid"))
    mark = "[green]✓ match[/]" if same else "[red]✗ differ[/]"

    def fmt(a: float | None, c: dict[str, int]) -> str:
        shown = ", ".join(f"{k} {c.get(k, 0)}" for k in (*COUNTED, "teacher_invalid"))
        return f"{'-' if a is None else f'{a:.3f}'} ({shown})"

    console.print(f"shadow agreement, live at the gateway: {fmt(a_live, live)}")
    console.print(f"student vs teacher, offline eval:      {fmt(a_off, offline)}  {mark}")
    if live.get("teacher_error") or live.get("dropped"):
        console.print(f"[yellow]also: {orjson.dumps(live).decode()}[/]")
    console.print(f"flywheel (disagreements, mode 0600): {flywheel}")
    return same
