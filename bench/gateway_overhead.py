"""Gateway overhead, side by side in one run: (a) direct to a stub upstream, (b) through our
gateway, (c) through the LiteLLM proxy — rounds interleaved so all three share the machine's
state.

    python bench/gateway_overhead.py [--rounds 3] [--seconds 2] [--install-litellm]

Three figures, as the gateway issue defines them:

* overhead   non-streaming, 1 in flight: p50/p99 latency added over direct;
* capacity   non-streaming, 64 in flight: requests per second;
* streaming  200-chunk streams, 16 in flight: time added per whole stream.

LiteLLM runs from its own venv ``.venv-litellm`` (``--install-litellm`` creates it:
``python -m venv .venv-litellm && .venv-litellm/bin/pip install 'litellm[proxy]==1.108.7'``);
if it is missing or does not start, (c) is skipped and the reason printed. The load generator
is a minimal keep-alive HTTP/1.1 client on asyncio streams, so the client costs little and
the same for every target.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson

ROOT = Path(__file__).resolve().parents[1]
LITELLM_VENV = ROOT / ".venv-litellm"
LITELLM_VERSION = "1.108.7"
MASTER_KEY = "sk-bench-master"
MODEL = "student"
CHUNKS = 200


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


def body(stream: bool) -> bytes:
    req = {"model": MODEL, "messages": [{"role": "user", "content": "标题：国足2比0取胜"}]}
    if stream:
        req["stream"] = True
    return orjson.dumps(req)


async def one_in_flight(
    target: Target, seconds: float, payload: bytes | None = None
) -> list[float]:
    """Latencies of back-to-back requests on one connection for ``seconds`` (``payload``:
    the request body; default the non-streamed chat request)."""
    raw = target.request(payload or body(False))
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
    raw = target.request(body(False))
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


async def streams(target: Target, seconds: float, in_flight: int = 16) -> list[float]:
    raw = target.request(body(True))
    conns = [await Conn(target.port).open() for _ in range(in_flight)]
    durations: list[float] = []
    end = time.perf_counter() + seconds

    async def worker(conn: Conn) -> None:
        while time.perf_counter() < end:
            t = time.perf_counter()
            status, data = await conn.send(raw)
            durations.append(time.perf_counter() - t)
            ok = status == 200 and data.count(b"data:") >= 2 and b"error" not in data[-400:]
            assert ok, f"{target.name}: bad stream: {status} {data[-300:]!r}"

    await asyncio.gather(*(worker(c) for c in conns))
    for conn in conns:
        conn.close()
    return durations


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


def start_litellm(stub_port: int, tmp: Path) -> tuple[Target | None, str]:
    exe = LITELLM_VENV / "bin" / "litellm"
    if not exe.exists():
        return None, f"{exe} not found (run with --install-litellm)"
    config = tmp / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: http://127.0.0.1:{stub_port}/v1\n"
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
    return Target("litellm", port, MASTER_KEY, proc), ""


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def run(targets: list[Target], rounds: int, seconds: float) -> dict[str, dict[str, list]]:
    results = {t.name: {"lat": [], "rps": [], "stream": []} for t in targets}
    for target in targets:  # warm-up: connections, caches, lazy imports
        await one_in_flight(target, 0.3)
        await streams(target, 0.3, in_flight=2)
    for r in range(rounds):
        for target in targets:
            results[target.name]["lat"] += await one_in_flight(target, seconds)
        for target in targets:
            results[target.name]["rps"].append(await capacity(target, seconds))
        for target in targets:
            results[target.name]["stream"] += await streams(target, seconds)
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr)
    return results


def report(results: dict[str, dict[str, list]], skipped: str) -> None:
    direct = results["direct"]
    d50, d99 = pct(direct["lat"], 0.5), pct(direct["lat"], 0.99)
    dstream = statistics.median(direct["stream"])
    print(f"\n{'':34}" + "".join(f"{name:>16}" for name in results))
    rows = [
        ("1 in flight p50 latency (ms)", lambda r: pct(r["lat"], 0.5) * 1e3, "{:.3f}"),
        ("1 in flight p99 latency (ms)", lambda r: pct(r["lat"], 0.99) * 1e3, "{:.3f}"),
        ("  overhead p50 added (ms)", lambda r: (pct(r["lat"], 0.5) - d50) * 1e3, "{:+.3f}"),
        ("  overhead p99 added (ms)", lambda r: (pct(r["lat"], 0.99) - d99) * 1e3, "{:+.3f}"),
        ("64 in flight capacity (req/s)", lambda r: statistics.median(r["rps"]), "{:.0f}"),
        ("200-chunk stream p50 (ms)", lambda r: statistics.median(r["stream"]) * 1e3, "{:.2f}"),
        (
            "  added per stream p50 (ms)",
            lambda r: (statistics.median(r["stream"]) - dstream) * 1e3,
            "{:+.2f}",
        ),
        ("requests measured", lambda r: len(r["lat"]) + len(r["stream"]), "{:.0f}"),
    ]
    for label, get, fmt in rows:
        print(f"{label:34}" + "".join(f"{fmt.format(get(r)):>16}" for r in results.values()))
    print("\ngoals for the gateway: p50 <= +0.3 ms, p99 <= +1 ms, >= 2500 req/s, <= +5 ms/stream")
    if skipped:
        print(f"LiteLLM skipped: {skipped}")


def plot(results: dict[str, dict[str, list]], path: Path) -> None:
    """Three panels, one per figure, log scales (LiteLLM is orders of magnitude away)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    d = results["direct"]
    panels = [
        ("p50 latency, 1 in flight (ms)", [pct(results[n]["lat"], 0.5) * 1e3 for n in names]),
        ("capacity, 64 in flight (req/s)", [statistics.median(results[n]["rps"]) for n in names]),
        (
            "200-chunk stream, 16 in flight (ms)",
            [statistics.median(results[n]["stream"]) * 1e3 for n in names],
        ),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (title, values) in zip(axes, panels, strict=True):
        colors = {"direct": "#888888", "gateway": "#2b7bba", "baseline": "#7fb3d5"}
        bars = ax.bar(names, values, color=[colors.get(n, "#d9822b") for n in names])
        ax.set_yscale("log")
        ax.set_title(title)
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values])
    direct_p50 = pct(d["lat"], 0.5) * 1e3
    fig.suptitle(f"gateway overhead vs direct (direct p50 {direct_p50:.3f} ms), one run")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"chart: {path}")


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
        type=Path,
        help="a directory holding another version's `gateway` package (e.g. an export of "
        "the previous commit): run it too, as `baseline`, for an A/B in the same run",
    )
    parser.add_argument(
        "--png", type=Path, default=ROOT / "runs" / "bench" / "gateway_overhead.png"
    )
    args = parser.parse_args()
    import uvloop

    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="gw-bench-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            stub_port = free_port()
            stub = start(
                [sys.executable, "bench/stub_upstream.py", "--port", str(stub_port)],
                {},
                tmp / "stub.log",
            )
            procs.append(stub)
            gw_port = free_port()
            gw_env = {
                "GATEWAY_UPSTREAMS": f"http://127.0.0.1:{stub_port}/v1",
                "GATEWAY_PORT": str(gw_port),
                "GATEWAY_HOST": "127.0.0.1",
                "GATEWAY_API_KEYS": "sk-bench",
                "GATEWAY_ACCESS_LOG": str(tmp / "access.jsonl"),
            }
            gw = start([sys.executable, "-m", "gateway"], gw_env, tmp / "gateway.log")
            procs.append(gw)
            wait_up(f"http://127.0.0.1:{stub_port}/health", stub, 30)
            wait_up(f"http://127.0.0.1:{gw_port}/health", gw, 30)
            targets = [Target("direct", stub_port), Target("gateway", gw_port, "sk-bench")]
            if args.baseline is not None:
                base_port = free_port()
                base_env = {**gw_env, "GATEWAY_PORT": str(base_port)}
                baseline = args.baseline.resolve()  # its `gateway` first, our `pipeline`
                base_env["PYTHONPATH"] = os.pathsep.join([str(baseline), str(ROOT)])
                base_env["GATEWAY_ACCESS_LOG"] = str(tmp / "access-baseline.jsonl")
                argv = [sys.executable, "-m", "gateway"]
                base = start(argv, base_env, tmp / "baseline.log", cwd=baseline)
                procs.append(base)
                wait_up(f"http://127.0.0.1:{base_port}/health", base, 30)
                targets.append(Target("baseline", base_port, "sk-bench"))
            skipped = "--no-litellm" if args.no_litellm else ""
            if not args.no_litellm:
                if args.install_litellm and not (LITELLM_VENV / "bin" / "litellm").exists():
                    install_litellm()
                litellm, skipped = start_litellm(stub_port, tmp)
                if litellm is not None:
                    procs.append(litellm.proc)
                    targets.append(litellm)
            print(
                f"stub upstream, gateway{', LiteLLM ' + LITELLM_VERSION if not skipped else ''}"
                f": {args.rounds} interleaved rounds of {args.seconds:g} s per figure",
                file=sys.stderr,
            )
            results = uvloop.run(run(targets, args.rounds, args.seconds))
            report(results, skipped)
            plot(results, args.png)
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
