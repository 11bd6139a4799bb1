"""``distill eval --reasoning-effort / --reasoning-budget``: parsing, request fields, the sweep's
table and plot (the sweep itself against the gateway and vLLM: test_gateway_budget_vllm.py)."""

from __future__ import annotations

import pytest

from pipeline.budget_sweep import budget_fields, parse_budgets, plot, render_table
from pipeline.eval_cli import reasoning_request
from pipeline.evaluate import EvalError


def test_budgets_parse_in_order_with_none_and_unlimited():
    assert parse_budgets("none, 8,16 ,unlimited") == [0, 8, 16, None]
    assert [budget_fields(b) for b in (0, 8, None)] == [
        {"max_reasoning_tokens": 0},
        {"max_reasoning_tokens": 8},
        {},
    ]
    for bad, why in [("8,x", "'x' is not a number"), ("8,8", "given twice"), (",", "no budget")]:
        with pytest.raises(EvalError, match=why):
            parse_budgets(bad)


def test_one_budget_or_an_effort_goes_into_every_request_a_list_is_a_sweep():
    body: dict = {"top_k": 1}
    assert reasoning_request(body, None, "16") is None
    assert body == {"top_k": 1, "max_reasoning_tokens": 16}
    body = {}
    assert reasoning_request(body, "low", None) is None and body == {"reasoning_effort": "low"}
    body = {}
    assert reasoning_request(body, None, "none,unlimited") == [0, None] and body == {}
    with pytest.raises(EvalError, match="not both"):
        reasoning_request({}, "low", "8")


def test_table_and_plot(tmp_path):
    point = {"n": 90, "accuracy": 0.5, "format_rate": 1.0, "label_rate": 1.0,
             "latency_p50_s": 0.1, "reasoning_tokens_mean": 7.5, "errors": 0}  # fmt: skip
    result = {
        "budgets": ["none", "8"],
        "endpoints": {"student": [{**point, "budget": "none"}, {**point, "budget": "8"}]},
    }
    table = render_table(result)
    assert "| student | 8 | 0.500 | 1.000 | 1.000 | 0.100 | 7.5 |" in table
    plot(result, tmp_path / "budget.png")
    assert (tmp_path / "budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
