"""`distill tiny-model`, `distill train` and `distill merge` (heavy imports inside each)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

err = Console(stderr=True)


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def tiny_model(
    task: Annotated[Path, typer.Option(help="task YAML (system prompt, labels)")],
    out: Annotated[Path, typer.Option(help="directory for the model")],
    corpus: Annotated[
        list[Path] | None,
        typer.Option(help="text for the tokenizer: .jsonl/.json rows or plain text (repeatable)"),
    ] = None,
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary size (upper bound)")] = 4000,
    seed: Annotated[int, typer.Option(help="seed of the random init")] = 0,
    hidden_size: Annotated[int, typer.Option(help="model width, a multiple of 64")] = 128,
    layers: Annotated[int, typer.Option(help="transformer layers")] = 2,
) -> None:
    """Build a tiny random-init Qwen2 model + task tokenizer (a CPU stand-in for Qwen2.5-7B)."""
    from distill_common.task import TaskError, load_task
    from pipeline.train.tiny import build_tiny_model

    try:
        spec = load_task(task)
        for path in corpus or []:
            if not path.exists():
                raise ValueError(f"{path}: corpus file not found")
        build_tiny_model(
            spec,
            out,
            corpus,
            vocab_size=vocab_size,
            seed=seed,
            hidden_size=hidden_size,
            num_layers=layers,
        )
    except (TaskError, ValueError) as e:
        raise _fail(str(e)) from None
    err.print(f"[bold green]tiny model[/] {out}")


def train(
    config: Annotated[Path, typer.Option(help="training YAML, e.g. configs/train/tiny-cpu.yaml")],
    data: Annotated[Path, typer.Option(help="generate output dir, dataset_info.json dir or file")],
    out: Annotated[Path, typer.Option(help="adapter output directory (checkpoints go here too)")],
    base: Annotated[str | None, typer.Option(help="base model; overrides the config's")] = None,
    dataset: Annotated[str | None, typer.Option(help="entry of dataset_info.json")] = None,
    resume: Annotated[
        bool | None,
        typer.Option(
            "--resume/--no-resume",
            help="resume from OUT's last checkpoint (default: automatically when one exists)",
        ),
    ] = None,
) -> None:
    """LoRA SFT, loss on the answer only. N GPUs: `accelerate launch -m pipeline.cli train ...`."""
    from pipeline.train.config import ConfigError, load_config
    from pipeline.train.data import DataError
    from pipeline.train.preflight import PreflightError
    from pipeline.train.sft import train as run

    try:
        run(load_config(config), data, out, base=base, resume=resume, dataset_name=dataset)
    except (ConfigError, DataError, PreflightError) as e:
        raise _fail(str(e)) from None


def merge(
    adapter: Annotated[Path, typer.Option(help="adapter directory from `distill train`")],
    out: Annotated[Path, typer.Option(help="merged model directory")],
    base: Annotated[
        str | None, typer.Option(help="base model (default: the one the adapter names)")
    ] = None,
) -> None:
    """Merge the adapter into the base, verify logit parity, write distill_manifest.json."""
    from pipeline.train.merge import MergeError
    from pipeline.train.merge import merge as run

    try:
        run(base, adapter, out, console=err)
    except MergeError as e:
        raise _fail(str(e)) from None
