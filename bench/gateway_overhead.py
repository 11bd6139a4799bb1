"""Gateway overhead, side by side in one run: (a) direct to a stub upstream, (b) through our
gateway, (c) optionally another version of it (``--baseline``), (d) through the LiteLLM proxy —
rounds interleaved so all of them share the machine's state.

    python bench/gateway_overhead.py [--rounds 3] [--seconds 2] [--baseline HEAD~1]
        [--install-litellm] [--json out.json] [--chunk-interval-ms MS]
        [--upstream URL --model NAME]

``--chunk-interval-ms`` paces the stub's stream chunks as a model does, so that each read carries
one chunk and CPU per chunk includes the cost of a read. ``--upstream`` puts a running model
server (vLLM serving the student, say) in the stub's place: the same figures, with the model's own
answers and streams, show what a user would feel of the gateway. #15's goals are defined against
the unpaced stub and are only checked there.

The figures, as issue #15 defines them, each the median of the rounds (range beside it):

* overhead   non-streaming, 1 in flight: p50/p99 latency added over direct;
* capacity   non-streaming, 64 in flight: requests per second;
* streaming  200-chunk streams, 16 in flight: time added per whole stream;
* CPU/chunk  the proxy process's own CPU time (``/proc/<pid>/stat``) over the stream chunks
             it relayed in the streaming phase.

``--baseline`` takes a directory holding another version's ``gateway`` package, or a git ref
(exported with ``git archive``), run with its own packages first on the path. LiteLLM runs
from its own venv ``.venv-litellm`` (``--install-litellm`` creates it); if it is missing or
does not start, it is skipped and the reason printed. The load generator is a minimal
keep-alive HTTP/1.1 client on asyncio streams, so the client costs little and the same for
every target.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
from overhead_report import plot, report, summarise

ROOT = Path(__file__).resolve().parents[1]
LITELLM_VENV = ROOT / ".venv-litellm"
LITELLM_VERSION = "1.108.7"
MASTER_KEY = "sk-bench-master"
MODEL = "student"
CHUNKS = 200
MAX_TOKENS = 256


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Target:
    name: str
    port: int
    key: str | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)
    model: str = MODEL

    def request(self, body: bytes) -> bytes:
        auth = f"Authorization: Bearer {self.key}\r\n" if self.key else ""
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Content-Type: application/json\r\n{auth}Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body


class Conn:
    """One keep-alive HTTP/1.1 connection; reads content-length and chunked bodies."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> Conn:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def send(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        at = lower.find(b"content-length:")
        if at >= 0:
            end = lower.index(b"\r\n", at)
            return status, await self.reader.readexactly(int(lower[at + 15 : end]))
        parts = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                return status, b"".join(parts)
            parts.append(data[:-2])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def body(stream: bool, model: str = MODEL) -> bytes:
    """A chat request as the task's clients send it: the user message only."""
    req = {
        "model": model,
        "messages": [{"role": "user", "content": "新闻分类:国足2比0取胜"}],
        "max_tokens": MAX_TOKENS,  # a bound on a real model's answer; the stub ignores it
    }
    if stream:
        req["stream"] = True
    return orjson.dumps(req)


async def one_in_flight(
    target: Target, seconds: float, payload: bytes | None = None
) -> list[float]:
    """Latencies of back-to-back requests on one connection for ``seconds`` (``payload``:
    the request body; default the non-streamed chat request)."""
    raw = target.request(payload or body(False, target.model))
    conn = await Conn(target.port).open()
    latencies = []
    perf = time.perf_counter
    end = perf() + seconds
    try:
        while perf() < end:
            t = perf()
            status, _ = await conn.send(raw)
            latencies.append(perf() - t)
            assert status == 200, f"{target.name} answered {status}"
    finally:
        conn.close()
    return latencies


async def capacity(target: Target, seconds: float, in_flight: int = 64) -> float:
    raw = target.request(body(False, target.model))
    conns = [await Conn(target.port).open() for _ in range(in_flight)]
    done = 0
    end = time.perf_counter() + seconds

    async def worker(conn: Conn) -> None:
        nonlocal done
        while time.perf_counter() < end:
            status, _ = await conn.send(raw)
            assert status == 200, f"{target.name} answered {status}"
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    elapsed = time.perf_counter() - start
    for conn in conns:
        conn.close()
    return done / elapsed


async def streams(target: Target, seconds: float, in_flight: int = 16) -> tuple[list[float], int]:
    """Durations of whole streams, and the number of SSE events received."""
    raw = target.request(body(True, target.model))
    conns = [await Conn(target.port).open() for _ in range(in_flight)]
    durations: list[float] = []
    events = 0
    end = time.perf_counter() + seconds

    async def worker(conn: Conn) -> None:
        nonlocal events
        while time.perf_counter() < end:
            t = time.perf_counter()
            status, data = await conn.send(raw)
            durations.append(time.perf_counter() - t)
            count = data.count(b"data:")
            ok = status == 200 and count >= 2 and b"error" not in data[-400:]
            assert ok, f"{target.name}: bad stream: {status} {data[-300:]!r}"
            events += count

    await asyncio.gather(*(worker(c) for c in conns))
    for conn in conns:
        conn.close()
    return durations, events


def cpu_seconds(proc: subprocess.Popen | None) -> float | None:
    """User + system CPU time of ``proc`` so far (Linux ``/proc``); None without one."""
    if proc is None:
        return None
    try:
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_up(url: str, proc: subprocess.Popen, timeout: float, headers=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            if httpx.get(url, headers=headers, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url}: not up after {timeout:.0f}s")


def start(argv: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(
            argv, cwd=cwd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT
        )


def install_litellm() -> None:
    subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
    pip = LITELLM_VENV / "bin" / "pip"
    subprocess.run([str(pip), "install", "-q", f"litellm[proxy]=={LITELLM_VERSION}"], check=True)


def start_litellm(upstream: str, model: str, tmp: Path) -> tuple[Target | None, str]:
    exe = LITELLM_VENV / "bin" / "litellm"
    if not exe.exists():
        return None, f"{exe} not found (run with --install-litellm)"
    config = tmp / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {model}\n"
        "    litellm_params:\n"
        f"      model: openai/{model}\n"
        f"      api_base: {upstream}\n"
        "      api_key: none\n"
    )
    port = free_port()
    env = {"LITELLM_MASTER_KEY": MASTER_KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    argv = [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    proc = start(argv, env, tmp / "litellm.log")
    try:
        wait_up(
            f"http://127.0.0.1:{port}/v1/models",
            proc,
            120,
            headers={"Authorization": f"Bearer {MASTER_KEY}"},
        )
    except RuntimeError as e:
        proc.kill()
        tail = (tmp / "litellm.log").read_text(errors="replace")[-800:]
        return None, f"LiteLLM did not start: {e}\n{tail}"
    return Target("litellm", port, MASTER_KEY, proc, model), ""


def baseline_tree(spec: str, tmp: Path) -> Path:
    """``spec`` as a directory to run a gateway from: itself, or the tree of a git ref."""
    if Path(spec).is_dir():
        return Path(spec).resolve()
    out = tmp / "baseline"
    out.mkdir()
    archive = subprocess.run(
        ["git", "archive", spec], cwd=ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


async def run(targets: list[Target], rounds: int, seconds: float) -> dict[str, dict[str, list]]:
    """Per target and per round: latencies, requests/s, stream durations, CPU per chunk."""
    keys = ("lat", "rps", "stream", "cpu_chunk")
    results = {t.name: {k: [] for k in keys} for t in targets}
    for target in targets:  # warm-up: connections, caches, lazy imports
        await one_in_flight(target, 0.3)
        await streams(target, 0.3, in_flight=2)
    for r in range(rounds):
        for target in targets:
            results[target.name]["lat"].append(await one_in_flight(target, seconds))
        for target in targets:
            results[target.name]["rps"].append(await capacity(target, seconds))
        for target in targets:
            before = cpu_seconds(target.proc)
            durations, events = await streams(target, seconds)
            after = cpu_seconds(target.proc)
            results[target.name]["stream"].append(durations)
            if before is not None and after is not None and events:
                results[target.name]["cpu_chunk"].append((after - before) / events)
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr)
    return results


def loopback_port(url: str) -> int:
    """The port of a model server's ``http://127.0.0.1:PORT/v1`` (the load client is local)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.hostname not in ("127.0.0.1", "localhost") or parsed.path.rstrip("/") != "/v1":
        raise SystemExit(f"--upstream: expected http://127.0.0.1:PORT/v1, got {url}")
    return parsed.port or 80


def start_gateway(
    name: str, upstream: str, model: str, tmp: Path, tree: Path | None = None
) -> tuple[Target, subprocess.Popen]:
    """``python -m gateway`` (the image's entry point) in front of ``upstream``; ``tree``: run
    another version's packages first on the path."""
    port = free_port()
    env = {
        "GATEWAY_UPSTREAMS": upstream,
        "GATEWAY_PORT": str(port),
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_API_KEYS": "sk-bench",
        "GATEWAY_ACCESS_LOG": str(tmp / f"access-{name}.jsonl"),
    }
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), str(ROOT)])
    proc = start([sys.executable, "-m", "gateway"], env, tmp / f"{name}.log", cwd=tree or ROOT)
    wait_up(f"http://127.0.0.1:{port}/health", proc, 30)
    return Target(name, port, "sk-bench", proc, model), proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="per target, per figure, per round"
    )
    parser.add_argument("--install-litellm", action="store_true")
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument(
        "--baseline",
        help="another version of the gateway, run too as `baseline` for an A/B in the same "
        "run: a directory holding its `gateway` package, or a git ref (e.g. HEAD~1)",
    )
    parser.add_argument(
        "--upstream",
        help="a running model server, http://127.0.0.1:PORT/v1, in place of the stub",
    )
    parser.add_argument("--model", default=MODEL, help="the model name to ask for")
    parser.add_argument(
        "--chunk-interval-ms",
        type=float,
        default=0.0,
        help="the stub's pause between stream chunks (a model's pace: one chunk per read)",
    )
    parser.add_argument("--json", type=Path, help="write the figures (raw and summarised) here")
    parser.add_argument(
        "--png", type=Path, default=ROOT / "runs" / "bench" / "gateway_overhead.png"
    )
    args = parser.parse_args()
    import uvloop

    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="gw-bench-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            if args.upstream is None:
                port = free_port()
                argv = [sys.executable, "bench/stub_upstream.py", "--port", str(port)]
                argv += ["--interval-ms", str(args.chunk_interval_ms)]
                procs.append(stub := start(argv, {}, tmp / "stub.log"))
                upstream = f"http://127.0.0.1:{port}/v1"
                wait_up(f"http://127.0.0.1:{port}/health", stub, 30)
            else:
                upstream, port = args.upstream.rstrip("/"), loopback_port(args.upstream)
            targets = [Target("direct", port, model=args.model)]
            for name, tree in [("gateway", None)] + (
                [("baseline", baseline_tree(args.baseline, tmp))] if args.baseline else []
            ):
                target, proc = start_gateway(name, upstream, args.model, tmp, tree)
                procs.append(proc)
                targets.append(target)
            skipped = "--no-litellm" if args.no_litellm else ""
            if not args.no_litellm:
                if args.install_litellm and not (LITELLM_VENV / "bin" / "litellm").exists():
                    install_litellm()
                litellm, skipped = start_litellm(upstream, args.model, tmp)
                if litellm is not None:
                    procs.append(litellm.proc)
                    targets.append(litellm)
            where = f"stub, {CHUNKS}-chunk streams, {args.chunk_interval_ms:g} ms apart"
            if args.upstream:
                where = f"{upstream} ({args.model})"
            print(
                f"{where}, gateway{', LiteLLM ' + LITELLM_VERSION if not skipped else ''}"
                f": {args.rounds} interleaved rounds of {args.seconds:g} s per figure",
                file=sys.stderr,
            )
            results = uvloop.run(run(targets, args.rounds, args.seconds))
            summary = summarise(results)
            report(summary, skipped, goals=args.upstream is None and not args.chunk_interval_ms)
            plot(summary, args.png, where)
            if args.json is not None:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_bytes(
                    orjson.dumps({"summary": summary, "raw": results}, option=orjson.OPT_INDENT_2)
                )
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    main()
