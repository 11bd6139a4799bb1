"""Training configuration: a YAML file validated into pydantic models."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from distill_common.yamlfile import load_yaml_model


class ConfigError(ValueError):
    """A training config is missing or invalid; the message names the file and field."""


class LoraSettings(BaseModel):
    """The LoRA adapter: rank, scaling, dropout and which linear layers get one."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    modules_to_save: list[str] = Field(
        default_factory=list, description="modules trained in full (e.g. embed_tokens, lm_head)"
    )


class TrainConfig(BaseModel):
    """Everything `distill train` needs besides the data and the output directory."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(min_length=1, description="HF id or local dir; --base overrides")
    lora: LoraSettings = LoraSettings()
    learning_rate: float = Field(1e-4, gt=0)
    epochs: float = Field(3, gt=0)
    max_steps: int = Field(-1, description="> 0 stops after this many optimizer steps")
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    bf16: bool = Field(True, description="bf16 on GPU; ignored (fp32) where no GPU supports it")
    per_device_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(8, ge=1)
    cutoff_len: int | None = Field(
        None, ge=8, description="max tokens per example; empty = cover `cutoff_percentile`"
    )
    cutoff_percentile: float = Field(99, gt=0, le=100)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "varlen"] = Field(
        "sdpa",
        description="varlen = PyTorch's flash varlen kernel (GPU, torch >= 2.10), no extra wheel",
    )
    padding_free: bool = Field(
        False, description="concatenate a batch without padding; needs varlen or flash_attention_2"
    )
    gradient_checkpointing: bool = False
    seed: int = 42
    logging_steps: int = Field(10, ge=1)
    save_steps: int | None = Field(None, ge=1, description="empty = a checkpoint per epoch")
    save_total_limit: int = Field(2, ge=1)
    preflight_examples: int = Field(3, ge=1, description="examples shown by the mask preflight")
    dataloader_num_workers: int = Field(0, ge=0)
    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads for torch; empty = torch's default (all cores)"
    )

    @model_validator(mode="after")
    def _padding_free_keeps_documents_apart(self) -> TrainConfig:
        if self.padding_free and self.attn_implementation not in ("varlen", "flash_attention_2"):
            raise ValueError(
                "padding_free needs attn_implementation varlen or flash_attention_2; with "
                f"{self.attn_implementation} the concatenated examples would attend to each other"
            )
        return self


def load_config(path: str | Path) -> TrainConfig:
    """Load and validate a training YAML; errors name the file and the offending field."""
    return load_yaml_model(
        path,
        TrainConfig,
        ConfigError,
        what="training config",
        expected="a mapping of training settings",
    )
