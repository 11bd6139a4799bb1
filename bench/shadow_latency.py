"""Client latency with shadow traffic off vs on (rate 1.0), side by side in one run.

    python bench/shadow_latency.py [--rounds 5] [--seconds 2]

One stub upstream (``bench/stub_upstream.py``) serves the student; the stand-in teacher
(``distill teacher-standin``) is the shadow teacher. Three gateways (``python -m gateway``)
run at once, rounds interleaved so they share the machine's state:

* ``off``          shadow off (the default);
* ``shadow``       ``GATEWAY_SHADOW_RATE=1.0`` with the default bounds (60 teacher requests a
                   minute, 4 in flight, a queue of 256): every reply is sampled and queued, most
                   are then dropped by the queue bound, as in production under load;
* ``shadow-busy``  the same with ``GATEWAY_SHADOW_MAX_RPM=60000``: the teacher is called as often
                   as 4 in flight allow, so label reading and teacher calls run beside requests.

Figures: p50/p99 latency at 1 in flight, non-streamed and streamed (200 chunks), and the p50
added over ``off``; the issue's goal is added p50 <= 0.1 ms at 1 in flight (``shadow``).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_overhead import ROOT, Target, free_port, one_in_flight, start, wait_up
from overhead_report import pct

MESSAGES = [{"role": "user", "content": "新闻分类:国足客场二比一逆转取胜"}]


def body(stream: bool) -> bytes:
    # constrain_answer: false keeps the label constraint's second upstream call (the task is
    # known, for the shadow) out of every figure: the shadow's own cost is what is compared
    req = {"model": "student", "messages": MESSAGES, "stream": stream, "constrain_answer": False}
    return orjson.dumps(req)


async def run(targets: list[Target], rounds: int, seconds: float) -> dict[str, dict[str, list]]:
    res = {t.name: {"plain": [], "stream": [], "round_p50": []} for t in targets}
    for t in targets:  # warm-up
        await one_in_flight(t, 0.5, body(False))
        await one_in_flight(t, 0.5, body(True))
    for r in range(rounds):
        for kind in ("plain", "stream"):
            for t in targets:
                lat = await one_in_flight(t, seconds, body(kind == "stream"))
                res[t.name][kind] += lat
                if kind == "plain":
                    res[t.name]["round_p50"].append(pct(lat, 0.5))
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr)
    return res


def shadow_counts(port: int) -> str:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    counts = {}
    for line in text.splitlines():
        if line.startswith("gateway_shadow_total{"):
            outcome = line.split('outcome="')[1].split('"')[0]
            if value := int(float(line.rsplit(" ", 1)[1])):
                counts[outcome] = value
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"


def report(res: dict[str, dict[str, list]], counts: dict[str, str]) -> None:
    base = {k: pct(res["off"][k], 0.5) for k in ("plain", "stream")}
    print(f"\n{'':34}" + "".join(f"{n:>14}" for n in res))
    for kind, label in (("plain", "non-streamed"), ("stream", "200-chunk stream")):
        rows = [
            (f"{label} p50 (ms)", lambda r, k=kind: pct(r[k], 0.5) * 1e3, "{:.3f}"),
            (f"{label} p99 (ms)", lambda r, k=kind: pct(r[k], 0.99) * 1e3, "{:.3f}"),
            (
                "  p50 added over off (ms)",
                lambda r, k=kind: (pct(r[k], 0.5) - base[k]) * 1e3,
                "{:+.3f}",
            ),
        ]
        for title, fn, fmt in rows:
            print(f"{title:34}" + "".join(f"{fmt.format(fn(r)):>14}" for r in res.values()))
    print(f"{'requests measured':34}" + "".join(f"{len(r['plain']):>14}" for r in res.values()))
    for name, text in counts.items():
        print(f"shadow outcomes ({name}): {text}")
    spread = [
        (a - b) * 1e3
        for a, b in zip(res["shadow"]["round_p50"], res["off"]["round_p50"], strict=True)
    ]
    print(
        f"added p50 (shadow vs off, non-streamed), per round ({len(spread)}): "
        f"median {statistics.median(spread):+.3f} ms, "
        f"range {min(spread):+.3f} .. {max(spread):+.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="per target, figure, round")
    args = parser.parse_args()
    import uvloop

    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="shadow-bench-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            stub_port, teacher_port = free_port(), free_port()
            stub = start(
                [sys.executable, "bench/stub_upstream.py", "--port", str(stub_port)],
                {},
                tmp / "stub.log",
            )
            teacher = start(
                [sys.executable, "-m", "pipeline", "teacher-standin", "--port", str(teacher_port)],
                {},
                tmp / "teacher.log",
            )
            procs += [stub, teacher]
            wait_up(f"http://127.0.0.1:{stub_port}/health", stub, 30)
            wait_up(f"http://127.0.0.1:{teacher_port}/health", teacher, 30)
            shadow = {
                "GATEWAY_TASKS": f"student={ROOT / 'configs/tasks/news.yaml'}",
                "GATEWAY_SHADOW_TEACHER": (
                    f"url=http://127.0.0.1:{teacher_port}/v1,model=deepseek-r1-standin"
                ),
                "GATEWAY_SHADOW_RATE": "1.0",
            }
            variants = {
                "off": {},
                "shadow": shadow,
                "shadow-busy": {**shadow, "GATEWAY_SHADOW_MAX_RPM": "60000"},
            }
            targets = []
            for name, extra in variants.items():
                port = free_port()
                env = {
                    "GATEWAY_UPSTREAMS": f"http://127.0.0.1:{stub_port}/v1",
                    "GATEWAY_PORT": str(port),
                    "GATEWAY_HOST": "127.0.0.1",
                    "GATEWAY_API_KEYS": "sk-bench",
                    "GATEWAY_ACCESS_LOG": str(tmp / f"access-{name}.jsonl"),
                    **extra,
                }
                proc = start([sys.executable, "-m", "gateway"], env, tmp / f"gw-{name}.log")
                procs.append(proc)
                wait_up(f"http://127.0.0.1:{port}/health", proc, 30)
                targets.append(Target(name, port, "sk-bench", proc))
            print(
                f"{args.rounds} interleaved rounds of {args.seconds:g} s per target and figure",
                file=sys.stderr,
            )
            res = uvloop.run(run(targets, args.rounds, args.seconds))
            counts = {t.name: shadow_counts(t.port) for t in targets if t.name != "off"}
            report(res, counts)
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
