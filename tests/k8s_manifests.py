"""Helpers for tests/test_k8s.py: render the kustomize overlays offline and read what they say.

``kubectl kustomize`` (kubectl v1.32, kustomize v5) renders; CRD objects validate against the
CRD schemas vendored in tests/k8s/crds (their README says which release each comes from);
a small NetworkPolicy evaluator answers "may pod A reach pod B on port P".
"""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT

K8S = ROOT / "k8s"
OVERLAYS = ("single-gpu", "multi-gpu")
CRDS = ROOT / "tests" / "k8s" / "crds"
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")

Obj = dict[str, Any]


def kubectl() -> str:
    exe = shutil.which("kubectl")
    if not exe:
        pytest.fail("kubectl not found: the k8s checks need kubectl >= 1.32 (kustomize v5)")
    return exe


def kustomize(path: Path) -> list[Obj]:
    """``kubectl kustomize PATH``: the rendered objects."""
    proc = subprocess.run(
        [kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@cache
def rendered(overlay: str) -> tuple[Obj, ...]:
    return tuple(kustomize(K8S / "overlays" / overlay))


def find(objs: tuple[Obj, ...] | list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [
        o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objs: tuple[Obj, ...] | list[Obj], kind: str, name: str) -> Obj:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_spec(obj: Obj) -> Obj:
    """The pod template's spec of a Deployment, Job or JobSet (its first replicated job)."""
    if obj["kind"] == "JobSet":
        return obj["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def pod_labels(obj: Obj) -> dict[str, str]:
    if obj["kind"] == "JobSet":
        template = obj["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
        # the JobSet controller labels its pods with the JobSet's name
        return {
            **template["metadata"]["labels"],
            "jobset.sigs.k8s.io/jobset-name": obj["metadata"]["name"],
        }
    return obj["spec"]["template"]["metadata"]["labels"]


WORKLOAD_KINDS = ("Deployment", "Job", "JobSet")


def workloads(objs: tuple[Obj, ...]) -> list[Obj]:
    return [o for o in objs if o["kind"] in WORKLOAD_KINDS]


def container(obj: Obj) -> Obj:
    (c,) = pod_spec(obj)["containers"]
    return c


# ---- environment and $(VAR) expansion ------------------------------------------------------


def env_values(objs: tuple[Obj, ...], c: Obj) -> dict[str, str]:
    """The container's environment as the kubelet builds it (fieldRefs: a sample value)."""
    out: dict[str, str] = {}
    for var in c.get("env", []):
        src = var.get("valueFrom")
        if src is None:
            out[var["name"]] = var.get("value", "")
        elif "configMapKeyRef" in src:
            ref = src["configMapKeyRef"]
            out[var["name"]] = one(objs, "ConfigMap", ref["name"])["data"][ref["key"]]
        elif "secretKeyRef" in src:
            out[var["name"]] = f"<secret {src['secretKeyRef']['name']}>"
        elif "fieldRef" in src:
            out[var["name"]] = "0"
        else:
            raise AssertionError(f"unexpected env source {src}")
    return out


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion in command and args; an undefined name is an error
    here (Kubernetes would pass ``$(VAR)`` through verbatim)."""

    def sub(m: re.Match[str]) -> str:
        assert m.group(1) in env, f"$({m.group(1)}) is not in the container's environment"
        return env[m.group(1)]

    return VAR_REF.sub(sub, text)


def argv(objs: tuple[Obj, ...], obj: Obj, entrypoint: list[str]) -> list[str]:
    """The process a workload runs: command (or the image's entrypoint) + args, expanded."""
    c = container(obj)
    env = env_values(objs, c)
    command = c.get("command", entrypoint)
    return [expand(a, env) for a in [*command, *c.get("args", [])]]


# ---- CRD schemas ---------------------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """A CRD's openAPIV3Schema as JSON Schema, with unknown fields refused (what the API
    server does with ``--validate=strict``, kubectl's default)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    for key in ("properties", "patternProperties"):
        if key in schema:  # property names are not schemas
            out[key] = {name: _strict(s) for name, s in schema[key].items()}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "(?i)" in out.get("pattern", ""):  # Go's RE2 allows the flag mid-pattern, Python not
        out["pattern"] = "(?i)" + out["pattern"].replace("(?i)", "")
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    out.pop("nullable", None)
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def crd_schemas() -> dict[tuple[str, str], Obj]:
    """(apiVersion, kind) -> JSON Schema of every served version of the vendored CRDs."""
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd:
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served"):
                    raw = version["schema"]["openAPIV3Schema"]
                    schema = _strict(raw)
                    # metadata is checked by the API server's ObjectMeta, not the CRD schema
                    schema["properties"]["metadata"] = {"type": "object"}
                    schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


# ---- NetworkPolicy -------------------------------------------------------------------------


def _selects(selector: Obj | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        has, val = expr["key"] in labels, labels.get(expr["key"])
        op = expr["operator"]
        if (
            (op == "In" and val not in expr["values"])
            or (op == "NotIn" and val in expr["values"])
            or (op == "Exists" and not has)
            or (op == "DoesNotExist" and has)
        ):
            return False
    return True


def _peer_admits(peer: Obj, src_ns: dict[str, str], src: dict[str, str], same_ns: bool) -> bool:
    if "ipBlock" in peer:
        return False  # no rule of ours admits by address
    ns_ok = _selects(peer["namespaceSelector"], src_ns) if "namespaceSelector" in peer else same_ns
    return ns_ok and _selects(peer.get("podSelector"), src)


def allowed(
    policies: list[Obj],
    *,
    src_ns: dict[str, str],
    src: dict[str, str],
    dst: dict[str, str],
    port: int,
    dst_ns_name: str,
) -> bool:
    """May a pod labelled ``src`` in a namespace labelled ``src_ns`` open TCP ``port`` on a pod
    labelled ``dst`` (in ``dst_ns_name``)? Kubernetes' rule: isolated once any ingress policy
    selects the pod; then allowed if any rule of those policies admits the peer and port."""
    same_ns = src_ns.get("kubernetes.io/metadata.name") == dst_ns_name
    selecting = [
        p
        for p in policies
        if p["metadata"].get("namespace") == dst_ns_name
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and _selects(p["spec"]["podSelector"], dst)
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            ports = rule.get("ports")
            port_ok = ports is None or any(
                p.get("port") in (None, port) and p.get("protocol", "TCP") == "TCP" for p in ports
            )
            peers = rule.get("from")
            peer_ok = peers is None or any(_peer_admits(x, src_ns, src, same_ns) for x in peers)
            if port_ok and peer_ok:
                return True
    return False
