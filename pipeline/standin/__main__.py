"""``python -m pipeline.standin``: the stand-in teacher without the rest of the CLI."""

import typer

from pipeline.standin.command import teacher_standin

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command()(teacher_standin)

if __name__ == "__main__":
    app()
