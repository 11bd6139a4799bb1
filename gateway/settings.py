"""Gateway settings: environment variables prefixed ``GATEWAY_`` (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gateway.discovery import DnsTarget
from gateway.tokens import TokenizerPath

ThinkMode = Literal["separate", "hide", "inline"]
THINK_MODES: tuple[str, ...] = ("separate", "hide", "inline")
ReasoningField = Literal["reasoning_content", "reasoning", "both"]

CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Everything the gateway can be told; ``GATEWAY_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore")

    upstreams: CommaList = Field(
        default_factory=lambda: ["http://127.0.0.1:8000/v1"],
        description="Comma-separated OpenAI base URLs of the vLLM servers (…/v1).",
    )
    upstreams_dns: str | None = Field(
        None,
        description="`host:port` whose addresses are the upstreams, re-resolved (e.g. a "
        "Kubernetes headless Service `vllm-headless.ns.svc:8000`); instead of UPSTREAMS.",
    )
    upstreams_dns_interval: float = Field(
        5.0,
        gt=0,
        description="Seconds between lookups of UPSTREAMS_DNS (also after a failed connect).",
    )
    think: ThinkMode = "separate"
    reasoning_field: ReasoningField = "reasoning_content"
    api_keys: CommaList = Field(default_factory=list, description="Accepted bearer keys.")
    api_keys_file: Path | None = Field(
        None, description="File with one key a line: `KEY [rpm=N] [concurrency=N]`, # comments."
    )
    host: str = Field("127.0.0.1", description="Listen address; beyond loopback it needs keys.")
    allow_anonymous: bool = Field(
        False, description="Listen beyond loopback without API keys (a trusted network only)."
    )
    port: int = Field(8080, ge=1, le=65535)

    started_in_think: bool = Field(
        False,
        description="The chat template opens <think> in the prompt: text starts as reasoning.",
    )
    strip_history: bool = Field(True, description="Drop reasoning from earlier assistant turns.")
    models: CommaList = Field(
        default_factory=list, description="Model names used as metric labels (others: `other`)."
    )
    upstream_api_key: SecretStr | None = None
    tasks: Annotated[dict[str, Path], NoDecode] = Field(
        default_factory=dict,
        description="`model=path/to/task.yaml,…`: which task a served model does (its labels and "
        "system prompt); models not listed are served untouched.",
    )
    inject_system_prompt: bool = Field(
        False,
        description="Give a model with a task (GATEWAY_TASKS) its system prompt when the client "
        "sends no system message; for students trained with the prompt.",
    )
    reasoning_budgets: Path | None = Field(
        None, description="YAML: reasoning effort -> token budget per model, and defaults."
    )
    tokenizer: TokenizerPath = Field(
        None,
        description="Directory holding the served model's tokenizer.json: answer tokens counted "
        "exactly, reasoning tokens as the rest of completion_tokens (empty or `off`: both "
        "estimated).",
    )

    rate_limit_rpm: int | None = Field(None, ge=1, description="Requests per minute per key.")
    max_concurrent_per_key: int | None = Field(None, ge=1)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_messages: int = Field(
        2048, ge=1, description="Most `messages` in one request (bounds the work per request)."
    )
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a client connection may take to send a request's head (slowloris); "
        "also how long an idle keep-alive connection is kept.",
    )
    max_connections: int = Field(
        1000, ge=1, description="Client connections held at once; more are closed at accept."
    )
    upstream_max_connections: int = Field(
        1024, ge=1, description="Connections to each upstream at once (requests beyond wait)."
    )

    connect_timeout: float = Field(5.0, gt=0)
    first_byte_timeout: float = Field(
        300.0, gt=0, description="Also the longest silence mid-stream."
    )
    total_timeout: float = Field(1800.0, gt=0)
    keepalive_interval: float = Field(10.0, gt=0, description="SSE comment when idle this long.")

    access_log: str = Field("-", description="`-` stdout, empty: off, else a file path.")
    log_level: str = "warning"

    @field_validator("upstreams", "api_keys", "models", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("upstreams_dns", mode="before")
    @classmethod
    def _check_dns(cls, value: object) -> object:
        if isinstance(value, str):
            if not value.strip():
                return None
            DnsTarget.parse(value)
        return value

    @model_validator(mode="after")
    def _one_upstream_source(self) -> Settings:
        if self.upstreams_dns and "upstreams" in self.model_fields_set:
            raise ValueError("set GATEWAY_UPSTREAMS or GATEWAY_UPSTREAMS_DNS, not both")
        return self

    @field_validator("tasks", mode="before")
    @classmethod
    def _split_tasks(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        tasks: dict[str, str] = {}
        for part in (p.strip() for p in value.split(",")):
            if not part:
                continue
            model, sep, path = (x.strip() for x in part.partition("="))
            if not sep or not model or not path:
                raise ValueError(f"{part!r} is not model=path/to/task.yaml")
            tasks[model] = path
        return tasks

    @field_validator("upstreams")
    @classmethod
    def _check_urls(cls, urls: list[str]) -> list[str]:
        if not urls:
            raise ValueError("at least one upstream base URL is needed, e.g. http://vllm:8000/v1")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"upstream {url!r} is not an http(s) URL")
        return [url.rstrip("/") for url in urls]
