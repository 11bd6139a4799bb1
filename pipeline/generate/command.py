"""``distill generate``: ask the teacher for R1-style answers and write validated training data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def _teachers(
    teachers: Path | None,
    url: str | None,
    model: str | None,
    key_env: str | None,
    concurrency: int | None,
):
    from pipeline.generate.teachers import TeachersConfig, TeacherSpec, load_teachers

    if teachers is not None:
        if url or model:
            raise typer.BadParameter("give either --teachers or --teacher-url/--teacher-model")
        return load_teachers(teachers)
    if not (url and model):
        raise typer.BadParameter("give --teachers FILE, or both --teacher-url and --teacher-model")
    spec = TeacherSpec(
        name="teacher",
        base_url=url,
        model=model,
        api_key_env=key_env,
        max_concurrency=concurrency or 16,
    )
    return TeachersConfig(teachers=[spec])


def generate(
    task: Annotated[Path, typer.Option(help="Task YAML (labels, prompts, answer rule).")],
    input: Annotated[Path, typer.Option("--input", help="Input rows: JSONL or CSV.")],
    out: Annotated[Path, typer.Option(help="Output folder (also holds the ledger).")],
    teachers: Annotated[
        Path | None, typer.Option(help="teachers.yaml: several endpoints/keys at once.")
    ] = None,
    teacher_url: Annotated[str | None, typer.Option(help="One teacher's base URL (…/v1).")] = None,
    teacher_model: Annotated[str | None, typer.Option(help="That teacher's model name.")] = None,
    api_key_env: Annotated[
        str | None, typer.Option(help="Name of the env variable holding its API key.")
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(min=1, help="Requests in flight (one teacher), or a cap over all of them."),
    ] = None,
    samples: Annotated[
        int,
        typer.Option(
            min=1,
            help="Ask up to K times per training input and keep the FIRST sample that passes "
            "(samples are asked one by one, only while none has passed).",
        ),
    ] = 1,
    require_gold_match: Annotated[
        bool, typer.Option(help="Rejection sampling: the teacher's label must equal the gold one.")
    ] = False,
    max_requests: Annotated[
        int | None, typer.Option(min=0, help="Send at most N new requests in this run, then stop.")
    ] = None,
    budget_tokens: Annotated[
        int | None, typer.Option(min=0, help="Stop sending once this run used N tokens.")
    ] = None,
    stream: Annotated[bool, typer.Option(help="Stream responses (survives long answers).")] = True,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.6,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.95,
    max_tokens: Annotated[int, typer.Option(min=1)] = 8192,
    timeout: Annotated[float, typer.Option(help="Seconds per request (between chunks).")] = 600.0,
    max_attempts: Annotated[int, typer.Option(min=1, help="Attempts per request.")] = 8,
    retry_base: Annotated[float, typer.Option(min=0.0, help="Backoff base in seconds.")] = 1.0,
    test_ratio: Annotated[float, typer.Option(min=0.0, max=0.99)] = 0.15,
    seed: Annotated[int, typer.Option(help="Seed of the stratified train/test split.")] = 42,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Tokenizer folder: reasoning length in tokens too.")
    ] = None,
    cutoff_len: Annotated[
        int | None,
        typer.Option(
            min=16,
            help="The training cutoff (tokens) you will use: examples longer than it are "
            "counted and warned about, and it goes into llamafactory_sft.yaml. Default: the "
            "measured 99th percentile.",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar or summary table.")] = False,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Processes sending requests (each with its own event loop and clients). "
            "Default: auto = min(CPU cores, ceil(concurrency/2500), ceil(pending rows/2500)), "
            "i.e. one process unless thousands are in flight; more pays only on idle cores.",
        ),
    ] = None,
) -> None:
    """Generate R1-style training data from a teacher; resumable (re-run the same command).

    Writes train.json / test.json (alpaca), train.sharegpt.jsonl, dataset_info.json,
    llamafactory_sft.yaml, rejects.jsonl, stats.json and the request ledger ledger.sqlite
    into --out. The data files honour the umask; the ledger stays private (0600).
    Held-out inputs (--test-ratio) are asked once, without the gold filter; test.json keeps
    every one of them with its gold `label` and the teacher's `teacher_label`.
    """
    from distill_common.task import TaskError
    from pipeline.generate.client import FatalError, RetryPolicy
    from pipeline.generate.inputs import InputError
    from pipeline.generate.run import GenerateOptions, run_generate
    from pipeline.generate.stats import TokenizerError
    from pipeline.generate.teachers import TeacherConfigError
    from pipeline.generate.workers import WorkerError

    try:
        cfg = _teachers(teachers, teacher_url, teacher_model, api_key_env, concurrency)
        opts = GenerateOptions(
            task=task,
            input=input,
            out=out,
            teachers=cfg,
            concurrency=concurrency if teachers is not None else None,
            samples=samples,
            require_gold_match=require_gold_match,
            max_requests=max_requests,
            budget_tokens=budget_tokens,
            stream=stream,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            timeout=timeout,
            test_ratio=test_ratio,
            seed=seed,
            tokenizer=tokenizer,
            quiet=quiet,
            retry=RetryPolicy(max_attempts=max_attempts, base_s=retry_base),
            workers=workers,
            cutoff_len=cutoff_len,
        )
        stats = run_generate(opts)
    except (
        TaskError,
        InputError,
        TeacherConfigError,
        TokenizerError,
        FatalError,
        WorkerError,
    ) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo(
            f"interrupted: every answer received is in {out / 'ledger.sqlite'}; "
            "re-run the same command to resume",
            err=True,
        )
        raise typer.Exit(130) from None
    if not quiet:
        _summary(stats, out)
    warning = (stats.get("lengths") or {}).get("warning")
    if warning:  # shown even with --quiet: silent truncation is what it prevents
        typer.echo(f"warning: {warning}", err=True)


def _summary(stats: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="generate", show_header=False)
    run = stats["run"]
    rows = [
        ("accepted (train)", stats["accepted"]),
        ("rejected (train)", stats["rejected"]),
        ("pending", stats["pending"]),
        (
            "test rows / teacher accuracy",
            f"{stats['teacher_on_test']['rows']} / {stats['teacher_on_test']['accuracy']}",
        ),
        (
            "rejected by reason",
            ", ".join(f"{k} {v}" for k, v in stats["rejected_by_reason"].items()),
        ),
        ("requests sent (this run)", run["requests_sent"]),
        ("reused from ledger", run["reused_from_ledger"]),
        ("retries", run["retries"]),
        ("tokens", stats["tokens"]["total"]),
        ("cost", stats["cost"]),
        ("elapsed s", run["elapsed_s"]),
    ]
    if run["stopped"]:
        rows.append(("stopped", f"{run['stopped']} — re-run to continue"))
    for k, v in rows:
        table.add_row(k, str(v))
    console = Console()
    console.print(table)
    console.print(f"files in {out}")


if __name__ == "__main__":  # `python -m pipeline.generate.command ...` without the other stages
    typer.run(generate)
