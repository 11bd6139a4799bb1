"""`accelerate launch` runs the same `distill train` data parallel (2 processes, gloo on CPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures_vllm import news_rows, write_alpaca


@pytest.mark.slow
def test_accelerate_launch_trains_data_parallel(tiny_base, tmp_path, news_task):
    write_alpaca(news_task, news_rows()[:16], tmp_path / "data")
    config = tmp_path / "train.yaml"
    config.write_text(
        "base_model: unused\nepochs: 1\nmax_steps: 3\nper_device_batch_size: 2\n"
        "gradient_accumulation_steps: 1\nbf16: false\nlogging_steps: 1\n"
    )
    out = tmp_path / "adapter"
    accelerate = Path(sys.executable).with_name("accelerate")
    run = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no",
         "-m", "pipeline.cli", "train", "--config", config, "--data", tmp_path / "data",
         "--out", out, "--base", tiny_base],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["num_processes"] == 2
    # 3 steps × 2 examples × 2 processes = 12 of the 16 examples: each rank took its own share
    assert metrics["epochs"] == pytest.approx(0.75)
    assert (out / "adapter_model.safetensors").exists()
    assert run.stderr.count("preflight ok") == 1  # only rank 0 talks
