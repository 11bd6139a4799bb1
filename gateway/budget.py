"""Reasoning budgets and label-constrained answers: what one request asks for (a :class:`Plan`).

The request fields the gateway reads (and removes before the upstream sees them), first wins:

* ``max_reasoning_tokens``: N (our extension);
* ``reasoning: {"max_tokens": N}`` (OpenRouter);
* ``reasoning: {"effort": E}`` (OpenRouter), ``reasoning: {"enabled": false}`` = ``none``;
* ``reasoning_effort: E`` (OpenAI): ``none | minimal | low | medium | high``;
* else the model's default from ``GATEWAY_REASONING_BUDGETS`` (none: unlimited).

``none`` (or a budget of 0) answers after an empty think section. A model with a task
(``GATEWAY_TASKS``) gets its answer constrained to the task's labels unless the request sends
``constrain_answer: false``, or brings its own output constraint. Pure functions over the
request body; :mod:`gateway.phases` runs the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from distill_common.task import Task
from distill_common.yamlfile import load_yaml_model
from gateway.protocol import GatewayError

Effort = Literal["none", "minimal", "low", "medium", "high"]
EFFORTS: tuple[str, ...] = ("none", "minimal", "low", "medium", "high")
# Without a table: the levels in the usual proportions of reasoning APIs (tokens of thought).
BUILTIN_EFFORTS: dict[str, int] = {"minimal": 256, "low": 1024, "medium": 4096, "high": 16384}
OPT_OUT = "constrain_answer"
GATEWAY_FIELDS = ("reasoning_effort", "max_reasoning_tokens", OPT_OUT)
REASONING_KEYS = ("max_tokens", "effort", "enabled")
# A request that brings one of these has its own output constraint: the labels don't apply.
OWN_CONSTRAINT = (
    "structured_outputs",
    "guided_choice",
    "guided_regex",
    "guided_json",
    "guided_grammar",
    "tools",
)


class BudgetError(ValueError):
    """The budgets file is unreadable or invalid (the message names the file and field)."""


class ModelBudgets(BaseModel):
    """One model's effort levels (``none`` is always 0) and its default budget."""

    model_config = ConfigDict(extra="forbid")

    efforts: dict[Literal["minimal", "low", "medium", "high"], int | None] = Field(
        default_factory=dict, description="effort -> reasoning tokens (null: unlimited)"
    )
    default: Effort | int | None = Field(
        None, description="budget when the request names none: an effort, tokens, or null"
    )


class BudgetTable(BaseModel):
    """``GATEWAY_REASONING_BUDGETS``: ``defaults`` for every model, ``models`` override."""

    model_config = ConfigDict(extra="forbid")

    defaults: ModelBudgets = ModelBudgets()
    models: dict[str, ModelBudgets] = Field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None) -> BudgetTable:
        if path is None:
            return cls()
        return load_yaml_model(
            path, cls, BudgetError, what="reasoning budgets file", expected="defaults/models"
        )

    def effort_budget(self, model: str, effort: str) -> int | None:
        """Tokens for ``effort`` on ``model`` (``None``: unlimited)."""
        if effort == "none":
            return 0
        own = self.models.get(model)
        if own is not None and effort in own.efforts:
            return own.efforts[effort]  # type: ignore[index]
        if effort in self.defaults.efforts:
            return self.defaults.efforts[effort]  # type: ignore[index]
        return BUILTIN_EFFORTS[effort]

    def default_budget(self, model: str) -> int | None:
        own = self.models.get(model)
        default = own.default if own is not None and own.default is not None else None
        default = self.defaults.default if default is None else default
        if isinstance(default, str):
            return self.effort_budget(model, default)
        return default


@dataclass(frozen=True)
class Plan:
    """How to run one request: a reasoning budget and/or an answer constrained to labels."""

    budget: int | None  # reasoning tokens; 0: no reasoning; None: unlimited
    labels: tuple[str, ...] | None  # the answer is exactly one of these
    source: str  # which field set the budget (or "default", "none")


def _bad(field: str, expected: str, value: Any) -> GatewayError:
    return GatewayError(
        400, f"{field}: expected {expected}, got {value!r}", param=field, code="invalid_reasoning"
    )


def _tokens(field: str, value: Any) -> int | None:
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise _bad(field, "a whole number of tokens >= 0", value)
    return value


def _effort(field: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value.strip().lower() not in EFFORTS:
        raise _bad(field, "one of " + "|".join(EFFORTS), value)
    return value.strip().lower()


def requested_budget(
    body: dict[str, Any], model: str, table: BudgetTable
) -> tuple[int | None, str]:
    """The budget a request asks for and where it came from; the fields are removed from
    ``body`` (``reasoning`` keeps only what the think modes read: ``exclude``)."""
    tokens = _tokens("max_reasoning_tokens", body.pop("max_reasoning_tokens", None))
    effort = _effort("reasoning_effort", body.pop("reasoning_effort", None))
    reasoning = body.get("reasoning")
    r_tokens = r_effort = None
    if isinstance(reasoning, dict):
        r_tokens = _tokens("reasoning.max_tokens", reasoning.get("max_tokens"))
        r_effort = _effort("reasoning.effort", reasoning.get("effort"))
        enabled = reasoning.get("enabled")
        if enabled is not None and type(enabled) is not bool:
            raise _bad("reasoning.enabled", "true or false", enabled)
        if enabled is False and r_effort is None:
            r_effort = "none"
    if tokens is not None:
        return tokens, "max_reasoning_tokens"
    if r_tokens is not None:
        return r_tokens, "reasoning.max_tokens"
    if r_effort is not None:
        return table.effort_budget(model, r_effort), "reasoning.effort"
    if effort is not None:
        return table.effort_budget(model, effort), "reasoning_effort"
    return table.default_budget(model), "default"


def answer_labels(body: dict[str, Any], task: Task | None) -> tuple[str, ...] | None:
    """The labels the answer is constrained to, or ``None`` (no task, opted out, or the
    request brings its own constraint). Removes the opt-out field from ``body``."""
    wanted = body.pop(OPT_OUT, None)
    if wanted is not None and type(wanted) is not bool:
        raise _bad(OPT_OUT, "true or false", wanted)
    if task is None or wanted is False or any(k in body for k in OWN_CONSTRAINT):
        return None
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        return None
    return tuple(task.labels)


def wants_budget(body: dict[str, Any], table: BudgetTable) -> bool:
    """Whether a request asks for a budget (a field, or its model's default)."""
    if any(k in body for k in GATEWAY_FIELDS):
        return True
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and any(k in reasoning for k in REASONING_KEYS):
        return True
    return table.default_budget(str(body.get("model"))) is not None


def plan_request(body: dict[str, Any], table: BudgetTable, task: Task | None) -> Plan | None:
    """The plan for one request body (its gateway-only fields removed), or ``None`` when it
    needs nothing: no budget, no labels. ``None`` leaves the body untouched."""
    if task is None and not wants_budget(body, table):
        return None
    budget, source = requested_budget(body, str(body.get("model")), table)
    labels = answer_labels(body, task)
    if budget is None and labels is None:
        return None
    if body.get("n") not in (None, 1):
        raise GatewayError(
            400,
            "n > 1 is not supported with a reasoning budget or label-constrained answers; send "
            f"n=1 (or {OPT_OUT}: false and no budget)",
            param="n",
            code="invalid_request",
        )
    return Plan(budget, labels, "none" if budget == 0 else source)
