"""LoRA supervised fine-tuning with trl's ``SFTTrainer`` (loss on the assistant answer only).

The examples are tokenised here through the tokenizer's chat template (see ``preflight``), so
the ids and labels the preflight checks are exactly the ones trl trains on; trl receives them
pre-tokenised and does no masking or truncation of its own.

Multi-GPU (data parallel) is the same command under accelerate::

    accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m pipeline.cli \\
        train --config configs/train/qwen2.5-7b-lora.yaml --data runs/data --out runs/adapter

Each process trains on its shard; the effective batch is
``per_device_batch_size * gradient_accumulation_steps * num_processes``.

Resuming: checkpoints go to ``OUT/checkpoint-*``. When they exist, a new run with the same
``--out`` resumes from the latest one automatically (``--no-resume`` starts over).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from pipeline.train.config import TrainConfig
from pipeline.train.data import Dataset, load_dataset, shape_prompts
from pipeline.train.preflight import (
    Encoded,
    PreflightError,
    encode,
    percentile_cutoff,
    run_preflight,
    truncate,
)

METRICS_FILE = "train_metrics.json"


def is_main_process() -> bool:
    """True on the process that logs and writes files (rank 0 under accelerate/torchrun)."""
    return int(os.environ.get("RANK", "0")) == 0


def _console():
    from rich.console import Console

    return Console(stderr=True, quiet=not is_main_process())


def prepare(
    config: TrainConfig, data: str | Path | Dataset, tokenizer, dataset_name: str | None = None
):
    """Load, tokenise, choose the cutoff, truncate and run the mask preflight.

    Returns ``(dataset, encoded_truncated, cutoff, info)``; raises ``DataError`` or
    ``PreflightError`` before any training compute.
    """
    console = _console()
    ds = data if isinstance(data, Dataset) else load_dataset(data, dataset_name)
    examples = shape_prompts(ds.examples, config.system_prompt, config.seed)
    encoded = [encode(tokenizer, ex) for ex in examples]
    lengths = [len(e.input_ids) for e in encoded]
    if config.cutoff_len is None:
        cutoff = percentile_cutoff(lengths, config.cutoff_percentile)
        why = f"the {config.cutoff_percentile:g}th percentile of token lengths"
    else:
        cutoff, why = config.cutoff_len, "cutoff_len in the config"
    truncated = [truncate(e, cutoff) for e in encoded]
    cut = sum(length > cutoff for length in lengths)
    console.print(
        f"[bold]cutoff[/] {cutoff} tokens ({why}); {len(encoded)} examples from {ds.path}, "
        f"length min {min(lengths)} / max {max(lengths)}; {cut} truncated"
    )
    with_system = sum(ex.has_system for ex in examples)
    console.print(
        f"[bold]system prompt[/] {config.system_prompt}: {with_system} examples with the "
        f"data's system message, {len(examples) - with_system} with the user message only"
    )
    run_preflight(tokenizer, examples, encoded, truncated, config.preflight_examples, console)
    console.print(
        "[green]preflight ok[/]: answer and end-of-turn token carry loss in every example"
    )
    info = {
        "system_prompt": config.system_prompt,
        "examples_with_system": with_system,
        "data_file": str(ds.path),
        "data_sha256": ds.sha256,
        "num_examples": len(encoded),
        "cutoff_len": cutoff,
        "cutoff_reason": why,
        "num_truncated": cut,
        "trained_tokens_per_epoch": sum(t.trained for t in truncated),
        "tokens_per_epoch": sum(len(t.input_ids) for t in truncated),
    }
    return ds, truncated, cutoff, info


def _hf_dataset(encoded: list[Encoded]):
    from datasets import Dataset

    return Dataset.from_dict(
        {"input_ids": [e.input_ids for e in encoded], "labels": [e.labels for e in encoded]}
    )


def _throughput_callback():
    """A TrainerCallback adding tokens/s (all processes) to every log line."""
    from transformers import TrainerCallback

    class Throughput(TrainerCallback):
        def __init__(self) -> None:
            self.last: tuple[float, float] | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None or "num_tokens" not in logs:
                return
            now, tokens = time.perf_counter(), float(logs["num_tokens"])
            if self.last is not None and now > self.last[0]:
                logs["tokens_per_second"] = round((tokens - self.last[1]) / (now - self.last[0]), 1)
            self.last = (now, tokens)

    return Throughput()


def _plot_loss(history: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    if not points:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*points, strict=True), marker=".")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_title("distill train")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def train(
    config: TrainConfig,
    data: str | Path,
    out: str | Path,
    base: str | None = None,
    resume: bool | None = None,
    dataset_name: str | None = None,
) -> dict:
    """Fine-tune ``base`` (default: the config's) on ``data``; write the adapter to ``out``."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTConfig, SFTTrainer

    out = Path(out)
    base = base or config.base_model
    console = _console()
    dataset = load_dataset(data, dataset_name)  # a bad file fails here, before any model loads
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.chat_template is None:
        raise PreflightError(
            f"{base}: the tokenizer has no chat template; training needs the serving one"
        )
    _, encoded, _, info = prepare(config, dataset, tokenizer)

    bf16 = config.bf16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if config.bf16 and not bf16:
        console.print("[yellow]bf16 requested but no GPU supports it here: training in fp32[/]")
    if config.attn_implementation == "varlen":
        from pipeline.train.varlen import register

        register()
    model = AutoModelForCausalLM.from_pretrained(
        base,
        dtype=torch.bfloat16 if bf16 else torch.float32,
        attn_implementation=config.attn_implementation,
    )
    lora = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules,
        modules_to_save=config.lora.modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    args = SFTConfig(
        output_dir=str(out),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # < 1 means a fraction of the steps
        weight_decay=config.weight_decay,
        per_device_train_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        gradient_checkpointing=config.gradient_checkpointing,
        bf16=bf16,
        max_length=None,  # already truncated to the cutoff above
        padding_free=config.padding_free,
        completion_only_loss=True,
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps else "epoch",
        save_steps=config.save_steps or 500,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        data_seed=config.seed,
        report_to="none",
        dataloader_num_workers=config.dataloader_num_workers,
        ddp_find_unused_parameters=False,  # every LoRA weight is used; skip DDP's graph walk
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=_hf_dataset(encoded),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[_throughput_callback()],
    )
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    resume_from = last if (resume is None or resume) and last else None
    if resume and not last:
        console.print(f"[yellow]--resume: no checkpoint in {out}, starting from scratch[/]")
    if resume_from:
        console.print(f"[bold]resuming[/] from {resume_from}")
    threads = torch.get_num_threads()
    try:
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        result = trainer.train(resume_from_checkpoint=resume_from)
    finally:
        torch.set_num_threads(threads)

    metrics = {
        "base_model": base,
        "config": config.model_dump(),
        **info,
        "train_runtime_s": round(result.metrics["train_runtime"], 2),
        "train_loss": result.metrics.get("train_loss"),
        "final_loss": next(
            (h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None
        ),
        "global_steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "resumed_from": resume_from,
        "bf16": bf16,
        "num_processes": trainer.args.world_size,
        "log_history": trainer.state.log_history,
    }
    tokens = info["tokens_per_epoch"] * (trainer.state.epoch or 0)
    runtime = result.metrics["train_runtime"]
    metrics["tokens_per_second"] = round(tokens / runtime, 1) if runtime > 0 else math.nan
    if trainer.is_world_process_zero():
        trainer.save_model(str(out))
        tokenizer.save_pretrained(str(out))
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
        _plot_loss(trainer.state.log_history, out / "loss.png")
        console.print(
            f"[bold green]adapter[/] {out}  loss {metrics['final_loss']}  "
            f"{metrics['tokens_per_second']} tokens/s  {metrics['train_runtime_s']} s"
        )
    return metrics
