"""What the second phase costs, side by side in one run: the same held-out prompts sent to a
student served by vLLM, through two gateways (``python -m gateway``, as the image runs it):

* plain        the gateway without the model's task, request asks nothing: one upstream call;
* constrained  the gateway knowing the task: phase 1 to ``</think>``, then the label-constrained
               answer (phase 2 re-reads phase 1 from vLLM's prefix cache);
* budget N     the same gateway with ``max_reasoning_tokens: N``;
* none         ``reasoning_effort: none``: the constrained answer alone.

    python bench/budget_latency.py --model MERGED_DIR [--rows 90] [--rounds 3] [--budget 16]

Requests go one at a time (latency, not load), conditions interleaved per prompt so all share the
machine's state. Prints per condition the median and range over the rounds of each round's
median latency, and the median added over ``plain`` for the same prompts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.task import load_task  # noqa: E402

from pipeline.serve import (  # noqa: E402
    free_port,
    running_gateway,
    running_vllm,
)

TASK = ROOT / "configs" / "tasks" / "news.yaml"
HEADLINES = ROOT / "data" / "news" / "headlines.jsonl"


def prompts(n: int) -> list[list[dict]]:
    task = load_task(TASK)
    rows = [json.loads(line) for line in HEADLINES.read_text("utf-8").splitlines() if line]
    held_out = [r for r in rows if r.get("split") == "test"][:n]
    return [task.messages(row) for row in held_out]


def timed(client: httpx.Client, url: str, body: dict) -> float:
    start = time.perf_counter()
    r = client.post(url + "/chat/completions", json=body)
    took = time.perf_counter() - start
    r.raise_for_status()
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="merged student directory")
    ap.add_argument("--rows", type=int, default=90)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=200)
    args = ap.parse_args()
    logs = Path("/tmp") / f"budget-latency-{free_port()}"
    messages = prompts(args.rows)
    conditions = {
        "plain": ("plain", {}),
        "constrained": ("task", {}),
        f"budget {args.budget}": ("task", {"max_reasoning_tokens": args.budget}),
        "none": ("task", {"reasoning_effort": "none"}),
    }
    with (
        running_vllm(args.model, served_model_name="student", port=free_port(),
                     extra=["--enforce-eager"], log_path=logs / "vllm.log") as vllm,
        running_gateway(vllm.base_url, {}, free_port(), logs / "plain.log") as plain,
        running_gateway(vllm.base_url, {"student": TASK}, free_port(), logs / "task.log") as task,
        httpx.Client(timeout=120) as client,
    ):  # fmt: skip
        urls = {"plain": plain, "task": task}
        base = {"model": "student", "temperature": 0, "max_tokens": args.max_tokens}
        for m in messages[:5]:  # warm-up: grammar compiled, shapes seen
            for url, extra in conditions.values():
                timed(client, urls[url], {**base, "messages": m, **extra})
        per_round: dict[str, list[float]] = {name: [] for name in conditions}
        added: dict[str, list[float]] = {name: [] for name in conditions}
        for _ in range(args.rounds):
            times: dict[str, list[float]] = {name: [] for name in conditions}
            for m in messages:
                for name, (url, extra) in conditions.items():
                    times[name].append(timed(client, urls[url], {**base, "messages": m, **extra}))
            for name in conditions:
                per_round[name].append(statistics.median(times[name]))
                diffs = [t - p for t, p in zip(times[name], times["plain"], strict=True)]
                added[name].append(statistics.median(diffs))
    print(f"{len(messages)} prompts x {args.rounds} rounds, one request at a time")
    print(f"{'condition':<14}{'p50 ms':>9}{'range':>18}{'added ms':>10}{'ratio':>8}")
    ref = statistics.median(per_round["plain"])
    for name in conditions:
        med = statistics.median(per_round[name])
        lo, hi = min(per_round[name]) * 1e3, max(per_round[name]) * 1e3
        print(
            f"{name:<14}{med * 1e3:>9.1f}{f'{lo:.1f}-{hi:.1f}':>18}"
            f"{statistics.median(added[name]) * 1e3:>10.1f}{med / ref:>8.2f}"
        )


if __name__ == "__main__":
    main()
