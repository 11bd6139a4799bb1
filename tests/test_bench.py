"""The benchmarks run here at a tiny size so CI keeps them working (figures not asserted)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _run(*args: str, timeout: int = 300) -> str:
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
def test_train_throughput_runs_on_cpu_with_a_tiny_shape():
    out = _run(
        "bench/train_throughput.py", "--tiny", "--steps", "2", "--warmup", "1", "--rows", "2"
    )
    assert "2×512 packed rows/step" in out
    for mode in ("packed", "padded"):
        match = re.search(rf"{mode}:\s+([\d,]+) tokens/s", out)
        assert match and int(match.group(1).replace(",", "")) > 0, out
    assert "ratio packed/padded" in out


@pytest.mark.slow
def test_generate_throughput_runs_small():
    out = _run(
        "bench/generate_throughput.py", "--requests", "60", "--latency", "0.2", "--levels", "20"
    )
    row = re.search(r"^\s*20\s+\d+\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", out, re.M)
    assert row, out
    rate, ideal, ratio = map(float, row.groups())
    assert ideal == 100.0 and 0 < ratio <= 1.05 and abs(rate / ideal - ratio) < 0.01


@pytest.mark.slow
def test_shadow_latency_runs_small():
    out = _run("bench/shadow_latency.py", "--rounds", "1", "--seconds", "0.3")
    assert re.search(r"non-streamed p50 \(ms\)\s+[\d.]+\s+[\d.]+\s+[\d.]+", out), out
    assert re.search(r"shadow outcomes \(shadow-busy\): .*agree \d+", out), out


@pytest.mark.slow
def test_gateway_overhead_runs_against_a_baseline_ref():
    out = _run(
        "bench/gateway_overhead.py", "--rounds", "1", "--seconds", "0.3", "--no-litellm",
        "--baseline", "HEAD", "--png", "/dev/null",
    )  # fmt: skip
    cpu = re.search(r"^CPU per relayed chunk \(us\)\s+n/a\s+([\d.]+)\s+([\d.]+)", out, re.M)
    assert cpu and float(cpu.group(1)) > 0 and float(cpu.group(2)) > 0, out
    for goal in ("added p50 <= 0.5 ms", "capacity >= 0.75 x baseline", "CPU per chunk"):
        assert re.search(rf"^  (PASS|MISS)\s+{re.escape(goal)}", out, re.M), out
    assert re.search(r"^  n/a\s+capacity >= 50 x LiteLLM", out, re.M), out


@pytest.mark.slow
def test_gateway_overhead_runs_in_front_of_a_real_model_server(vllm_server):
    out = _run(
        "bench/gateway_overhead.py", "--rounds", "1", "--seconds", "0.3", "--no-litellm",
        "--upstream", vllm_server.base_url, "--model", vllm_server.model, "--png", "/dev/null",
    )  # fmt: skip
    rps = re.search(r"^64 in flight \(req/s\)\s+(\d+) .*?(\d+)\s*$", out, re.M)
    assert rps and int(rps.group(1)) > 0 and int(rps.group(2)) > 0, out
    assert re.search(r"^CPU per relayed chunk \(us\)\s+n/a\s+[\d.]+", out, re.M), out
    assert "goals (issue #15)" not in out  # they are defined against the stub


@pytest.mark.slow
def test_gateway_soak_runs_small_without_errors():
    out = _run(
        "bench/gateway_soak.py", "--rate", "50", "--seconds", "3", "--warmup", "1",
        "--png", "/dev/null",
    )  # fmt: skip
    assert re.search(r"^requests: 150 at 50/s for 3 s, errors: 0$", out, re.M), out
    assert re.search(r"^gateway memory MiB: after warm-up [\d.]+, end [\d.]+", out, re.M), out
