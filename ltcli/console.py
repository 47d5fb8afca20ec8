"""Consoles: everything human-readable goes to stderr, so stdout stays a clean pipe of paths."""

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

err_console = Console(stderr=True)
if not err_console.is_terminal:  # logs and pipes: don't wrap table rows and epoch lines at 80 columns
    err_console = Console(stderr=True, width=120)


def progress_bar(**kwargs) -> Progress:
    """A progress bar on stderr; tasks may carry a `rate` field (e.g. images/s)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
        **kwargs,
    )
