"""Terminal output: one rich console for tables and messages, and progress bars for long steps."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console

# markup=False: text is printed as written; rich would take "[pypi]" in "new data [pypi]" for a style tag.
console = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)


def print_to_stdout() -> None:
    """Send the console's output to stdout, for a process an orchestrator runs: Airflow logs a
    task's stderr at ERROR level, and ctloop's normal output (progress, the gate's decision) is not
    an error. Exceptions still reach the task log as errors."""
    import sys

    console.file = sys.stdout


def error(message: str) -> None:
    """An error line: "error:" in red, then the message as written."""
    from rich.text import Text

    console.print(Text.assemble(("error:", "red"), " ", message))


@contextmanager
def progress_bar(description: str, total: int, unit: str = "steps", enabled: bool = True) -> Iterator[Any]:
    """Yield `advance(n=1, **fields)`; fields (e.g. loss=1.23) show next to the bar. Disabled: a no-op
    (e.g. on every process but the first of a distributed run)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not enabled:
        yield lambda n=1, **fields: None
        return

    columns = [
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}", markup=False),
    ]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields: float) -> None:
            info = "  ".join(f"{k} {v:.3f}" for k, v in fields.items())
            progress.update(task, advance=n, info=info)

        yield advance
