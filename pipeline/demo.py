"""``distill demo``: the whole pipeline offline on CPU, through the same commands users run.

stand-in teacher → ``generate`` → ``tiny-model`` → ``train`` → ``merge`` → vLLM (CPU) serving the
student and the untrained base → ``eval`` (base, student and the stand-in teacher itself) → the
table. Each stage is a ``python -m pipeline <cmd>`` subprocess; a stage whose output already
exists is skipped (and so is everything after it, unless an earlier stage re-ran), ``--force``
redoes all. Servers are always stopped on exit, error or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import typer

from pipeline.budget_sweep import print_saved
from pipeline.evaluate import BARE
from pipeline.serve import (
    ServeError,
    VLLMServer,
    free_port,
    launch_vllm,
    running_gateway,
    stop_process,
    wait_healthy,
)

ROOT = Path(__file__).resolve().parents[1]
TEACHER_MODEL = "deepseek-r1-standin"
# Targets from the issues: what the demo should show on a 2-core CPU machine. The student is
# judged as clients ask it, with the user message alone (no system prompt), and must do at least
# as well that way as with the task's prompt; the untrained base never writes the format.
TARGET_FORMAT = 0.98
TARGET_ACCURACY = 0.6
BARE_SLACK = 0.02  # bare accuracy may trail the with-prompt one by at most this


class DemoError(RuntimeError):
    """A demo stage failed; the message says which and where its log is."""


@dataclass(frozen=True)
class Paths:
    """Where each stage of the demo writes, under ``--out``."""

    out: Path

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def base(self) -> Path:
        return self.out / "base"

    @property
    def adapter(self) -> Path:
        return self.out / "adapter"

    @property
    def student(self) -> Path:
        return self.out / "student"

    @property
    def eval(self) -> Path:
        return self.out / "eval"

    @property
    def logs(self) -> Path:
        return self.out / "logs"


def _say(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(msg)


def run_stage(name: str, argv: list[str]) -> float:
    """Run ``python -m pipeline <argv>`` in the foreground (its progress shows); return seconds."""
    cmd = [sys.executable, "-m", "pipeline", *argv]
    _say(f"\n[bold cyan]▶ {name}[/]: distill {' '.join(argv)}")
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise DemoError(f"stage '{name}' failed (exit {done.returncode}): distill {' '.join(argv)}")
    took = time.monotonic() - start
    _say(f"[green]✓ {name}[/] in {took:.0f} s")
    return took


class Services:
    """The demo's background servers; all stopped by :meth:`close`."""

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self._teacher: tuple[subprocess.Popen, str] | None = None
        self._vllm: dict[str, VLLMServer] = {}

    def teacher(self) -> str:
        """Base URL of the stand-in teacher (started on first use)."""
        if self._teacher is None:
            port = free_port()
            log = self.paths.logs / "teacher.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "pipeline", "teacher-standin", "--port", str(port),
                     "--model", TEACHER_MODEL,
                     "--request-log", str(self.paths.logs / "teacher-requests.jsonl")],
                    cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
            self._teacher = (proc, f"http://127.0.0.1:{port}/v1")
            wait_healthy(f"http://127.0.0.1:{port}/health", proc, 60, log, "the stand-in teacher")
            _say(f"stand-in teacher on {self._teacher[1]} (log {log})")
        return self._teacher[1]

    def launch(self, name: str, model: Path) -> None:
        """Start serving ``model`` as ``name`` in the background (no wait; idempotent)."""
        if name in self._vllm:
            return
        self._vllm[name] = launch_vllm(
            model,
            served_model_name=name,
            port=free_port(),
            extra=["--enforce-eager"],  # a tiny model: skipping torch.compile saves ~1 min
            log_path=self.paths.logs / f"vllm-{name}.log",
        )
        _say(f"starting vLLM for {name} (log {self.paths.logs / f'vllm-{name}.log'})")

    def vllm(self, models: dict[str, Path]) -> dict[str, str]:
        """Serve each ``name -> model dir`` (started here or earlier); return ``name -> URL``."""
        start = time.monotonic()
        for name, model in models.items():
            self.launch(name, model)
        for name in models:
            self._vllm[name].wait_ready(900)
        _say(f"[green]✓ vLLM ready[/] ({', '.join(models)}) after {time.monotonic() - start:.0f} s")
        return {name: self._vllm[name].base_url for name in models}

    def stop_vllm(self) -> None:
        while self._vllm:
            self._vllm.popitem()[1].stop()

    def close(self) -> None:
        self.stop_vllm()
        if self._teacher is not None:
            stop_process(self._teacher[0], 10)
            self._teacher = None


@contextlib.contextmanager
def services(paths: Paths) -> Iterator[Services]:
    """Background servers that are stopped on any exit, SIGTERM included."""
    svc = Services(paths)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield svc
    finally:
        svc.close()
        signal.signal(signal.SIGTERM, previous)


def answer_token_budget(data: Path, base: Path) -> int:
    """``max_tokens`` for eval: 1.5x the longest training answer in the base's tokens (+16)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    rows = json.loads((data / "train.json").read_text(encoding="utf-8"))
    longest = max(len(tok.encode(row["output"], add_special_tokens=False).ids) for row in rows)
    return math.ceil(1.5 * longest) + 16


def trained_as(adapter: Path, system_prompt: str | None) -> bool:
    """Whether the adapter in ``adapter`` (if any) was trained with ``system_prompt`` (any
    choice matches ``None``; an adapter without metrics matches nothing but ``None``)."""
    metrics = adapter / "train_metrics.json"
    if system_prompt is None or not (adapter / "adapter_config.json").exists():
        return True
    if not metrics.exists():
        return False
    return json.loads(metrics.read_text(encoding="utf-8")).get("system_prompt") == system_prompt


def has_teacher_labels(test_json: Path) -> bool:
    """Whether generate recorded the teacher's label on the held-out rows (then eval reports
    the teacher from them; otherwise the demo asks the stand-in live as endpoint ``teacher``)."""
    rows = json.loads(test_json.read_text(encoding="utf-8"))
    return any("teacher_label" in row for row in rows)


def target_checks(summary: dict[str, dict]) -> list[tuple[bool, str]]:
    """``(met, description)`` for each demo target, read from an eval summary."""

    def fig(name: str, metric: str, bare: bool) -> float | None:
        entry = summary.get(name, {})
        return (entry.get("bare", {}) if bare else entry).get(metric)

    def show(x: float | None) -> str:
        return "missing" if x is None else f"{x:.3f}"

    fmt, acc = fig("student", "format_rate", True), fig("student", "accuracy", True)
    with_prompt = fig("student", "accuracy", False)
    floor = None if with_prompt is None else with_prompt - BARE_SLACK
    checks = [
        (fmt is not None and fmt >= TARGET_FORMAT,
         f"student format rate, user message only: {show(fmt)} (goal ≥ {TARGET_FORMAT})"),
        (acc is not None and acc >= TARGET_ACCURACY,
         f"student accuracy, user message only: {show(acc)} (goal ≥ {TARGET_ACCURACY})"),
        (acc is not None and floor is not None and acc >= floor - 1e-9,
         f"student accuracy, user message only vs with the system prompt: {show(acc)} vs "
         f"{show(with_prompt)} (goal ≥ with prompt − {BARE_SLACK})"),
    ]  # fmt: skip
    for bare in (False, True):
        got = fig("base", "format_rate", bare)
        request = "user message only" if bare else "with the system prompt"
        checks.append((got == 0, f"base format rate, {request}: {show(got)} (goal 0)"))
    return checks


def print_summary(
    summary_path: Path, paths: Paths, times: dict[str, float], *, table: bool = True
) -> None:
    """The result table (unless eval just printed it), the targets, and where to look."""
    from rich.console import Console

    from pipeline.evaluate import print_table

    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    if table:
        print_table(summary)
    console = Console()
    for ok, what in target_checks(summary):
        console.print(f"{'[green]✓[/]' if ok else '[red]✗[/]'} {what}")
    if times:
        console.print("stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    console.print(f"report: {paths.eval / 'report.md'}")
    console.print(f"confusion matrices: {paths.eval}/confusion_<name>.png")
    console.print(f"predictions: {paths.eval}/predictions_<name>.jsonl; logs: {paths.logs}")


DEMO_BUDGETS = "none,8,16,32,64,unlimited"


def gateway_env(model: Path) -> dict[str, str]:
    """The gateway settings the GPU stack also sets: the served ``model``'s tokenizer, so
    reasoning and answer tokens are counted exactly."""
    return {"GATEWAY_TOKENIZER": str(model)}


def demo_sweep(
    upstream: str, task: Path, test_json: Path, out: Path, max_tokens: int, model: Path
) -> float:
    """The demo's stage: the student (``model``, served at ``upstream``) through the gateway
    (which knows its task) at each of :data:`DEMO_BUDGETS`, as ``distill eval`` runs it;
    returns the seconds it took."""
    env = gateway_env(model)
    with running_gateway(upstream, {"student": task}, free_port(), out / "gateway.log", env) as url:
        argv = ["eval", "--endpoint", f"student={url}@student", "--data", str(test_json),
                "--task", str(task), "--out", str(out), "--max-tokens", str(max_tokens),
                "--concurrency", "16", "--reasoning-budget", DEMO_BUDGETS]  # fmt: skip
        return run_stage("budget sweep", argv)


def shadow_stage(paths: Paths, svc: Services, task: Path, student_url: str, budget: int) -> float:
    """The student behind the gateway, the stand-in teacher as shadow: live agreement."""
    from pipeline.shadow_demo import print_shadow, run_shadow_demo

    t0 = time.monotonic()
    _say("[bold]shadow[/]: the held-out rows through the gateway, the teacher as shadow")
    live, offline = run_shadow_demo(
        task_path=task, test_json=paths.data / "test.json",
        predictions=paths.eval / BARE / "predictions_student.jsonl", student_url=student_url,
        teacher_url=svc.teacher(), teacher_model=TEACHER_MODEL, max_tokens=budget,
        out=paths.out / "shadow", port=free_port(), gateway_env=gateway_env(paths.student),
    )  # fmt: skip
    print_shadow(live, offline, paths.out / "shadow" / "flywheel.jsonl")
    return time.monotonic() - t0


def run_demo(
    out: Path,
    *,
    force: bool = False,
    task: Path,
    input_path: Path,
    train_config: Path,
    system_prompt: str | None = None,
) -> None:
    """Run every stage that is missing (or all with ``force``) and print the result;
    ``system_prompt`` overrides the training config's (keep, drop or mix)."""
    paths = Paths(out.resolve())
    paths.out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    started = time.monotonic()
    redo = force

    def needed(name: str, marker: Path, outdir: Path) -> bool:
        nonlocal redo
        if marker.exists() and not redo:
            _say(f"[dim]• {name}: {marker} exists, skipped[/]")
            return False
        if outdir.exists() and (redo or not marker.exists()):
            shutil.rmtree(outdir)  # a stale or half-written output is redone from scratch
        redo = True  # everything downstream is redone too
        return True

    with services(paths) as svc:
        if needed("generate", paths.data / "stats.json", paths.data):
            times["generate"] = run_stage(
                "generate",
                ["generate", "--task", str(task), "--input", str(input_path),
                 "--out", str(paths.data), "--teacher-url", svc.teacher(),
                 "--teacher-model", TEACHER_MODEL, "--require-gold-match"],
            )  # fmt: skip
        if needed("tiny-model", paths.base / "config.json", paths.base):
            times["tiny-model"] = run_stage(
                "tiny-model",
                ["tiny-model", "--task", str(task), "--out", str(paths.base),
                 "--corpus", str(input_path), "--corpus", str(paths.data / "train.json")],
            )  # fmt: skip
        if not trained_as(paths.adapter, system_prompt):
            redo = True  # the adapter there was trained with another system_prompt choice
        if needed("train", paths.adapter / "adapter_config.json", paths.adapter):
            # The base's vLLM starts up (~1 min, mostly imports) while the student trains.
            svc.launch("base", paths.base)
            argv = ["train", "--config", str(train_config), "--data", str(paths.data),
                    "--out", str(paths.adapter), "--base", str(paths.base)]  # fmt: skip
            if system_prompt:
                argv += ["--system-prompt", system_prompt]
            times["train"] = run_stage("train", argv)
        if needed("merge", paths.student / "distill_manifest.json", paths.student):
            times["merge"] = run_stage(
                "merge",
                ["merge", "--base", str(paths.base), "--adapter", str(paths.adapter),
                 "--out", str(paths.student)],
            )  # fmt: skip
        if needed("eval", paths.eval / "summary.json", paths.eval):
            t0 = time.monotonic()
            urls = svc.vllm({"base": paths.base, "student": paths.student})
            models = {"base": "base", "student": "student"}
            if not has_teacher_labels(paths.data / "test.json"):
                urls["teacher"], models["teacher"] = svc.teacher(), TEACHER_MODEL
            times["serve"] = time.monotonic() - t0
            budget = answer_token_budget(paths.data, paths.base)
            argv = ["eval", "--data", str(paths.data / "test.json"), "--out", str(paths.eval)]
            argv += ["--task", str(task), "--max-tokens", str(budget), "--concurrency", "16"]
            for name, url in urls.items():
                argv += ["--endpoint", f"{name}={url}@{models[name]}"]
            times["eval"] = run_stage("eval", argv)
        sweep_out = paths.out / "budget"  # the reasoning-budget curve, through the gateway
        if needed("budget sweep", sweep_out / "budget.json", sweep_out):
            url = svc.vllm({"student": paths.student})["student"]
            max_tokens = answer_token_budget(paths.data, paths.base)
            test_json = paths.data / "test.json"
            times["budget sweep"] = demo_sweep(
                url, task, test_json, sweep_out, max_tokens, paths.student
            )
            if has_teacher_labels(paths.data / "test.json"):  # the student's vLLM is still up
                times["shadow"] = shadow_stage(paths, svc, task, urls["student"], budget)
    if times:
        times["total"] = time.monotonic() - started
    print_summary(paths.eval / "summary.json", paths, times, table="eval" not in times)
    print_saved(paths.out / "budget")


def demo(
    out: Annotated[Path, typer.Option(help="where every stage writes")] = Path("runs/demo"),
    force: Annotated[bool, typer.Option(help="redo every stage even if its output exists")] = False,
    task: Annotated[Path, typer.Option(help="task YAML")] = ROOT / "configs/tasks/news.yaml",
    input: Annotated[Path, typer.Option(help="headlines to distil")] = ROOT
    / "data/news/headlines.jsonl",
    train_config: Annotated[Path, typer.Option(help="training config")] = ROOT
    / "configs/train/tiny-cpu.yaml",
    system_prompt: Annotated[
        Literal["keep", "drop", "mix"] | None,
        typer.Option(
            help="train with the data's system message kept, dropped or mixed "
            "(default: the training config's); a finished run trained otherwise is "
            "retrained"
        ),
    ] = None,
) -> None:
    """Run the whole pipeline offline on CPU: teacher → data → train → merge → serve → eval."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        run_demo(
            out,
            force=force,
            task=task,
            input_path=input,
            train_config=train_config,
            system_prompt=system_prompt,
        )
    except (DemoError, ServeError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("interrupted; servers stopped", err=True)
        raise typer.Exit(130) from None
