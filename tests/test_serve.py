"""``distill serve``: the vLLM command line is one vLLM accepts, the same on CPU and GPU."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from pipeline.serve import ServeError, is_cpu_build, start_vllm, vllm_args, vllm_env
from tests.conftest import ROOT, free_port


def vllm_parser():
    """vLLM's own OpenAI-server argument parser (module moved between vLLM versions)."""
    pytest.importorskip("vllm")
    try:
        from vllm.entrypoints.openai.cli_args import make_arg_parser
    except ImportError:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser())


def test_vllm_args_parse_with_vllms_own_parser(tmp_path):
    parser = vllm_parser()
    args = vllm_args(
        tmp_path,
        served_model_name="student",
        host="127.0.0.1",
        port=8123,
        max_model_len=1024,
        dtype="bfloat16",
        tensor_parallel_size=2,
        extra="--enable-prefix-caching --gpu-memory-utilization 0.85",
    )
    ns = parser.parse_args(args)
    assert ns.model == str(tmp_path)
    assert ns.served_model_name == ["student"]
    assert (ns.host, ns.port, ns.dtype) == ("127.0.0.1", 8123, "bfloat16")
    assert (ns.max_model_len, ns.tensor_parallel_size) == (1024, 2)
    assert ns.enable_prefix_caching is True and ns.gpu_memory_utilization == 0.85
    # No reasoning parser: the student writes <think> inline and the gateway splits it.
    assert not getattr(ns, "reasoning_parser", None)
    # Defaults leave vLLM's own choices alone.
    ns = parser.parse_args(vllm_args(tmp_path))
    assert ns.tensor_parallel_size == 1 and ns.port == 8000 and ns.host == "0.0.0.0"


def test_vllm_env_offline_for_local_model_and_cpu_cache(tmp_path):
    env = vllm_env(tmp_path, base={"PATH": "/bin"})
    assert env["HF_HUB_OFFLINE"] == "1" and env["PATH"] == "/bin"
    assert ("VLLM_CPU_KVCACHE_SPACE" in env) == is_cpu_build()
    # A value the user set wins; a hub id is not forced offline.
    env = vllm_env("Qwen/Qwen2.5-7B-Instruct", base={"VLLM_CPU_KVCACHE_SPACE": "8"})
    assert "HF_HUB_OFFLINE" not in env
    if is_cpu_build():
        assert env["VLLM_CPU_KVCACHE_SPACE"] == "8"


def test_serve_dry_run_prints_the_vllm_command(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    cmd = [sys.executable, "-m", "pipeline", "serve", "--model", str(tmp_path), "--port", "9001"]
    cmd += ["--served-model-name", "student", "--max-model-len", "512", "--dry-run"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    argv = shlex.split(done.stdout.strip())
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert argv[3:] == vllm_args(
        tmp_path, served_model_name="student", port=9001, max_model_len=512
    )


def test_serve_rejects_a_directory_without_a_model(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "serve", "--model", str(tmp_path), "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert str(tmp_path) in done.stderr and "config.json" in done.stderr


@pytest.mark.slow
def test_start_vllm_fails_fast_with_the_log_when_vllm_exits(tmp_path):
    pytest.importorskip("vllm")
    model = tmp_path / "broken"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    log = tmp_path / "vllm.log"
    with pytest.raises(ServeError, match=r"vLLM exited with code \d+") as err:
        start_vllm(model, port=free_port(), log_path=log, startup_timeout=300)
    assert str(log) in str(err.value)
    assert log.stat().st_size > 0
