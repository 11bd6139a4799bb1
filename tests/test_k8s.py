"""k8s/: the kustomize overlays, checked offline (no cluster).

Each overlay renders with ``kubectl kustomize``; every object validates against the Kubernetes
1.32 OpenAPI schemas (``kubernetes-validate``, strict) or, for custom resources, against the CRD
schemas vendored in tests/k8s/crds; checkov runs clean with tests/k8s/checkov.yaml; the command
lines parse with the real ``distill`` CLI and accelerate's launcher, and agree with
docker-compose.gpu.yml (images, settings, environment names).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests import test_compose as compose
from tests.conftest import ROOT
from tests.k8s_manifests import (
    K8S,
    OVERLAYS,
    argv,
    container,
    crd_schemas,
    find,
    one,
    rendered,
    workloads,
)

K8S_VERSION = "1.32.0"
CHECKOV = Path(os.environ.get("CHECKOV", ROOT / ".venv-checkov" / "bin" / "checkov"))
CHECKOV_CONFIG = ROOT / "tests" / "k8s" / "checkov.yaml"
SETTINGS_ENV = K8S / "base" / "infra" / "settings.env"
DASHBOARD = ROOT / "compose" / "grafana" / "dashboards" / "distill.json"
NAMESPACE = "distill"
# compose services whose workload in k8s has the same name, image and command line
ROLES = ("generate", "train", "merge", "vllm", "gateway")
# environment names compose uses that the cluster replaces, and with what
REPLACED_ENV = {
    "GATEWAY_UPSTREAMS": "GATEWAY_UPSTREAMS_DNS",  # the headless Service, re-resolved
    "GATEWAY_API_KEYS": "GATEWAY_API_KEYS_FILE",  # keys as a mounted Secret file
    "HF_TOKEN": "HF_TOKEN_PATH",  # the token as a mounted Secret file
}
# environment names compose sets that the cluster leaves at the default, and why
OMITTED_ENV = {
    # compose passes it through for keyless use on a trusted host; the cluster requires keys
    # (the gateway does not start without its keys Secret), and the default is false
    "GATEWAY_ALLOW_ANONYMOUS",
}
# settings.env values that differ from .env.example on purpose
SETTINGS_DIFFER = {"VLLM_EXTRA_ARGS"}  # an explicit --gpu-memory-utilization
SECRETS = {"distill-teacher", "distill-hf", "distill-gateway-keys"}


def workload(overlay: str, name: str) -> dict:
    objs = rendered(overlay)
    found = [o for o in workloads(objs) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{overlay}: expected one workload {name}, found {len(found)}"
    return found[0]


def k8s_argv(overlay: str, name: str) -> list[str]:
    """What a workload's container runs, $(VAR)s expanded, with the image's entrypoint."""
    svc = compose.services()[name]
    entry = compose.image_entrypoint(svc["build"]["dockerfile"])
    return argv(rendered(overlay), workload(overlay, name), entry)


def launch_args(args: list[str]) -> list[str]:
    """The ``accelerate launch`` part of a training command line (after run-once's ``--``)."""
    launch = args[args.index("--") + 1 :]
    assert launch[:2] == ["accelerate", "launch"], launch
    return launch[2:]


# ---- 1. render -----------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_piece(overlay):
    objs = rendered(overlay)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objs}
    for piece in [
        ("Deployment", "vllm"), ("Service", "vllm-headless"), ("Deployment", "gateway"),
        ("Service", "gateway"), ("HorizontalPodAutoscaler", "gateway"),
        ("PodDisruptionBudget", "gateway"), ("Job", "generate"), ("Job", "merge"),
        ("ServiceMonitor", "gateway"), ("PodMonitor", "vllm"), ("PrometheusRule", "distill"),
        ("ConfigMap", "distill-grafana-dashboard"), ("NetworkPolicy", "vllm"),
        ("NetworkPolicy", "gateway"),
    ]:  # fmt: skip
        assert piece in kinds, f"{overlay}: {piece} missing"
    for o in objs:
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == NAMESPACE, o["metadata"]["name"]
        assert o["metadata"]["labels"]["distill.stage"] in {
            "infra", "generate", "train", "merge", "serve"
        }, f"{o['kind']}/{o['metadata']['name']} has no stage for make k8s-up"  # fmt: skip


def test_single_gpu_trains_on_one_gpu_and_serves_one_replica():
    objs = rendered("single-gpu")
    assert one(objs, "Deployment", "vllm")["spec"].get("replicas", 1) == 1
    assert find(objs, "JobSet") == []
    train = one(objs, "Job", "train")
    assert container(train)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert compose.option(launch_args(k8s_argv("single-gpu", "train")), "--num_processes") == "1"


def test_multi_gpu_has_replicas_multi_node_training_and_rwx_volumes():
    objs = rendered("multi-gpu")
    assert one(objs, "Deployment", "vllm")["spec"]["replicas"] >= 2
    assert find(objs, "Job", "train") == [], "the JobSet replaces the one-node Job"
    jobset = one(objs, "JobSet", "train")
    spec = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert spec["parallelism"] >= 2
    for pvc in find(objs, "PersistentVolumeClaim"):
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], pvc["metadata"]["name"]
    hpa = one(objs, "HorizontalPodAutoscaler", "gateway")
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"] >= 2


# ---- 2. schemas ----------------------------------------------------------------------------


def validate(obj: dict) -> None:
    """Kubernetes 1.32's schema for built-in kinds, the vendored CRD schema for the rest."""
    key = (obj["apiVersion"], obj["kind"])
    schema = crd_schemas().get(key)
    if schema is not None:
        jsonschema.validate(obj, schema, cls=jsonschema.Draft7Validator)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_its_schema(overlay):
    errors = []
    for obj in rendered(overlay):
        try:
            validate(obj)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as e:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {e}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{obj['kind']} ({obj['apiVersion']}): no schema, vendor its CRD")
    assert not errors, "\n".join(errors)


def test_custom_resources_are_checked_against_vendored_crds():
    builtin = {"", "apps", "batch", "autoscaling", "policy", "networking.k8s.io"}
    kinds = {(o["apiVersion"], o["kind"]) for ov in OVERLAYS for o in rendered(ov)}
    custom = {k for k in kinds if k[0].rpartition("/")[0] not in builtin}
    assert custom == {
        ("monitoring.coreos.com/v1", "ServiceMonitor"),
        ("monitoring.coreos.com/v1", "PodMonitor"),
        ("monitoring.coreos.com/v1", "PrometheusRule"),
        ("jobset.x-k8s.io/v1alpha2", "JobSet"),
    }
    assert custom <= set(crd_schemas())


@pytest.mark.parametrize(
    ("kind", "path", "value"),
    [
        ("Deployment", ["spec", "template", "spec", "containers", 0, "gpus"], 1),
        ("ServiceMonitor", ["spec", "endpoints", 0, "interval"], "fifteen seconds"),
        ("JobSet", ["spec", "replicatedJobs", 0, "replica"], 2),
        ("PrometheusRule", ["spec", "groups", 0, "rules", 0, "for"], 300),
    ],
)
def test_schema_check_refuses_a_broken_object(kind, path, value):
    """The validation above can fail: a misspelt field or a wrong type is refused."""
    obj = json.loads(json.dumps(find(rendered("multi-gpu"), kind)[0]))
    node = obj
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate(obj)


# ---- 3. checkov ----------------------------------------------------------------------------


def run_checkov(manifest: Path) -> subprocess.CompletedProcess:
    if not CHECKOV.exists():
        pytest.fail(f"{CHECKOV} not found: `make setup` creates .venv-checkov (mk/k8s.mk)")
    return subprocess.run(
        [str(CHECKOV), "--config-file", str(CHECKOV_CONFIG), "-f", str(manifest), "-o", "json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_checkov_passes_with_the_documented_skips(overlay, tmp_path):
    manifest = tmp_path / f"{overlay}.yaml"
    manifest.write_text(yaml.safe_dump_all(rendered(overlay)))
    proc = run_checkov(manifest)
    report = json.loads(proc.stdout)
    summary = report["summary"]
    failed = [
        f"{c['check_id']} {c['resource']}: {c['check_name']}"
        for c in report["results"]["failed_checks"]
    ]
    assert summary["failed"] == 0 and proc.returncode == 0, "\n".join(failed)
    assert summary["parsing_errors"] == 0
    assert summary["passed"] > 100  # it did look at the workloads
    skipped = {(c["check_id"], c["resource"]) for c in report["results"]["skipped_checks"]}
    assert skipped == {
        ("CKV_K8S_35", "Job.distill.generate"),
        ("CKV_K8S_35", "Deployment.distill.gateway"),
    }


def test_checkov_finds_what_it_should(tmp_path):
    """A privileged container with a writable root filesystem fails the same run."""
    objs = json.loads(json.dumps(rendered("single-gpu")))
    gw = one(objs, "Deployment", "gateway")
    container(gw)["securityContext"] = {"privileged": True}
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(yaml.safe_dump_all(objs))
    report = json.loads(run_checkov(manifest).stdout)
    ids = {c["check_id"] for c in report["results"]["failed_checks"]}
    assert {"CKV_K8S_16", "CKV_K8S_22"} <= ids, ids


# ---- 4. the commands are the CLI -----------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("name", ["generate", "train", "merge", "vllm"])
def test_every_command_parses_with_the_distill_cli(overlay, name):
    args = k8s_argv(overlay, name)
    compose._cli_parse(compose.distill_argv({"entrypoint": args}))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_training_launcher_parses_and_its_numbers_agree(overlay):
    from accelerate.commands.launch import launch_command_parser

    obj = workload(overlay, "train")
    args = k8s_argv(overlay, "train")
    parsed = launch_command_parser().parse_args(launch_args(args))
    assert parsed.module and parsed.training_script == "pipeline.cli"
    assert (ROOT / parsed.config_file).is_file(), parsed.config_file
    gpus = int(container(obj)["resources"]["limits"]["nvidia.com/gpu"])
    machines = parsed.num_machines or 1
    assert parsed.num_processes == machines * gpus
    if obj["kind"] == "JobSet":
        rjob = obj["spec"]["replicatedJobs"][0]
        job = rjob["template"]["spec"]
        assert job["parallelism"] == job["completions"] == machines >= 2
        assert job["completionMode"] == "Indexed" and rjob["replicas"] == 1
        # rank 0's stable DNS name: <jobset>-<replicated job>-<job index>-<pod index>.<subdomain>
        net = obj["spec"]["network"]
        assert net["enableDNSHostnames"]
        rank0 = f"{obj['metadata']['name']}-{rjob['name']}-0-0.{net['subdomain']}"
        assert parsed.main_process_ip == rank0
        assert parsed.rdzv_backend == "static" and parsed.main_process_port
        # each pod's machine rank is its completion index
        (rank,) = [e for e in container(obj)["env"] if e["name"] == "MACHINE_RANK"]
        path = rank["valueFrom"]["fieldRef"]["fieldPath"]
        assert path == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        assert "$(MACHINE_RANK)" in container(obj)["args"]


def test_undefined_variable_in_a_command_is_caught():
    objs = json.loads(json.dumps(rendered("single-gpu")))
    gen = one(objs, "Job", "generate")
    container(gen)["args"].append("$(NOT_SET)")
    with pytest.raises(AssertionError, match="NOT_SET"):
        argv(tuple(objs), gen, ["distill"])


# ---- 5. the same images, settings and environment names as compose --------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("name", ROLES)
def test_images_match_compose(overlay, name):
    assert container(workload(overlay, name))["image"] == compose.services()[name]["image"]


@pytest.mark.parametrize("name", ["generate", "train", "merge"])
def test_job_command_lines_are_compose_command_lines(name):
    """With settings.env's values, the one-node jobs run exactly what compose runs."""
    assert k8s_argv("single-gpu", name) == compose.argv(compose.services()[name])


def test_vllm_command_line_is_compose_except_the_memory_share():
    k8s, dc = k8s_argv("multi-gpu", "vllm"), compose.argv(compose.services()["vllm"])
    i = dc.index("--extra")
    assert k8s[: i + 1] == dc[: i + 1] and k8s[i + 2 :] == dc[i + 2 :]
    assert k8s[i + 1] == "--gpu-memory-utilization 0.90"


def read_env_file(path: Path) -> dict[str, str]:
    pairs = re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", path.read_text(), re.M)
    return dict(pairs)


def test_settings_have_compose_names_and_defaults():
    settings, example = read_env_file(SETTINGS_ENV), compose.env_example()
    assert set(settings) <= set(example), "settings.env has names .env.example lacks"
    for key, value in settings.items():
        if key not in SETTINGS_DIFFER:
            assert value == example[key], key
    assert not set(settings) & set(compose.SECRET_VARS), "a secret in settings.env"


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("name", ROLES)
def test_environment_names_match_compose(overlay, name):
    env = {e["name"] for e in container(workload(overlay, name)).get("env", [])}
    for var in set(compose.services()[name].get("environment") or {}) - OMITTED_ENV:
        assert REPLACED_ENV.get(var, var) in env, f"{name}: {var} missing"


def test_gateway_environment_is_gateway_settings():
    from gateway.settings import Settings
    from gateway.shadow import ShadowSettings

    fields = {f"GATEWAY_{f.upper()}" for f in Settings.model_fields}
    fields |= {f"GATEWAY_SHADOW_{f.upper()}" for f in ShadowSettings.model_fields}
    env = {e["name"] for e in container(workload("multi-gpu", "gateway"))["env"]}
    assert {e for e in env if e.startswith("GATEWAY_")} <= fields


def test_vllm_container_starts_vllm_with_the_memory_share(tmp_path):
    """``distill serve --dry-run`` with the container's arguments prints the vLLM command."""
    args = compose.distill_argv({"entrypoint": k8s_argv("multi-gpu", "vllm")})
    model = tmp_path / "merged"
    model.mkdir()
    (model / "config.json").write_text("{}")
    args[args.index("--model") + 1] = str(model)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args, "--dry-run"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    cmd = shlex.split(proc.stdout.strip().splitlines()[-1])
    assert compose.option(cmd, "--gpu-memory-utilization") == "0.90"
    assert (
        compose.option(cmd, "--served-model-name")
        == read_env_file(SETTINGS_ENV)["SERVED_MODEL_NAME"]
    )
