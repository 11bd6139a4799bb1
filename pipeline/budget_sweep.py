"""``distill eval --reasoning-budget none,8,16,…,unlimited``: the reasoning-budget curve.

Each budget is one full evaluation of every endpoint, asked as clients ask (the user message
alone, no system prompt) (through the gateway, which enforces the
budget: ``max_reasoning_tokens``; ``none`` is 0, ``unlimited`` sends no budget), written to
``OUT/budget-<b>/``. The sweep writes ``OUT/budget.json`` (per endpoint and budget: accuracy,
format rate, label rate, p50 latency, mean reasoning tokens from ``usage``), ``OUT/budget.md``
and ``OUT/budget.png`` (accuracy, format and p50 latency against the budget, one line per
endpoint).
"""

from __future__ import annotations

import asyncio
import json
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

from distill_common.task import Task
from pipeline.evaluate import (
    BARE,
    Endpoint,
    EvalError,
    QueryConfig,
    load_rows,
    query_all,
    task_from_labels,
    write_outputs,
)

UNLIMITED = "unlimited"
NONE = "none"
METRICS = ("accuracy", "format_rate", "label_rate", "latency_p50_s", "reasoning_tokens_mean")


def parse_budgets(spec: str) -> list[int | None]:
    """``none,8,16,unlimited`` -> ``[0, 8, 16, None]`` (in the order given, no repeats)."""
    out: list[int | None] = []
    for part in (p.strip().lower() for p in spec.split(",")):
        if not part:
            continue
        if part == NONE:
            value: int | None = 0
        elif part == UNLIMITED:
            value = None
        elif part.isdigit():
            value = int(part)
        else:
            raise EvalError(
                f"--reasoning-budget {spec!r}: {part!r} is not a number of tokens, "
                f"'{NONE}' or '{UNLIMITED}'"
            )
        if value in out:
            raise EvalError(f"--reasoning-budget {spec!r}: {part!r} is given twice")
        out.append(value)
    if not out:
        raise EvalError(f"--reasoning-budget {spec!r}: no budget given")
    return out


def budget_name(budget: int | None) -> str:
    return UNLIMITED if budget is None else NONE if budget == 0 else str(budget)


def budget_fields(budget: int | None) -> dict[str, Any]:
    """The request fields that ask the gateway for ``budget``."""
    return {} if budget is None else {"max_reasoning_tokens": budget}


def point(summary: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """One endpoint at one budget: the figures the curve shows."""
    tokens = [r["reasoning_tokens"] for r in records if r.get("reasoning_tokens") is not None]
    return {
        "n": summary["n"],
        "accuracy": summary["accuracy"],
        "format_rate": summary["format_rate"],
        "label_rate": 1.0 - summary["invalid_rate"],
        "latency_p50_s": summary["latency_p50_s"],
        "reasoning_tokens_mean": sum(tokens) / len(tokens) if tokens else None,
        "errors": summary["errors"],
    }


def sweep(
    endpoints: list[Endpoint],
    data: Path,
    out: Path,
    budgets: list[int | None],
    task: Task | None = None,
    cfg: QueryConfig | None = None,
) -> dict[str, Any]:
    """Evaluate every endpoint at every budget; write the per-budget evals and the curve."""
    if not endpoints:
        raise EvalError("a budget sweep needs --endpoint NAME=URL[@MODEL] (the gateway)")
    rows = load_rows(data, task)
    task = task or task_from_labels([row["label"] for row in rows])
    cfg = cfg or QueryConfig()
    result: dict[str, Any] = {"budgets": [budget_name(b) for b in budgets], "endpoints": {}}
    # Warm-up, not recorded: the first requests pay for the constraint's grammar and new batch
    # shapes, which would otherwise be charged to the first budget's latency.
    warm = {**cfg.extra_body, **budget_fields(budgets[0])}
    warm_cfg = replace(cfg, extra_body=warm)
    asyncio.run(query_all(endpoints, rows[: cfg.concurrency], task, warm_cfg, [BARE]))
    for budget in budgets:
        fields = {**cfg.extra_body, **budget_fields(budget)}
        fields_cfg = replace(cfg, extra_body=fields)
        records = asyncio.run(query_all(endpoints, rows, task, fields_cfg, [BARE]))[BARE]
        models = {name: recs[0]["model"] for name, recs in records.items() if recs}
        summary = write_outputs(out / f"budget-{budget_name(budget)}", data, task, records, models)
        for name, recs in records.items():
            at = {"budget": budget_name(budget), **point(summary[name], recs)}
            result["endpoints"].setdefault(name, []).append(at)
    out.mkdir(parents=True, exist_ok=True)
    (out / "budget.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / "budget.md").write_text(render_table(result), encoding="utf-8")
    plot(result, out / "budget.png")
    return result


def _cell(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


COLUMNS = [
    ("accuracy", "accuracy", 3),
    ("format_rate", "format", 3),
    ("label_rate", "label", 3),
    ("latency_p50_s", "p50 s", 3),
    ("reasoning_tokens_mean", "reasoning tokens", 1),
]


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, points in result["endpoints"].items():
        for p in points:
            rows.append([name, p["budget"], *(_cell(p[k], d) for k, _, d in COLUMNS)])
    return rows


def render_table(result: dict[str, Any]) -> str:
    """The sweep as a markdown table."""
    head = ["endpoint", "budget", *(title for _, title, _ in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(result)]
    note = (
        "\n*budget*: reasoning tokens allowed (`max_reasoning_tokens`; none = 0, unlimited = not "
        "sent); *format*: closed think section with non-empty reasoning and a label; *label*: "
        "the answer is one of the task's labels; *reasoning tokens*: mean of "
        "`usage.completion_tokens_details.reasoning_tokens`.\n"
    )
    return "\n".join(lines) + "\n" + note


def print_sweep(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="reasoning budget sweep")
    for title in ["endpoint", "budget", *(t for _, t, _ in COLUMNS)]:
        table.add_column(title, justify="left" if title in ("endpoint", "budget") else "right")
    for row in table_rows(result):
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 120))
    console.print(table)


def plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy, format rate and p50 latency against the budget, one line per endpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = result["budgets"]
    panels = [("accuracy", "accuracy"), ("format_rate", "format rate"), ("latency_p50_s", "p50 s")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
        for ax, (key, title) in zip(axes, panels, strict=True):
            for name, points in result["endpoints"].items():
                ys = [p[key] for p in points]
                ax.plot(range(len(ys)), ys, marker="o", label=name)
            ax.set_xticks(range(len(names)), names)
            ax.set_xlabel("reasoning budget (tokens)")
            ax.set_title(title)
            if key != "latency_p50_s":
                ax.set_ylim(-0.02, 1.02)
            else:
                ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def print_saved(out: Path) -> None:
    """Print a sweep written earlier (``OUT/budget.json``), if there is one."""
    path = out / "budget.json"
    if path.exists():
        print_sweep(json.loads(path.read_text(encoding="utf-8")))
        from rich.console import Console

        Console().print(f"budget curve: {out / 'budget.png'}")
