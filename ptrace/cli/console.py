"""The one place the CLI talks to the user: results on stdout, errors as one line on stderr.

Everything printed that came from a bundle goes through ``rich.text.Text`` (never markup), so a
prompt containing ``[bold]`` or escape sequences prints as itself.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console as RichConsole
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text


class Console:
    def __init__(self) -> None:
        # Piped output (logs, CI) gets a wide virtual terminal rather than rich's 80 columns.
        self.out = RichConsole(soft_wrap=False, highlight=False, width=None if sys.stdout.isatty() else 160)
        self.err = RichConsole(stderr=True, soft_wrap=True, highlight=False)
        self.debug = False

    def print(self, *renderables: Any) -> None:
        self.out.print(*renderables)

    def json(self, data: Any) -> None:
        """Machine-readable output: plain JSON on stdout, nothing else."""
        sys.stdout.write(json.dumps(data, indent=2, default=str, allow_nan=True) + "\n")

    def success(self, message: str) -> None:
        self.out.print(Text(message, style="green"))

    def warn(self, message: str) -> None:
        self.err.print(Text.assemble(("warning: ", "yellow bold"), message))

    def error(self, message: str) -> None:
        self.err.print(Text.assemble(("error: ", "red bold"), " ".join(message.split("\n"))))

    @contextmanager
    def progress(self, description: str) -> Iterator[Any]:
        """A progress bar on stderr; yields ``update(done, total)``."""
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeRemainingColumn(), console=self.err, transient=True)
        task = bar.add_task(description, total=None)
        with bar:
            yield lambda done, total: bar.update(task, completed=done, total=total)


console = Console()
