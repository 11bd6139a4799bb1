"""The Grafana dashboard: provisioned datasource, valid PromQL, and metric names that exist.

Gateway names are checked against a real scrape of the gateway (uvicorn, real HTTP, one
streaming and one plain request through it to the stand-in teacher, so histograms have series);
vLLM names against a real scrape of the vLLM CPU server (the shared ``vllm_server`` fixture).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import ROOT
from tests.test_compose import services

GRAFANA = ROOT / "compose" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "distill.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources"
PROVIDERS = GRAFANA / "provisioning" / "dashboards"
KEYWORDS = ("by", "without", "on", "ignoring", "bool", "offset")
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
# the panels the issue asks for, by the metric each one needs
REQUIRED = {
    "gateway_requests_total",  # requests/s by status
    "gateway_request_duration_seconds_bucket",  # p50/p95 latency
    "gateway_time_to_first_reasoning_token_seconds_bucket",
    "gateway_time_to_first_answer_token_seconds_bucket",
    "gateway_tokens_total",  # reasoning vs answer tokens/s
    "gateway_think_anomalies_total",
    "gateway_upstream_errors_total",
    "gateway_reasoning_budget_hits_total",  # reasoning budget and labels (issue 12)
    "gateway_forced_answers_total",
    "gateway_reasoning_budget_used_ratio_bucket",
    "gateway_constrained_answers_total",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:generation_tokens_total",
}


@cache
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    out = []
    for panel in dashboard()["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return [p for p in out if p["type"] != "row"]


def exprs() -> list[str]:
    return [t["expr"] for p in panels() for t in p["targets"]]


def promql(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """(metric name, {label: matcher value}) of every series selector in a PromQL expression."""
    found = []
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        name, rest = m[0], expr[m.end() :]
        before = expr[: m.start()]
        if before.endswith(("$", '"', "'")) or re.search(r"[{\[][^}\]]*$", before):
            continue  # a Grafana variable, a string, a matcher's label or a range duration
        if re.search(r"(by|without)\s*\([^)]*$", before):
            continue  # a grouping label
        if re.match(r"\s*((by|without)\s*)?\(", rest) or name in KEYWORDS:
            continue  # a function or keyword
        matchers = {}
        if rest.startswith("{"):
            body = rest[1 : rest.index("}")]
            matchers = dict(re.findall(r'(\w+)\s*=~?\s*"([^"]*)"', body))
        found.append((name, matchers))
    return found


def grouping_labels(expr: str) -> set[str]:
    labels = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels |= {x.strip() for x in group.split(",") if x.strip()}
    return labels


# ---- static --------------------------------------------------------------------------------


def test_every_panel_uses_the_provisioned_datasource():
    (source,) = [
        ds for f in DATASOURCES.glob("*.yml") for ds in yaml.safe_load(f.read_text())["datasources"]
    ]
    assert source["type"] == "prometheus"
    s = services()
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", source["url"]).groups()
    assert host in s and any(p["target"] == int(port) for p in s[host]["ports"])
    assert panels(), "empty dashboard"
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == source["uid"], panel["title"]


def test_grafana_loads_the_provisioning_and_the_dashboard_from_the_repo():
    grafana = services()["grafana"]
    mounts = {
        Path(m["source"]).resolve(): m["target"] for m in grafana["volumes"] if m["type"] == "bind"
    }
    assert mounts[(GRAFANA / "provisioning").resolve()] == "/etc/grafana/provisioning"
    (provider,) = yaml.safe_load((PROVIDERS / "distill.yml").read_text())["providers"]
    assert mounts[DASHBOARD.parent.resolve()] == provider["options"]["path"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids)) and dashboard()["uid"]


def test_every_query_is_valid_promql(tmp_path):
    """promtool parses each expression (as a recording rule) exactly as Prometheus would."""
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.fail("promtool not found: apt-get install prometheus (make setup)")
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"panel:q{i}", "expr": promql(e)} for i, e in enumerate(exprs())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules, allow_unicode=True))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_issue_panels_are_there():
    names = {name for e in exprs() for name, _ in selectors(promql(e))}
    assert names >= REQUIRED, REQUIRED - names
    for name in names:  # nothing but our two sources
        assert name.startswith(("gateway_", "vllm:")), name


# ---- against real scrapes ------------------------------------------------------------------


def scrape_index(text: str) -> dict[str, list[dict[str, str]]]:
    """Sample name -> label sets, from a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    index: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            index.setdefault(sample.name, []).append(dict(sample.labels))
    return index


def check_against_scrape(prefix: str, text: str) -> None:
    """Every metric the dashboard queries under ``prefix`` is scraped, with the labels the
    queries group by and the label values they select."""
    index = scrape_index(text)
    checked = 0
    for expr in map(promql, exprs()):
        sel = [(n, m) for n, m in selectors(expr) if n.startswith(prefix)]
        for name, matchers in sel:
            assert name in index, f"{name} is not in the {prefix.rstrip('_:')} scrape: {expr}"
            for label, pattern in matchers.items():
                values = {s.get(label) for s in index[name]}
                for value in pattern.split("|"):
                    assert value in values, f"{name}{{{label}={value!r}}} never scraped"
            checked += 1
        for label in grouping_labels(expr) if sel else ():
            assert any(label in s for name, _ in sel for s in index[name]), (
                f"{expr}: no series has label {label!r}"
            )
    assert checked, f"no {prefix} metric checked"


@pytest.mark.slow
def test_gateway_metric_names_exist_in_a_real_scrape(tmp_path, monkeypatch):
    import openai

    from tests.fixtures_gateway import start_gateway, start_standin

    teacher = start_standin(tmp_path, reasoning_format="inline")
    gw = None
    try:
        # shadow on (the stand-in as its own teacher), so the shadow panels' series exist
        monkeypatch.setenv(
            "GATEWAY_SHADOW_TEACHER", f"url={teacher.base_url},model={teacher.model}"
        )
        monkeypatch.setenv("GATEWAY_SHADOW_RATE", "1.0")
        gw = start_gateway(
            tmp_path,
            upstreams=teacher.base_url,
            think="separate",
            tasks={teacher.model: ROOT / "configs/tasks/news.yaml"},  # budget/label series
        )
        client = openai.OpenAI(base_url=gw.base_url, api_key="none", max_retries=0)
        messages = [{"role": "user", "content": "新闻分类:国足客场二比一逆转取胜"}]
        chunks = list(
            client.chat.completions.create(model=teacher.model, messages=messages, stream=True)
        )
        assert chunks
        client.chat.completions.create(model=teacher.model, messages=messages)
        text = httpx.get(gw.root_url + "/metrics", timeout=10).text
    finally:
        if gw:
            gw.stop()
        teacher.stop()
    check_against_scrape("gateway_", text)


@pytest.mark.slow
def test_vllm_metric_names_exist_in_a_real_scrape(request):
    import openai

    try:
        server = request.getfixturevalue("vllm_server")
    except pytest.FixtureLookupError:
        pytest.skip("the shared vllm_server fixture (tests/fixtures_vllm.py) is not there yet")
    client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
    client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "新闻分类:央行宣布下调存款准备金率"}],
        max_tokens=8,
    )
    text = httpx.get(server.root_url + "/metrics", timeout=10).text
    check_against_scrape("vllm:", text)
