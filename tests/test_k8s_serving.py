"""k8s/: what the overlays promise, checked offline (tests/test_k8s.py renders and validates).

Serving (probes, GPUs, volumes, discovery through the headless Service, HPA, PDB, keys from a
Secret), security contexts, no secret values, the NetworkPolicies evaluated for who may reach
whom, monitoring (promtool on the alert rules, the dashboard ConfigMap) and the make chain.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests import test_compose as compose
from tests.conftest import ROOT
from tests.k8s_manifests import (
    OVERLAYS,
    allowed,
    container,
    env_values,
    find,
    one,
    pod_labels,
    pod_spec,
    rendered,
    workloads,
)
from tests.test_k8s import DASHBOARD, NAMESPACE, SECRETS, k8s_argv, workload

# ---- serving -------------------------------------------------------------------------------


def probe_budget(probe: dict) -> int:
    return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_vllm_probes_gpu_shm_cache_and_model_volume(overlay):
    objs = rendered(overlay)
    vllm = one(objs, "Deployment", "vllm")
    c, spec = container(vllm), pod_spec(vllm)
    args = k8s_argv(overlay, "vllm")
    port = int(compose.option(args, "--port"))
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[kind]["httpGet"]
        assert get["path"] == "/health" and named[get["port"]] == port, kind
    assert probe_budget(c["startupProbe"]) >= 600, "a 7B load takes minutes"
    limits = c["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == compose.option(args, "--tensor-parallel-size")
    assert c["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    env = env_values(objs, c)
    assert env["HF_HUB_OFFLINE"] == "1"
    cache = volumes[mounts[env["VLLM_CACHE_ROOT"]]["name"]]
    assert cache["persistentVolumeClaim"]["claimName"] == "vllm-cache"
    # the model is what merge wrote on the shared volume, mounted read-only here
    model = compose.option(args, "--model")
    merge_out = compose.option(k8s_argv(overlay, "merge"), "--out")
    assert model == merge_out
    root = "/" + model.strip("/").split("/")[0]
    assert mounts[root]["readOnly"]
    assert volumes[mounts[root]["name"]]["persistentVolumeClaim"]["claimName"] == "runs"
    merge = workload(overlay, "merge")
    merge_mounts = {m["mountPath"]: m["name"] for m in container(merge)["volumeMounts"]}
    merge_vols = {v["name"]: v for v in pod_spec(merge)["volumes"]}
    assert merge_vols[merge_mounts[root]]["persistentVolumeClaim"]["claimName"] == "runs"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_finds_vllm_through_the_headless_service(overlay):
    objs = rendered(overlay)
    svc = one(objs, "Service", "vllm-headless")
    assert svc["spec"]["clusterIP"] == "None"
    vllm = one(objs, "Deployment", "vllm")
    assert svc["spec"]["selector"].items() <= pod_labels(vllm).items()
    port = int(compose.option(k8s_argv(overlay, "vllm"), "--port"))
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port["port"] == port
    env = env_values(objs, container(one(objs, "Deployment", "gateway")))
    host, _, dns_port = env["GATEWAY_UPSTREAMS_DNS"].partition(":")
    assert host.split(".")[0] == "vllm-headless" and int(dns_port) == port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_counts_tokens_with_the_tokenizer_of_the_model_vllm_serves(overlay):
    objs = rendered(overlay)
    gw = one(objs, "Deployment", "gateway")
    c = container(gw)
    model = compose.option(k8s_argv(overlay, "vllm"), "--model")
    assert env_values(objs, c)["GATEWAY_TOKENIZER"] == model
    root = "/" + model.strip("/").split("/")[0]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts[root]["readOnly"]
    volumes = {v["name"]: v for v in pod_spec(gw)["volumes"]}
    claim = volumes[mounts[root]["name"]]["persistentVolumeClaim"]
    assert claim == {"claimName": "runs", "readOnly": True}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_scales_keeps_a_pod_and_reads_keys_from_a_secret(overlay):
    objs = rendered(overlay)
    gw = one(objs, "Deployment", "gateway")
    assert "replicas" not in gw["spec"], "the HPA owns the replica count"
    hpa = one(objs, "HorizontalPodAutoscaler", "gateway")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"
    }  # fmt: skip
    assert hpa["spec"]["minReplicas"] >= 1
    pdb = one(objs, "PodDisruptionBudget", "gateway")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels(gw).items()
    c = container(gw)
    env = env_values(objs, c)
    assert env["GATEWAY_PORT"] == str(c["ports"][0]["containerPort"])
    assert env["GATEWAY_HOST"] == "0.0.0.0"
    keys = Path(env["GATEWAY_API_KEYS_FILE"])
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(gw)["volumes"]}
    secret = volumes[mounts[str(keys.parent)]]["secret"]
    assert secret["secretName"] == "distill-gateway-keys"
    assert not secret.get("optional"), "without keys the gateway must not start"


# ---- security ------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_non_root_read_only_without_capabilities(overlay):
    for obj in workloads(rendered(overlay)):
        spec, name = pod_spec(obj), obj["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        assert not any("hostPath" in v for v in spec.get("volumes", [])), name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert not sc.get("privileged"), name
            assert c["image"].rpartition(":")[2] not in ("", "latest"), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_values_only_references_to_documented_secrets(overlay):
    objs = rendered(overlay)
    assert find(objs, "Secret") == []
    used = set()
    for obj in workloads(objs):
        for c in pod_spec(obj)["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    used.add(ref["name"])
        for v in pod_spec(obj).get("volumes", []):
            if "secret" in v:
                used.add(v["secret"]["secretName"])
    assert used <= SECRETS and "distill-gateway-keys" in used
    readme = (ROOT / "README.md").read_text()
    for name in SECRETS:
        assert re.search(rf"create secret generic {name}\b", readme), f"README: {name}"


# ---- network -------------------------------------------------------------------------------

INGRESS_NS = {"kubernetes.io/metadata.name": "ingress-nginx"}
MONITORING_NS = {"kubernetes.io/metadata.name": "monitoring"}
OWN_NS = {"kubernetes.io/metadata.name": NAMESPACE}
PROMETHEUS = {"app.kubernetes.io/name": "prometheus"}


def reach(overlay: str, src_ns: dict, src: dict, dst_name: str, port: int) -> bool:
    objs = rendered(overlay)
    dst = pod_labels(next(o for o in workloads(objs) if o["metadata"]["name"] == dst_name))
    return allowed(
        find(objs, "NetworkPolicy"), src_ns=src_ns, src=src, dst=dst, port=port,
        dst_ns_name=NAMESPACE,
    )  # fmt: skip


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_gateway_reaches_vllm_and_only_the_ingress_the_gateway(overlay):
    objs = rendered(overlay)
    labels = {o["metadata"]["name"]: pod_labels(o) for o in workloads(objs)}
    assert reach(overlay, OWN_NS, labels["gateway"], "vllm", 8000)
    for other in ("generate", "merge", "train"):
        assert not reach(overlay, OWN_NS, labels[other], "vllm", 8000), other
        assert not reach(overlay, OWN_NS, labels[other], "gateway", 8080), other
    assert not reach(overlay, INGRESS_NS, {}, "vllm", 8000)
    assert reach(overlay, INGRESS_NS, {}, "gateway", 8080)
    assert not reach(overlay, {"kubernetes.io/metadata.name": "default"}, {}, "gateway", 8080)
    assert not reach(overlay, OWN_NS, labels["vllm"], "gateway", 8080)
    assert not reach(overlay, OWN_NS, labels["gateway"], "vllm", 9999)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_still_scrapes_both(overlay):
    objs = rendered(overlay)
    gw_svc = one(objs, "Service", "gateway")
    sm = one(objs, "ServiceMonitor", "gateway")
    assert sm["spec"]["selector"]["matchLabels"].items() <= gw_svc["metadata"]["labels"].items()
    (ep,) = sm["spec"]["endpoints"]
    (svc_port,) = [p for p in gw_svc["spec"]["ports"] if p["name"] == ep["port"]]
    gw = one(objs, "Deployment", "gateway")
    gw_port = {p["name"]: p["containerPort"] for p in container(gw)["ports"]}[
        svc_port["targetPort"]
    ]
    pm = one(objs, "PodMonitor", "vllm")
    vllm = one(objs, "Deployment", "vllm")
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels(vllm).items()
    (pep,) = pm["spec"]["podMetricsEndpoints"]
    vllm_port = {p["name"]: p["containerPort"] for p in container(vllm)["ports"]}[pep["port"]]
    assert ep["path"] == pep["path"] == "/metrics"
    assert reach(overlay, MONITORING_NS, PROMETHEUS, "gateway", gw_port)
    assert reach(overlay, MONITORING_NS, PROMETHEUS, "vllm", vllm_port)
    assert not reach(overlay, MONITORING_NS, {"app.kubernetes.io/name": "grafana"}, "vllm", 8000)
    # the job label is compose's scrape job name, which the alerts select on
    assert sm["spec"]["jobLabel"] == pm["spec"]["jobLabel"] == "app.kubernetes.io/name"
    assert gw_svc["metadata"]["labels"]["app.kubernetes.io/name"] == "gateway"
    assert pod_labels(vllm)["app.kubernetes.io/name"] == "vllm"


def test_training_nodes_reach_each_other():
    objs = rendered("multi-gpu")
    train = pod_labels(one(objs, "JobSet", "train"))
    assert reach("multi-gpu", OWN_NS, train, "train", 29500)
    gen = pod_labels(one(objs, "Job", "generate"))
    assert not reach("multi-gpu", OWN_NS, gen, "train", 29500)


# ---- monitoring ----------------------------------------------------------------------------


def promql_metrics(expr: str) -> set[str]:
    names = set(re.findall(r"\b([a-z_:][a-z0-9_:]*)\s*(?:\{|\[)", expr))
    return {n.removesuffix("_bucket") for n in names}


def test_alert_rules_pass_promtool_and_use_dashboard_metrics(tmp_path):
    from tests.test_prometheus import promtool

    rule = one(rendered("single-gpu"), "PrometheusRule", "distill")
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    proc = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    shown = set().union(*(promql_metrics(e) for e in exprs))
    rules = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    assert len(rules) >= 6
    for r in rules:
        used = promql_metrics(r["expr"]) - {"up"}
        assert used <= shown, f"{r['alert']}: {used - shown} is on no dashboard panel"
        assert r["labels"]["severity"] in {"warning", "critical"}
        assert r["annotations"]["summary"]


def test_dashboard_configmap_is_the_compose_dashboard():
    objs = rendered("single-gpu")
    cm = one(objs, "ConfigMap", "distill-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"]["distill.json"] == DASHBOARD.read_text()
    panels = json.loads(DASHBOARD.read_text())["panels"]
    uids = {p["datasource"]["uid"] for p in panels if "datasource" in p}
    ds = one(objs, "ConfigMap", "distill-grafana-datasource")
    assert ds["metadata"]["labels"]["grafana_datasource"] == "1"
    (provisioning,) = ds["data"].values()
    provided = {d["uid"] for d in yaml.safe_load(provisioning)["datasources"]}
    assert uids <= provided, "the dashboard's datasource uid must exist in the cluster's Grafana"


# ---- the chain -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overlay", "train"), [("single-gpu", "job/train"), ("multi-gpu", "jobset/train")]
)
def test_make_k8s_up_applies_the_stages_in_order_and_waits(overlay, train):
    proc = subprocess.run(
        ["make", "--no-print-directory", "-n", "k8s-up", f"K8S_OVERLAY={overlay}"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    stages = ["infra", "generate", "train", "merge", "serve"]
    at = [out.index(f"distill.stage={s}") for s in stages]
    assert at == sorted(at), out
    for resource in ("job/generate", train, "job/merge"):
        assert re.search(rf"kubectl.* wait .*{resource}", out), resource
    assert out.index("rollout status deployment/vllm") > at[-1]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_settings_from_the_manifest_are_valid(overlay, tmp_path, monkeypatch):
    """The gateway container's environment, as the kubelet builds it, is a valid Settings
    (the files it names on mounted volumes replaced by local ones)."""
    from tokenizers import Tokenizer, models

    from gateway.settings import Settings

    objs = rendered(overlay)
    env = env_values(objs, container(one(objs, "Deployment", "gateway")))
    keys = tmp_path / "keys"
    keys.write_text("sk-test-0123456789\n")
    Tokenizer(models.BPE()).save(str(tmp_path / "tokenizer.json"))  # for /runs/merged
    local = {"GATEWAY_API_KEYS_FILE": str(keys), "GATEWAY_TOKENIZER": str(tmp_path)}
    for name in [n for n in os.environ if n.startswith("GATEWAY_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, local.get(name, value))
    settings = Settings()
    assert settings.upstreams_dns == env["GATEWAY_UPSTREAMS_DNS"]
    assert settings.port == int(env["GATEWAY_PORT"]) and settings.api_keys_file == keys
    assert settings.tokenizer == tmp_path
