"""Gateway soak: a steady request rate for a while, the gateway's memory sampled each second.

    python bench/gateway_soak.py [--rate 200] [--seconds 300] [--stream-share 0.2]

Starts the stub upstream and ``python -m gateway`` (the image's entry point), then sends
``--rate`` requests per second (open loop: a late answer does not slow the senders), a
``--stream-share`` of them streamed, over keep-alive connections. Prints errors, latency
percentiles and the gateway's resident memory at the start and the end (after a warm-up of
``--warmup`` seconds), and writes a PNG of memory and latency over time.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gateway_overhead import ROOT, Conn, Target, body, free_port, start, wait_up
from overhead_report import pct


def rss_mb(proc: subprocess.Popen) -> float:
    """Resident memory of ``proc`` (MiB), from ``/proc``."""
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def soak(
    target: Target, proc: subprocess.Popen, rate: float, seconds: float, stream_share: float
) -> dict[str, list]:
    """Send at ``rate`` for ``seconds``; per second: memory; per request: latency, ok."""
    idle: asyncio.Queue[Conn] = asyncio.Queue()
    plain, streamed = target.request(body(False)), target.request(body(True))
    out: dict[str, list] = {"lat": [], "errors": [], "rss": [], "t": []}
    rng = random.Random(0)

    async def one(raw: bytes) -> None:
        conn = idle.get_nowait() if not idle.empty() else await Conn(target.port).open()
        t = time.perf_counter()
        try:
            status, data = await conn.send(raw)
        except (OSError, asyncio.IncompleteReadError) as e:
            out["errors"].append(type(e).__name__)
            conn.close()
            return
        out["lat"].append(time.perf_counter() - t)
        if status != 200 or (raw is streamed and b"[DONE]" not in data[-64:]):
            out["errors"].append(str(status))
        idle.put_nowait(conn)

    tasks: set[asyncio.Task] = set()
    start_t = time.perf_counter()
    next_sample = start_t
    for i in range(int(rate * seconds)):
        due = start_t + i / rate
        now = time.perf_counter()
        if now >= next_sample:
            out["t"].append(now - start_t)
            out["rss"].append(rss_mb(proc))
            next_sample += 1.0
        if due > now:
            await asyncio.sleep(due - now)
        raw = streamed if rng.random() < stream_share else plain
        task = asyncio.ensure_future(one(raw))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    out["t"].append(time.perf_counter() - start_t)
    out["rss"].append(rss_mb(proc))
    return out


def plot(out: dict[str, list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, lat) = plt.subplots(1, 2, figsize=(12, 4))
    mem.plot(out["t"], out["rss"], color="#2b7bba")
    mem.set_xlabel("seconds")
    mem.set_ylabel("gateway resident memory (MiB)")
    mem.set_title("memory under a steady rate")
    lat.hist([v * 1e3 for v in out["lat"]], bins=60, color="#2b7bba")
    lat.set_xlabel("latency (ms)")
    lat.set_ylabel("requests")
    lat.set_yscale("log")
    lat.set_title("latency through the gateway")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"chart: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--warmup", type=float, default=10.0, help="memory baseline after this")
    parser.add_argument("--stream-share", type=float, default=0.2)
    parser.add_argument("--png", type=Path, default=ROOT / "runs" / "bench" / "gateway_soak.png")
    args = parser.parse_args()
    import uvloop

    with tempfile.TemporaryDirectory(prefix="gw-soak-") as tmp_name:
        tmp = Path(tmp_name)
        stub_port, gw_port = free_port(), free_port()
        stub = start([sys.executable, "bench/stub_upstream.py", "--port", str(stub_port)], {},
                     tmp / "stub.log")  # fmt: skip
        env = {
            "GATEWAY_UPSTREAMS": f"http://127.0.0.1:{stub_port}/v1",
            "GATEWAY_PORT": str(gw_port),
            "GATEWAY_API_KEYS": "sk-bench",
            "GATEWAY_ACCESS_LOG": str(tmp / "access.jsonl"),
        }
        gw = start([sys.executable, "-m", "gateway"], env, tmp / "gateway.log")
        try:
            wait_up(f"http://127.0.0.1:{stub_port}/health", stub, 30)
            wait_up(f"http://127.0.0.1:{gw_port}/health", gw, 30)
            target = Target("gateway", gw_port, "sk-bench", gw)
            out = uvloop.run(soak(target, gw, args.rate, args.seconds, args.stream_share))
        finally:
            for proc in (gw, stub):
                proc.terminate()
                proc.wait(timeout=10)
    warm = [m for t, m in zip(out["t"], out["rss"], strict=True) if t >= args.warmup]
    warm = warm or out["rss"]
    print(f"requests: {len(out['lat']) + len(out['errors'])} at {args.rate:g}/s "
          f"for {args.seconds:g} s, errors: {len(out['errors'])}")  # fmt: skip
    if out["lat"]:
        lat = out["lat"]
        print(f"latency ms: p50 {pct(lat, 0.5) * 1e3:.2f}, p99 {pct(lat, 0.99) * 1e3:.2f}, "
              f"max {max(lat) * 1e3:.2f}")  # fmt: skip
    print(f"gateway memory MiB: after warm-up {warm[0]:.1f}, end {warm[-1]:.1f}, "
          f"growth {warm[-1] - warm[0]:+.1f} (median {statistics.median(warm):.1f})")  # fmt: skip
    plot(out, args.png)


if __name__ == "__main__":
    main()
