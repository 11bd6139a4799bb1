"""The ``distill`` console script: one sub-command per pipeline stage.

Each stage keeps its command in its own module (``<stage>/command.py``) and imports its heavy
libraries inside the command body, so ``distill --help`` stays fast and each image only needs
its own stage's dependencies.
"""

from __future__ import annotations

import typer

from pipeline.demo import demo
from pipeline.eval_cli import eval_cmd
from pipeline.generate.command import generate
from pipeline.serve import serve_cmd
from pipeline.standin.command import teacher_standin
from pipeline.train.command import merge, tiny_model, train

app = typer.Typer(
    name="distill",
    help="Distil a DeepSeek-R1-style reasoning model into a small student, end to end.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

app.command("teacher-standin")(teacher_standin)
app.command("generate")(generate)
app.command("tiny-model")(tiny_model)
app.command("train")(train)
app.command("merge")(merge)
app.command("eval")(eval_cmd)
app.command("serve")(serve_cmd)
app.command("demo")(demo)


def main() -> None:
    """Entry point for the ``distill`` console script."""
    app()


if __name__ == "__main__":
    main()
