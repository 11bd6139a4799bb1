"""``distill eval``: the command line over :mod:`pipeline.evaluate` and, for a list of
reasoning budgets, :mod:`pipeline.budget_sweep`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from distill_common.task import TaskError, load_task
from pipeline.budget_sweep import budget_fields, parse_budgets, print_sweep, sweep
from pipeline.evaluate import (
    BARE,
    REQUESTS,
    EvalError,
    QueryConfig,
    evaluate,
    parse_endpoint,
    print_table,
    table_rows,
)


def reasoning_request(
    body: dict[str, Any], effort: str | None, budget: str | None
) -> list[int | None] | None:
    """Add ``--reasoning-effort``/``--reasoning-budget`` to the request ``body``; return the
    budgets to sweep when more than one is given (else ``None``)."""
    if effort is not None and budget is not None:
        raise EvalError("give --reasoning-effort or --reasoning-budget, not both")
    if effort is not None:
        body["reasoning_effort"] = effort
    if budget is None:
        return None
    budgets = parse_budgets(budget)
    if len(budgets) > 1:
        return budgets
    body.update(budget_fields(budgets[0]))
    return None


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
    bare: Annotated[
        bool,
        typer.Option(
            "--bare/--no-bare",
            help="also ask every row with the user message alone (no system prompt)",
        ),
    ] = True,
    reasoning_effort: Annotated[
        str | None,
        typer.Option(help="reasoning_effort for every request: none|minimal|low|medium|high"),
    ] = None,
    reasoning_budget: Annotated[
        str | None,
        typer.Option(
            help="reasoning tokens (through the gateway): one budget, or a sweep such as "
            "none,8,16,32,64,unlimited (writes budget.json/.md/.png)"
        ),
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
        budgets = reasoning_request(body, reasoning_effort, reasoning_budget)
        cfg = QueryConfig(
            concurrency, max_tokens, temperature, timeout, api_key, retries, body, bare
        )
        if budgets is not None:
            print_sweep(sweep(endpoints, data, out, budgets, loaded_task, cfg))
            typer.echo(f"budget curve: {out / 'budget.png'}; table: {out / 'budget.md'}")
            return
        summary = evaluate(endpoints, data, out, loaded_task, cfg)
    except (EvalError, TaskError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    print_table(summary)
    for name, request, s in table_rows(summary):
        if s["errors"]:
            folder = out / BARE if request == REQUESTS[BARE] else out
            first = next(
                json.loads(line)["error"]
                for line in (folder / f"predictions_{name}.jsonl").open(encoding="utf-8")
                if json.loads(line).get("error")
            )
            typer.echo(
                f"warning: {name} ({request}): {s['errors']} of {s['n']} requests failed; "
                f"first: {first}"
            )
    typer.echo(f"report: {out / 'report.md'}")
    typer.echo(f"confusion matrices: {out}/confusion_*.png ({BARE}/: user message only)")
    dead = [name for name, s in summary.items() if s["errors"] == s["n"]]
    if dead:
        typer.echo(f"error: every request failed for {', '.join(dead)}", err=True)
        raise typer.Exit(1)
