"""``distill teacher-standin``: run the offline stand-in for a DeepSeek-R1 teacher."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer


class ReasoningFormat(StrEnum):
    """Where the server puts the reasoning, as real servers do."""

    reasoning_content = "reasoning_content"  # DeepSeek, Bailian
    reasoning = "reasoning"  # vLLM with a reasoning parser
    inline = "inline"  # <think>...</think> in content
    inline_no_open = "inline-no-open"  # ...</think> in content (R1-distill chat templates)


def _raise_fd_limit() -> None:
    """Thousands of connections in flight need more file descriptors than the usual 1024."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _quiet_gc() -> None:
    """Fewer garbage collections: with thousands of requests in flight the default thresholds
    rescan every live object about once per request. What exists at start-up (modules, the
    persona) is frozen out of the collector's view; young collections run every 20,000
    allocations."""
    import gc

    gc.freeze()
    gc.set_threshold(20_000, *gc.get_threshold()[1:])


def teacher_standin(
    port: Annotated[int, typer.Option(help="TCP port to listen on.")],
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    latency_ms: Annotated[
        int, typer.Option(min=0, help="Delay before the first byte of each answer.")
    ] = 0,
    faults: Annotated[
        str,
        typer.Option(
            help="Fault rates, e.g. '429=0.2,500=0.05,empty=0.05,keepalive=0.1,"
            "truncate=0.05,offlabel=0.05,broken=0.02,retry_after=1'."
        ),
    ] = "",
    reasoning_format: Annotated[
        ReasoningFormat, typer.Option(help="Where the reasoning goes in the response.")
    ] = ReasoningFormat.reasoning_content,
    request_log: Annotated[
        Path | None, typer.Option(dir_okay=False, help="JSONL file: one row per request.")
    ] = None,
    lexicon: Annotated[
        Path | None,
        typer.Option(dir_okay=False, help="Keyword lexicon YAML (default: the one shipped)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for fault draws.")] = 0,
    model: Annotated[str, typer.Option(help="Model id the server answers to.")] = (
        "deepseek-r1-standin"
    ),
    chunk_delay_ms: Annotated[
        int, typer.Option(min=0, help="Pause between stream chunks (0: send them at once).")
    ] = 0,
) -> None:
    """Offline stand-in for a DeepSeek-R1 teacher: OpenAI-compatible, deterministic, faults
    on demand."""
    import uvicorn

    from pipeline.standin.faults import FaultPlan, FaultSpecError
    from pipeline.standin.persona import LexiconError, Persona, load_lexicon
    from pipeline.standin.server import RequestLog, StandinApp

    try:
        plan = FaultPlan.parse(faults, seed=seed)
    except FaultSpecError as e:
        raise typer.BadParameter(str(e), param_hint="--faults") from None
    try:
        persona = Persona(load_lexicon(lexicon))
    except LexiconError as e:
        raise typer.BadParameter(str(e), param_hint="--lexicon") from None
    app = StandinApp(
        persona,
        plan,
        model=model,
        reasoning_format=reasoning_format.value,
        latency_s=latency_ms / 1000,
        chunk_delay_s=chunk_delay_ms / 1000,
        log=RequestLog(request_log) if request_log else None,
    )
    _raise_fd_limit()
    _quiet_gc()
    typer.echo(
        f"stand-in teacher '{model}' on http://{host}:{port}/v1 "
        f"(reasoning: {reasoning_format.value}, latency {latency_ms} ms, "
        f"faults: {faults or 'none'})",
        err=True,
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        ws="none",  # no websockets: no upgrade check per request
        lifespan="on",
        access_log=False,
        log_level="warning",
        server_header=False,
        date_header=False,
        proxy_headers=False,  # loopback/test server: no proxy, one middleware less per request
        backlog=4096,
        timeout_keep_alive=120,
        timeout_graceful_shutdown=2,
    )
