"""``distill eval``: score OpenAI-compatible endpoints on the held-out split.

Every endpoint (``--endpoint NAME=URL[@MODEL]``, as many as you like) is asked the same held-out
rows concurrently with the official async ``openai`` SDK. Whatever the server returns - one text
with inline ``<think>`` tags, or the reasoning split out into ``reasoning_content`` (DeepSeek,
Bailian) or ``reasoning`` (vLLM) - is rebuilt into one text with
:func:`distill_common.think.join_reasoning` and scored with the task's answer rule.

Definitions (per endpoint, over all ``n`` rows; a failed request counts as a miss everywhere):

* ``format_rate``: the response has a closed think section with non-empty reasoning, no stray or
  unclosed tags, and an answer after ``</think>`` that :meth:`Task.read_label` accepts - the shape
  the gateway and the users rely on. ``canonical_rate`` is the stricter byte-exact shape
  (:func:`distill_common.think.is_canonical` after stripping outer whitespace).
* ``accuracy``: the label read from the answer equals the gold label. The label is read after
  ``</think>``, or from the whole text when there is no think section at all (so a model that
  answers a bare label still scores); an unclosed think section has no label.
* ``macro_f1``: the mean F1 over the task labels seen in gold or predictions (like scikit-learn's
  ``average="macro"``); a missing label is a miss for the gold class, never its own class.
* ``reasoning_chars_mean``: mean reasoning length in characters over responses that have one.
* ``latency_p50_s`` / ``latency_p95_s``: wall time per request, as seen by the client.

If the rows carry ``teacher_label`` (the teacher's answer recorded at generate time) an extra
entry ``teacher`` reports the teacher on the same split without calling anything.

Outputs in ``--out``: ``summary.json``, ``report.md``, ``confusion_<name>.png`` and
``predictions_<name>.jsonl`` (each raw response, for debugging).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlparse

import typer

from distill_common.task import InputSpec, Task, TaskError, load_task
from distill_common.think import is_canonical, join_reasoning, split_think

INVALID = "(无效)"  # the confusion-matrix column for responses with no readable label
TEACHER = "teacher"


class EvalError(ValueError):
    """Bad eval input: the message names the file/argument and what was expected."""


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Endpoint:
    """One OpenAI-compatible endpoint to evaluate."""

    name: str
    base_url: str
    model: str | None = None


def parse_endpoint(spec: str) -> Endpoint:
    """Parse ``NAME=URL[@MODEL]``; a URL with no path gets ``/v1`` appended."""
    name, sep, rest = spec.partition("=")
    name = name.strip()
    if not sep or not name or not rest.strip():
        raise EvalError(
            f"--endpoint {spec!r}: expected NAME=URL[@MODEL], e.g. student=http://127.0.0.1:8000/v1@student"
        )
    if not all(c.isalnum() or c in "-_." for c in name):
        raise EvalError(f"--endpoint {spec!r}: NAME may only use letters, digits, '-', '_' and '.'")
    url, model = rest.strip(), None
    at = url.rfind("@")
    if at > url.find("://") + 2 and "/" not in url[at:]:
        url, model = url[:at], url[at + 1 :] or None
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise EvalError(f"--endpoint {spec!r}: URL must start with http:// or https://")
    if parsed.path in ("", "/"):
        url = url.rstrip("/") + "/v1"
    return Endpoint(name=name, base_url=url.rstrip("/"), model=model)


def task_from_labels(labels: list[str]) -> Task:
    """A minimal task for data evaluated without ``--task``: its labels are the gold labels."""
    return Task(
        name="from-data",
        labels=sorted(set(labels)),
        system_prompt="-",
        user_template="{instruction}",
        input=InputSpec(fields=["instruction"]),
    )


def load_rows(path: Path, task: Task | None) -> list[dict[str, Any]]:
    """Read an alpaca JSON list of held-out rows, checking the fields eval needs."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise EvalError(f"{path}: cannot read: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: not valid JSON at line {e.lineno}: {e.msg}") from e
    if not isinstance(rows, list) or not rows:
        raise EvalError(f"{path}: expected a non-empty JSON list of alpaca rows")
    for i, row in enumerate(rows):
        where = f"{path}: row {i}"
        if not isinstance(row, dict):
            raise EvalError(f"{where}: expected an object with 'instruction' and 'label'")
        for key in ("instruction", "label"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise EvalError(f"{where}: expected a non-empty string field {key!r}")
        if task is not None and row["label"] not in task.labels:
            raise EvalError(f"{where}: gold label {row['label']!r} is not one of the task's labels")
    return rows


def row_messages(row: dict[str, Any], task: Task | None) -> list[dict[str, str]]:
    """System + user messages for one alpaca row (``input`` appended as LLaMA-Factory does)."""
    user = row["instruction"]
    if row.get("input"):
        user = f"{user}\n{row['input']}"
    system = row.get("system") or (task.system_prompt if task else "")
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": user}]


# --------------------------------------------------------------------------- scoring


def response_text(message: dict[str, Any]) -> str:
    """One text from a chat message, whichever field the server put the reasoning in."""
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    return join_reasoning(reasoning, message.get("content"))


@dataclass(frozen=True)
class Scored:
    """What eval reads from one response text."""

    label: str | None
    format_ok: bool
    canonical: bool
    reasoning_chars: int | None


def score_text(text: str, task: Task) -> Scored:
    """Read the label and check the shape of one response (see the module docstring)."""
    parts = split_think(text)
    label = None
    if parts.closed or parts.reasoning is None:
        label = task.read_label(parts.answer)
    format_ok = bool(parts.closed and parts.reasoning and not parts.anomalies and label)
    reasoning = len(parts.reasoning) if parts.reasoning else None
    return Scored(label, format_ok, format_ok and is_canonical(text.strip()), reasoning)


def class_report(gold: list[str], pred: list[str | None], labels: list[str]) -> dict[str, dict]:
    """Per-label precision/recall/F1/support; 0 where undefined (scikit-learn's zero_division=0)."""
    out = {}
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, pred, strict=True))
        fp = sum(g != label and p == label for g, p in zip(gold, pred, strict=True))
        support = sum(g == label for g in gold)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return out


def macro_f1(gold: list[str], pred: list[str | None], labels: list[str]) -> float:
    """Mean F1 over the labels that occur in gold or predictions."""
    seen = [label for label in labels if label in gold or label in pred]
    if not seen:
        return 0.0
    per = class_report(gold, pred, seen)
    return sum(per[label]["f1"] for label in seen) / len(seen)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default) of ``values``; ``None`` when empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarise(records: list[dict[str, Any]], task: Task) -> dict[str, Any]:
    """The summary entry for one endpoint from its prediction records."""
    n = len(records)
    gold = [r["gold"] for r in records]
    pred = [r["pred"] for r in records]
    reasoning = [r["reasoning_chars"] for r in records if r.get("reasoning_chars")]
    latency = [r["latency_s"] for r in records if r.get("latency_s") is not None]
    per_class = class_report(gold, pred, task.labels)
    return {
        "n": n,
        "format_rate": sum(r["format_ok"] for r in records) / n,
        "canonical_rate": sum(r["canonical"] for r in records) / n,
        "accuracy": sum(g == p for g, p in zip(gold, pred, strict=True)) / n,
        "macro_f1": macro_f1(gold, pred, task.labels),
        "invalid_rate": sum(p is None for p in pred) / n,
        "errors": sum(bool(r.get("error")) for r in records),
        "reasoning_chars_mean": sum(reasoning) / len(reasoning) if reasoning else 0.0,
        "latency_p50_s": percentile(latency, 50),
        "latency_p95_s": percentile(latency, 95),
        "per_class": per_class,
    }


def teacher_records(rows: list[dict[str, Any]], task: Task) -> list[dict[str, Any]] | None:
    """Prediction records for the teacher from the rows' ``teacher_label`` (``None`` if absent)."""
    if not any("teacher_label" in row for row in rows):
        return None
    records = []
    for i, row in enumerate(rows):
        output = row.get("output") or ""
        scored = score_text(output, task) if output else None
        pred = row.get("teacher_label")
        records.append(
            {
                "index": i,
                "gold": row["label"],
                "pred": pred if pred in task.labels else None,
                "format_ok": bool(scored and scored.format_ok),
                "canonical": bool(scored and scored.canonical),
                "reasoning_chars": scored.reasoning_chars if scored else None,
                "latency_s": None,
                "text": output,
            }
        )
    return records


# --------------------------------------------------------------------------- querying


@dataclass
class QueryConfig:
    """Sampling and client settings shared by all endpoints."""

    concurrency: int = 8
    max_tokens: int | None = None
    temperature: float = 0.0
    timeout_s: float = 300.0
    api_key: str = "EMPTY"
    retries: int = 2
    extra_body: dict[str, Any] = field(default_factory=dict)


async def _resolve_model(client: Any, endpoint: Endpoint) -> str:
    if endpoint.model:
        return endpoint.model
    from openai import OpenAIError

    try:
        models = await client.models.list()
    except OpenAIError as e:
        raise EvalError(
            f"--endpoint {endpoint.name}: cannot list models at {endpoint.base_url} "
            f"({type(e).__name__}); give the model as NAME=URL@MODEL"
        ) from None
    if not models.data:
        raise EvalError(f"--endpoint {endpoint.name}: {endpoint.base_url}/models lists no model")
    return models.data[0].id


async def _query_endpoint(
    endpoint: Endpoint,
    rows: list[dict[str, Any]],
    task: Task,
    cfg: QueryConfig,
    advance: Any,
) -> list[dict[str, Any]]:
    """Ask one endpoint every row; return one prediction record per row, in row order."""
    from openai import AsyncOpenAI, OpenAIError

    client = AsyncOpenAI(
        base_url=endpoint.base_url,
        api_key=cfg.api_key,
        timeout=cfg.timeout_s,
        max_retries=cfg.retries,
    )
    try:
        model = await _resolve_model(client, endpoint)
        gate = asyncio.Semaphore(cfg.concurrency)
        params: dict[str, Any] = {"temperature": cfg.temperature}
        if cfg.max_tokens:
            params["max_tokens"] = cfg.max_tokens
        if cfg.extra_body:
            params["extra_body"] = cfg.extra_body

        async def one(i: int, row: dict[str, Any]) -> dict[str, Any]:
            record: dict[str, Any] = {"index": i, "gold": row["label"], "model": model}
            async with gate:
                start = time.perf_counter()
                try:
                    resp = await client.chat.completions.create(
                        model=model, messages=row_messages(row, task), **params
                    )
                    message = resp.choices[0].message.model_dump()
                    record["latency_s"] = time.perf_counter() - start
                    record["finish_reason"] = resp.choices[0].finish_reason
                    record["message"] = {
                        k: message.get(k)
                        for k in ("content", "reasoning_content", "reasoning")
                        if message.get(k) is not None
                    }
                    text = response_text(message)
                except OpenAIError as e:  # recorded and scored as a miss; the run goes on
                    record["latency_s"] = None
                    record["error"] = f"{type(e).__name__}: {e}"
                    text = ""
            scored = score_text(text, task)
            record.update(
                text=text,
                pred=scored.label,
                format_ok=scored.format_ok,
                canonical=scored.canonical,
                reasoning_chars=scored.reasoning_chars,
            )
            advance()
            return record

        return list(await asyncio.gather(*(one(i, row) for i, row in enumerate(rows))))
    finally:
        await client.close()


async def query_all(
    endpoints: list[Endpoint], rows: list[dict[str, Any]], task: Task, cfg: QueryConfig
) -> dict[str, list[dict[str, Any]]]:
    """Query all endpoints concurrently behind one rich progress display."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ) as progress:
        jobs = []
        for ep in endpoints:
            tid = progress.add_task(f"eval {ep.name}", total=len(rows))
            jobs.append(_query_endpoint(ep, rows, task, cfg, lambda t=tid: progress.advance(t)))
        results = await asyncio.gather(*jobs)
    return {ep.name: res for ep, res in zip(endpoints, results, strict=True)}


# --------------------------------------------------------------------------- outputs


def cjk_font() -> str | None:
    """A font family that has Chinese glyphs, registered with matplotlib; ``None`` if none."""
    from matplotlib import font_manager

    try:
        out = subprocess.run(
            ["fc-list", ":lang=zh", "file"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    paths = sorted(line.split(":")[0].strip() for line in out.splitlines() if line.strip())
    # Prefer a sans-serif regular face (reads best in small tick labels).
    paths.sort(key=lambda p: ("Sans" not in p, "Regular" not in p and "-" in Path(p).stem, p))
    for path in paths:
        try:
            font_manager.fontManager.addfont(path)
            return font_manager.FontProperties(fname=path).get_name()
        except (OSError, RuntimeError, ValueError):
            continue
    hints = ("CJK", "Hei", "WenQuanYi", "Song", "Kai", "Ming", "Droid Sans Fallback")
    for font in font_manager.fontManager.ttflist:
        if any(h in font.name for h in hints):
            return font.name
    return None


def plot_confusion(
    records: list[dict[str, Any]], labels: list[str], title: str, path: Path, font: str | None
) -> None:
    """Confusion matrix PNG: gold rows, predicted columns (+ one for no readable label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols = [*labels, INVALID if font else "invalid"]
    index = {label: i for i, label in enumerate(labels)}
    counts = np.zeros((len(labels), len(cols)), dtype=int)
    for r in records:
        if r["gold"] in index:
            counts[index[r["gold"]], index.get(r["pred"], len(labels))] += 1
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)

    rc = {"font.family": [font, "DejaVu Sans"]} if font else {}
    with plt.rc_context(rc), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # missing glyphs when no CJK font exists
        size = max(6.0, 0.5 * len(cols) + 2)
        fig, ax = plt.subplots(figsize=(size + 1, size))
        im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.axvline(len(labels) - 0.5, color="grey", linewidth=0.8)
        ax.set_xlabel(f"predicted  (last column {cols[-1]}: no valid label)")
        ax.set_ylabel("gold")
        ax.set_title(title)
        for (i, j), c in np.ndenumerate(counts):
            if c:
                color = "white" if share[i, j] > 0.5 else "black"
                ax.text(j, i, str(c), ha="center", va="center", color=color, fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of gold row")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


COLUMNS = [
    ("n", "n"),
    ("format_rate", "format"),
    ("canonical_rate", "canonical"),
    ("accuracy", "accuracy"),
    ("macro_f1", "macro-F1"),
    ("reasoning_chars_mean", "reasoning chars"),
    ("latency_p50_s", "p50 s"),
    ("latency_p95_s", "p95 s"),
    ("errors", "errors"),
]


def render_report(summary: dict[str, dict], data: Path, labels: list[str]) -> str:
    """The markdown report: a comparison table, then per-class tables."""
    lines = [
        "# Evaluation report",
        "",
        f"Held-out data: `{data}` ({next(iter(summary.values()))['n']} rows).",
        "",
        "| endpoint | " + " | ".join(title for _, title in COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for name, s in summary.items():
        digits = {"reasoning_chars_mean": 0}
        cells = [_fmt(s.get(key), digits.get(key, 3)) for key, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "*format*: closed `<think>` with non-empty reasoning and a valid label after it; "
        "*canonical*: byte-exact `<think>\\n…\\n</think>\\n\\n<label>`; "
        "*accuracy*/*macro-F1* against the gold labels.",
    ]
    for name, s in summary.items():
        lines += ["", f"## {name}", ""]
        lines += [f"![confusion matrix {name}](confusion_{name}.png)", ""]
        lines += ["| label | support | precision | recall | F1 |", "|---|---:|---:|---:|---:|"]
        for label in labels:
            c = s["per_class"][label]
            lines.append(
                f"| {label} | {c['support']} | {_fmt(c['precision'])} | {_fmt(c['recall'])} "
                f"| {_fmt(c['f1'])} |"
            )
    return "\n".join(lines) + "\n"


def print_table(summary: dict[str, dict]) -> None:
    """Print the comparison table with rich."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 120))  # logs and CI: don't squeeze the table
    table = Table(title="evaluation")
    table.add_column("endpoint", no_wrap=True)
    for _, title in COLUMNS:
        table.add_column(title, justify="right")
    for name, s in summary.items():
        digits = {"reasoning_chars_mean": 0}
        table.add_row(name, *(_fmt(s.get(k), digits.get(k, 3)) for k, _ in COLUMNS))
    console.print(table)


def write_outputs(
    out: Path,
    data: Path,
    task: Task,
    records: dict[str, list[dict[str, Any]]],
    models: dict[str, str],
) -> dict[str, dict]:
    """Write summary.json, report.md, predictions and confusion PNGs; return the summary."""
    out.mkdir(parents=True, exist_ok=True)
    font = cjk_font()
    if font is None:
        warnings.warn(
            "no CJK font found (fc-list :lang=zh is empty): Chinese labels in the confusion "
            "matrices will not render; install fonts-noto-cjk",
            stacklevel=2,
        )
    summary = {}
    for name, recs in records.items():
        summary[name] = summarise(recs, task)
        if name in models:
            summary[name]["model"] = models[name]
        with (out / f"predictions_{name}.jsonl").open("w", encoding="utf-8") as f:
            for r in recs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        s = summary[name]
        title = f"{name}: accuracy {s['accuracy']:.2f}, format {s['format_rate']:.2f}, n={s['n']}"
        plot_confusion(recs, task.labels, title, out / f"confusion_{name}.png", font)
    (out / "summary.json").write_text(
        json.dumps(summary, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    (out / "report.md").write_text(render_report(summary, data, task.labels), encoding="utf-8")
    return summary


def evaluate(
    endpoints: list[Endpoint],
    data: Path,
    out: Path,
    task: Task | None = None,
    cfg: QueryConfig | None = None,
) -> dict[str, dict]:
    """Evaluate the endpoints on ``data`` and write everything to ``out``; return the summary."""
    names = [ep.name for ep in endpoints]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise EvalError(f"--endpoint names must be unique; repeated: {dupes}")
    rows = load_rows(data, task)
    task = task or task_from_labels([row["label"] for row in rows])
    cfg = cfg or QueryConfig()
    records = asyncio.run(query_all(endpoints, rows, task, cfg)) if endpoints else {}
    models = {name: recs[0]["model"] for name, recs in records.items() if recs}
    teacher = teacher_records(rows, task)
    if teacher is not None and TEACHER not in records:
        records[TEACHER] = teacher
    if not records:
        raise EvalError("nothing to evaluate: give --endpoint NAME=URL[@MODEL]")
    return write_outputs(out, data, task, records, models)


# --------------------------------------------------------------------------- command


def eval_cmd(
    endpoint: Annotated[
        list[str],
        typer.Option(help="NAME=URL[@MODEL], repeatable; MODEL defaults to the first /v1/models"),
    ],
    data: Annotated[Path, typer.Option(help="held-out alpaca JSON (e.g. DIR/test.json)")],
    out: Annotated[Path, typer.Option(help="output directory")],
    task: Annotated[
        Path | None, typer.Option(help="task YAML (labels, answer rule); default: gold labels")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="requests in flight per endpoint")] = 8,
    max_tokens: Annotated[
        int | None, typer.Option(min=1, help="max new tokens (default: the server's)")
    ] = None,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
    timeout: Annotated[float, typer.Option(min=1.0, help="seconds per request")] = 300.0,
    retries: Annotated[int, typer.Option(min=0, help="SDK retries on 429/5xx/timeouts")] = 2,
    api_key_env: Annotated[
        str | None, typer.Option(help="environment variable holding the API key")
    ] = None,
    extra_body: Annotated[
        str | None,
        typer.Option(help="JSON merged into each request body, e.g. '{\"top_k\": 1}'"),
    ] = None,
) -> None:
    """Evaluate OpenAI-compatible endpoints on the held-out split: format, accuracy, F1, latency."""
    try:
        endpoints = [parse_endpoint(spec) for spec in endpoint]
        loaded_task = load_task(task) if task else None
        api_key = "EMPTY"
        if api_key_env:
            api_key = os.environ.get(api_key_env, "")
            if not api_key:
                raise EvalError(f"--api-key-env {api_key_env}: that environment variable is empty")
        body = {}
        if extra_body:
            try:
                body = json.loads(extra_body)
            except json.JSONDecodeError as e:
                raise EvalError(f"--extra-body: not valid JSON: {e.msg}") from e
            if not isinstance(body, dict):
                raise EvalError("--extra-body: expected a JSON object")
        cfg = QueryConfig(
            concurrency, max_tokens, temperature, timeout, api_key, retries, extra_body=body
        )
        summary = evaluate(endpoints, data, out, loaded_task, cfg)
    except (EvalError, TaskError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    print_table(summary)
    for name, s in summary.items():
        if s["errors"]:
            first = next(
                json.loads(line)["error"]
                for line in (out / f"predictions_{name}.jsonl").open(encoding="utf-8")
                if json.loads(line).get("error")
            )
            typer.echo(
                f"warning: {name}: {s['errors']} of {s['n']} requests failed; first: {first}"
            )
    typer.echo(f"report: {out / 'report.md'}")
    typer.echo(f"confusion matrices: {out}/confusion_*.png")
    dead = [name for name, s in summary.items() if s["errors"] == s["n"]]
    if dead:
        typer.echo(f"error: every request failed for {', '.join(dead)}", err=True)
        raise typer.Exit(1)
