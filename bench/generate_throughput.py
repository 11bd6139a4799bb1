"""Throughput of the generate stage against a slow teacher.

The stand-in teacher runs in its own process with a fixed latency; the client side is the real
generate code path (input rows -> endpoint pool -> openai SDK client -> ledger commit ->
normaliser), in this process or, as the CLI decides (``--workers``, auto by default), in worker
processes. For each in-flight level it prints achieved requests/s divided by the ideal
(in-flight / latency) and the client's CPU seconds per 1,000 requests (workers included), plus
the load average: the machine is shared, and a busy neighbour lowers the ratio.

The ``cpu ceiling`` column is what the measured CPU allows even on an idle machine: every
request of a wave of N answers must be turned around (answer read and stored, next request
sent; the stand-in parses it) before the next wave is out, which takes at least
N x (client + stand-in CPU per request) / cores; the last wave finishes that much late, so
the ratio cannot beat ideal_time / (ideal_time + that).

    python bench/generate_throughput.py                       # 6,000 requests, 5 s, 100/500/2000
    python bench/generate_throughput.py --requests 300 --latency 1 --levels 50,150 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.generate.client import RetryPolicy  # noqa: E402
from pipeline.generate.run import GenerateOptions, Runner, run_loop, send_requests  # noqa: E402
from pipeline.generate.teachers import TeachersConfig, TeacherSpec  # noqa: E402
from pipeline.generate.workers import available_cores, plan_workers  # noqa: E402

MODEL = "deepseek-r1-standin"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_standin(latency_s: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.standin",
            "--port",
            str(port),
            "--latency-ms",
            str(int(latency_s * 1000)),
            "--model",
            MODEL,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, f"http://127.0.0.1:{port}/v1"
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("stand-in did not start")


def write_inputs(path: Path, n: int, tag: str) -> None:
    """n distinct headlines (the sample set, numbered so that no two are alike)."""
    titles = [
        json.loads(x)["title"]
        for x in (ROOT / "data" / "news" / "headlines.jsonl").read_text("utf-8").splitlines()
    ]
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            row = {"id": f"{tag}-{i}", "title": f"{titles[i % len(titles)]}({tag}第{i}期)"}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def cpu_seconds() -> float:
    """This process plus its finished children (the generate workers; the stand-in is not
    reaped until the end, so it is not counted here)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        total += ru.ru_utime + ru.ru_stime
    return total


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_level(
    base_url: str, level: int, requests: int, stream: bool, work: Path, workers: int | None
) -> dict:
    inp = work / f"in-{level}.jsonl"
    write_inputs(inp, requests, f"L{level}")
    spec = TeacherSpec(name="standin", base_url=base_url, model=MODEL, max_concurrency=level)
    opts = GenerateOptions(
        task=ROOT / "configs" / "tasks" / "news.yaml",
        input=inp,
        out=work / f"out-{level}",
        teachers=TeachersConfig(teachers=[spec]),
        test_ratio=0.0,
        quiet=True,
        stream=stream,
        timeout=120,
        retry=RetryPolicy(max_attempts=3, base_s=0.5),
        workers=workers,
    )
    runner = Runner(opts)
    n_workers = plan_workers(runner)
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    send_requests(runner)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    runner.ledger.close()
    p = runner.progress
    if p.retries:
        print(f"  retries by reason: {dict(p.retries)}", file=sys.stderr)
    return {
        "workers": n_workers,
        "sent": p.sent,
        "done": p.done,
        "retries": sum(p.retries.values()),
        "wall": wall,
        "cpu": cpu,
    }


async def sdk_loop(base_url: str, level: int, requests: int, stream: bool) -> None:
    """The floor: a bare loop of openai-SDK calls on the same transport, no pool/ledger/parse."""
    import httpx2
    import openai

    from distill_common.task import load_task

    task = load_task(ROOT / "configs" / "tasks" / "news.yaml")
    client = openai.AsyncOpenAI(
        base_url=base_url,
        api_key="EMPTY",
        max_retries=0,
        http_client=openai.DefaultAioHttpClient(
            limits=httpx2.Limits(max_connections=level, max_keepalive_connections=level)
        ),
    )
    sem = asyncio.Semaphore(level)

    async def one(i: int) -> None:
        async with sem:
            kw = {"stream_options": {"include_usage": True}} if stream else {}
            resp = await client.chat.completions.create(
                model=MODEL,
                messages=[],
                seed=0,
                stream=stream,
                extra_body={"messages": task.messages({"title": f"基线{i}"})},
                **kw,
            )
            if stream:
                async with resp:
                    async for _ in resp:
                        pass

    await asyncio.gather(*(one(i) for i in range(requests)))
    await client.close()


def run_baseline(base_url: str, level: int, requests: int, stream: bool) -> dict:
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    run_loop(sdk_loop(base_url, level, requests, stream))
    return {
        "sent": requests,
        "wall": time.perf_counter() - t0,
        "cpu": cpu_seconds() - cpu0,
        "retries": 0,
        "workers": 1,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=6000)
    ap.add_argument("--latency", type=float, default=5.0, help="stand-in latency, seconds")
    ap.add_argument("--levels", default="100,500,2000", help="requests in flight, comma list")
    ap.add_argument("--no-stream", action="store_true", help="whole responses, not streamed")
    ap.add_argument(
        "--sdk-baseline",
        action="store_true",
        help="also time a bare openai-SDK loop at each level (the floor of the client's cost)",
    )
    ap.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: auto, as the CLI)"
    )
    args = ap.parse_args()
    resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
    levels = [int(x) for x in args.levels.split(",")]
    proc, base_url = start_standin(args.latency)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
            for level in levels:
                server0 = proc_cpu(proc.pid)
                r = run_level(
                    base_url, level, args.requests, not args.no_stream, Path(tmp), args.workers
                )
                r["server_cpu"] = proc_cpu(proc.pid) - server0
                ideal = level / args.latency
                rows.append((f"{level}", r, r["sent"] / r["wall"], ideal))
                if args.sdk_baseline:
                    server0 = proc_cpu(proc.pid)
                    b = run_baseline(base_url, level, args.requests, not args.no_stream)
                    b["server_cpu"] = proc_cpu(proc.pid) - server0
                    rows.append((f"{level} sdk", b, b["sent"] / b["wall"], ideal))
                print(
                    f"  {level} in flight: {r['sent']} requests in {r['wall']:.1f} s",
                    file=sys.stderr,
                )
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    mode = "streamed" if not args.no_stream else "whole"
    print(
        f"\ngenerate throughput: {args.requests} requests/level, latency {args.latency:g} s, "
        f"{mode}, stand-in in its own process"
    )
    print(f"load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print("(rows marked 'sdk': a bare openai-SDK loop, no pool/ledger/normaliser, for scale)")
    print(
        f"{'in flight':>9} {'workers':>7} {'req/s':>8} {'ideal':>8} {'ratio':>6} "
        f"{'cpu s/1k req':>13} "
        f"{'server cpu s/1k':>15} {'retries':>8} {'cpu ceiling':>11}"
    )
    cores = available_cores()
    for level, r, rps, ideal in rows:
        ideal_s = r["sent"] / ideal
        wave_s = int(level.split()[0]) * (r["cpu"] + r["server_cpu"]) / r["sent"] / cores
        print(
            f"{level:>9} {r['workers']:>7} {rps:>8.1f} {ideal:>8.1f} {rps / ideal:>6.3f} "
            f"{r['cpu'] / r['sent'] * 1000:>13.2f} {r['server_cpu'] / r['sent'] * 1000:>15.2f} "
            f"{r['retries']:>8} {ideal_s / (ideal_s + wave_s):>11.3f}"
        )


if __name__ == "__main__":
    main()
