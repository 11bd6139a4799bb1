"""compose/prometheus/prometheus.yml: valid for Prometheus, and it scrapes what compose runs."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.conftest import ROOT
from tests.test_compose import distill_argv, option, services

CONFIG = ROOT / "compose" / "prometheus" / "prometheus.yml"
REPLICAS_CONFIG = ROOT / "compose" / "prometheus" / "prometheus-replicas.yml"


def promtool() -> str:
    exe = shutil.which("promtool")
    if not exe:
        pytest.fail("promtool not found: apt-get install prometheus (make setup)")
    return exe


@pytest.mark.parametrize("config", [CONFIG, REPLICAS_CONFIG], ids=lambda p: p.name)
def test_promtool_accepts_the_config(config):
    proc = subprocess.run(
        [promtool(), "check", "config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_rejects_a_broken_config(tmp_path):
    """The check above can fail: a config with an invalid scrape interval is refused."""
    bad = yaml.safe_load(CONFIG.read_text())
    bad["global"]["scrape_interval"] = "five seconds"
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(bad))
    proc = subprocess.run(
        [promtool(), "check", "config", str(path)], capture_output=True, text=True
    )
    assert proc.returncode != 0


def test_scrapes_the_gateway_and_vllm_where_compose_runs_them():
    jobs = {j["job_name"]: j for j in yaml.safe_load(CONFIG.read_text())["scrape_configs"]}
    s = services()
    expected = {
        "gateway": f"gateway:{s['gateway']['environment']['GATEWAY_PORT']}",
        "vllm": f"vllm:{option(distill_argv(s['vllm']), '--port')}",
    }
    for job, target in expected.items():
        assert jobs[job].get("metrics_path", "/metrics") == "/metrics"
        targets = [t for sc in jobs[job]["static_configs"] for t in sc["targets"]]
        assert targets == [target], (job, targets)
    mounts = {m["target"]: m["source"] for m in s["prometheus"]["volumes"]}
    assert mounts["/etc/prometheus/prometheus.yml"] == str(CONFIG)
    assert "--config.file=/etc/prometheus/prometheus.yml" in s["prometheus"]["command"]


def test_replicas_config_scrapes_every_replica_the_override_runs():
    from tests.test_compose import render

    s = render("-f", str(ROOT / "compose" / "replicas.yml"))["services"]
    mounts = {m["target"]: m["source"] for m in s["prometheus"]["volumes"]}
    assert mounts["/etc/prometheus/prometheus.yml"] == str(REPLICAS_CONFIG)
    jobs = {j["job_name"]: j for j in yaml.safe_load(REPLICAS_CONFIG.read_text())["scrape_configs"]}
    targets = {t for sc in jobs["vllm"]["static_configs"] for t in sc["targets"]}
    replicas = {n for n in s if n.startswith("vllm")}
    assert targets == {f"{n}:{option(distill_argv(s[n]), '--port')}" for n in replicas}
    base = {j["job_name"]: j for j in yaml.safe_load(CONFIG.read_text())["scrape_configs"]}
    assert jobs["gateway"] == base["gateway"]
