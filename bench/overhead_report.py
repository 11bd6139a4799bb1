"""The figures of ``gateway_overhead.py``: per-round values summarised (median and range),
the goals of issue #15 checked, and one PNG."""

from __future__ import annotations

import statistics
from pathlib import Path

Summary = dict[str, dict[str, list[float]]]  # target -> figure -> one value per round


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nearest rank)."""
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarise(results: dict[str, dict[str, list]]) -> Summary:
    """One value per round and figure: latencies and stream times as added over direct."""
    direct = results["direct"]
    out: Summary = {}
    for name, r in results.items():
        rounds = range(len(r["lat"]))
        out[name] = {
            "p50_ms": [pct(r["lat"][i], 0.5) * 1e3 for i in rounds],
            "p99_ms": [pct(r["lat"][i], 0.99) * 1e3 for i in rounds],
            "added_p50_ms": [
                (pct(r["lat"][i], 0.5) - pct(direct["lat"][i], 0.5)) * 1e3 for i in rounds
            ],
            "added_p99_ms": [
                (pct(r["lat"][i], 0.99) - pct(direct["lat"][i], 0.99)) * 1e3 for i in rounds
            ],
            "rps": list(r["rps"]),
            "stream_ms": [statistics.median(r["stream"][i]) * 1e3 for i in rounds],
            "added_stream_ms": [
                (statistics.median(r["stream"][i]) - statistics.median(direct["stream"][i])) * 1e3
                for i in rounds
            ],
            "cpu_us_per_chunk": [v * 1e6 for v in r["cpu_chunk"]],
        }
    return out


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _cell(values: list[float], fmt: str) -> str:
    if not values:
        return "n/a"
    text = fmt.format(statistics.median(values))
    if len(values) > 1:
        text += f" ({fmt.format(min(values))}..{fmt.format(max(values))})"
    return text


ROWS = [
    ("1 in flight p50 (ms)", "p50_ms", "{:.3f}"),
    ("1 in flight p99 (ms)", "p99_ms", "{:.3f}"),
    ("  p50 added (ms)", "added_p50_ms", "{:+.3f}"),
    ("  p99 added (ms)", "added_p99_ms", "{:+.3f}"),
    ("64 in flight (req/s)", "rps", "{:.0f}"),
    ("whole stream (ms)", "stream_ms", "{:.2f}"),
    ("  added per stream (ms)", "added_stream_ms", "{:+.2f}"),
    ("CPU per relayed chunk (us)", "cpu_us_per_chunk", "{:.1f}"),
]


def check_goals(summary: Summary) -> list[tuple[str, bool | None, str]]:
    """Issue #15's goals for the gateway: (goal, met or None when not measurable, figures)."""
    gw, base, lite = summary["gateway"], summary.get("baseline"), summary.get("litellm")

    def ratio(a: list[float], b: list[float] | None) -> float | None:
        return med(a) / med(b) if b and med(b) else None  # type: ignore[operator]

    cap_base = ratio(gw["rps"], base["rps"] if base else None)
    cap_lite = ratio(gw["rps"], lite["rps"] if lite else None)
    cpu_base = ratio(gw["cpu_us_per_chunk"], base["cpu_us_per_chunk"] if base else None)
    p50, p99, stream = med(gw["added_p50_ms"]), med(gw["added_p99_ms"]), med(gw["added_stream_ms"])
    rows = [
        ("added p50 <= 0.5 ms", p50, lambda v: v <= 0.5, "{:+.3f} ms"),
        ("added p99 <= 1 ms", p99, lambda v: v <= 1.0, "{:+.3f} ms"),
        ("capacity >= 0.75 x baseline", cap_base, lambda v: v >= 0.75, "{:.2f} x"),
        ("capacity >= 50 x LiteLLM", cap_lite, lambda v: v >= 50, "{:.1f} x"),
        ("added per stream <= 5 ms", stream, lambda v: v <= 5.0, "{:+.2f} ms"),
        ("CPU per chunk <= 1.25 x baseline", cpu_base, lambda v: v <= 1.25, "{:.2f} x"),
    ]
    return [
        (goal, None if v is None else ok(v), "n/a" if v is None else fmt.format(v))
        for goal, v, ok, fmt in rows
    ]


def report(summary: Summary, skipped: str, *, goals: bool = True) -> None:
    """The table (median of the rounds, range in brackets) and, against the stub, the goals."""
    width = 28
    print(f"\n{'':28}" + "".join(f"{name:>{width}}" for name in summary))
    for label, key, fmt in ROWS:
        cells = "".join(f"{_cell(s[key], fmt):>{width}}" for s in summary.values())
        print(f"{label:28}{cells}")
    if goals:
        print("\ngoals (issue #15), medians of the rounds:")
        for goal, met, figure in check_goals(summary):
            verdict = "n/a" if met is None else ("PASS" if met else "MISS")
            print(f"  {verdict:5} {goal:34} {figure}")
    if skipped:
        print(f"LiteLLM skipped: {skipped}")


def plot(summary: Summary, path: Path, upstream: str = "stub") -> None:
    """Four panels, one per figure, log scales (LiteLLM is orders of magnitude away)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("p50 latency, 1 in flight (ms)", "p50_ms"),
        ("capacity, 64 in flight (req/s)", "rps"),
        ("whole stream, 16 in flight (ms)", "stream_ms"),
        ("CPU per relayed stream chunk (µs)", "cpu_us_per_chunk"),
    ]
    colors = {"direct": "#888888", "gateway": "#2b7bba", "baseline": "#7fb3d5"}
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    for ax, (title, key) in zip(axes, panels, strict=True):
        names = [n for n in summary if summary[n][key]]
        values = [med(summary[n][key]) or 0.0 for n in names]
        bars = ax.bar(names, values, color=[colors.get(n, "#d9822b") for n in names])
        ax.set_yscale("log")
        ax.set_title(title)
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values])
    direct_p50 = med(summary["direct"]["p50_ms"]) or 0.0
    fig.suptitle(
        f"gateway overhead vs direct to the upstream ({upstream}; direct p50 {direct_p50:.3f} ms):"
        " medians of the rounds"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"chart: {path}")
