"""The wire format: request models (validation + OpenAPI schema) and OpenAI-shaped errors."""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentPart(_Open):
    type: str
    text: str | None = None


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class ReasoningOptions(_Open):
    """OpenRouter-style reasoning options; ``exclude: true`` hides the reasoning."""

    exclude: StrictBool | None = None


class StreamOptions(_Open):
    include_usage: StrictBool | None = None


class ChatCompletionRequest(_Open):
    """The fields the gateway reads; every other OpenAI field passes through to vLLM."""

    model: str = Field(min_length=1, max_length=256, examples=["student"])
    messages: list[Message] = Field(
        min_length=1, examples=[[{"role": "user", "content": "标题：国足2比0取胜"}]]
    )
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=16)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    include_reasoning: StrictBool | None = Field(None, description="false hides the reasoning.")
    reasoning: ReasoningOptions | None = None


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its ``$defs`` references inlined (for OpenAPI extras)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout",
}


class GatewayError(Exception):
    """An error that becomes an OpenAI-shaped JSON response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}
        self.reason = reason  # upstream_errors_total label, when the upstream is to blame

    def payload(self) -> dict[str, Any]:
        return error_payload(self.status, self.message, code=self.code, param=self.param)

    def body(self) -> bytes:
        return orjson.dumps(self.payload())


def error_payload(
    status: int, message: str, *, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}`` as OpenAI sends it."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in [
        (400, "Invalid JSON or fields, unknown think mode"),
        (401, "Missing or wrong API key"),
        (413, "Body too large"),
        (429, "Rate or concurrency limit (see Retry-After)"),
        (502, "Upstream failed"),
        (503, "No upstream available"),
        (504, "Upstream timed out"),
    ]
}


def chat_operation() -> dict[str, Any]:
    """The OpenAPI operation of ``POST /v1/chat/completions`` (served by a plain ASGI
    endpoint, which FastAPI does not describe by itself)."""
    error = {"application/json": {"schema": inline_schema(ErrorResponse)}}
    responses: dict[str, Any] = {
        "200": {"description": "A chat completion, or an SSE stream of chunks"}
    }
    for code, spec in ERROR_RESPONSES.items():
        responses[str(code)] = {"description": spec["description"], "content": error}
    return {
        "tags": ["openai"],
        "summary": "Chat Completions",
        "description": "OpenAI chat completions, streaming or not; the reasoning shown as the "
        "think mode says.",
        "operationId": "chat_completions",
        "parameters": [
            {
                "name": "X-Think",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "enum": ["separate", "hide", "inline"]},
            }
        ],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": inline_schema(ChatCompletionRequest)}},
        },
        "responses": responses,
    }
