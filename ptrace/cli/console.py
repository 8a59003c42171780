"""The one place the CLI talks to the user: results on stdout, errors as one line on stderr.

Bundles come from strangers, so nothing they hold may drive the terminal: a model name, a
prompt or an array name carrying ESC, CSI or OSC sequences (clear the screen, move the cursor,
write the clipboard with OSC 52, fake a link with OSC 8) must print as visible text. This is
enforced here, once, for every output path: the Rich consoles below escape every control
character (C0 but newline and tab, DEL, C1, and the bidirectional overrides that reorder a line)
in every segment of text they render, whatever the command built, while Rich's own styling and
cursor control (separate control segments) pass. Strings are also never parsed as Rich markup,
so ``[bold]`` prints as itself.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console as RichConsole
from rich.console import ConsoleOptions, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

_BIDI_CONTROLS = (*range(0x202A, 0x202F), *range(0x2066, 0x206A))
_UNSAFE = {code: f"\\x{code:02x}" for code in (*range(0x00, 0x20), *range(0x7F, 0xA0)) if chr(code) not in "\n\t"}
_UNSAFE.update({code: f"\\u{code:04x}" for code in _BIDI_CONTROLS})


def terminal_safe(text: str) -> str:
    """``text`` with every character that could drive a terminal written as a visible escape."""
    return text.translate(_UNSAFE)


def safe_text(value: Any, style: str = "") -> Text:
    """A Rich ``Text`` of any value, never parsed as markup, with control characters escaped."""
    if isinstance(value, Text):
        if terminal_safe(value.plain) == value.plain:
            return value
        return Text(terminal_safe(value.plain), style=value.style)
    return Text(terminal_safe(str(value)), style=style)


class _TerminalSafeConsole(RichConsole):
    """A Rich console that escapes control characters in every text segment it renders."""

    def render(self, renderable: RenderableType, options: ConsoleOptions | None = None) -> Iterable[Segment]:
        for segment in super().render(renderable, options):
            if segment.control or terminal_safe(segment.text) == segment.text:
                yield segment
            else:
                yield Segment(terminal_safe(segment.text), segment.style)


class SafeTable(Table):
    """A Rich table whose cells are plain text with control characters escaped before layout."""

    def add_row(self, *renderables: Any, **kwargs: Any) -> None:
        super().add_row(*(None if cell is None else safe_text(cell) for cell in renderables), **kwargs)


class _ConsoleHandler(logging.Handler):
    """Log records printed through the console, so they are escaped like everything else."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        self.console.err.print(safe_text(self.format(record)))


class Console:
    def __init__(self) -> None:
        # Piped output (logs, CI) gets a wide virtual terminal rather than rich's 80 columns.
        self.out = _TerminalSafeConsole(soft_wrap=False, highlight=False, markup=False,
                                        width=None if sys.stdout.isatty() else 160)
        self.err = _TerminalSafeConsole(stderr=True, soft_wrap=True, highlight=False, markup=False)
        self.debug = False

    def print(self, *renderables: Any) -> None:
        self.out.print(*(item if hasattr(item, "__rich_console__") and not isinstance(item, Text)
                         else safe_text(item) for item in renderables))

    def table(self, *columns: str, **kwargs: Any) -> SafeTable:
        """A table to fill with ``add_row`` and ``print``; cells are escaped plain text."""
        return SafeTable(*columns, **kwargs)

    def json(self, data: Any) -> None:
        """Machine-readable output: plain JSON on stdout, nothing else (control characters escaped)."""
        self.json_text(json.dumps(data, indent=2, default=str, allow_nan=True))

    def json_text(self, text: str) -> None:
        """JSON serialised already (escaped, as :meth:`json` writes it) on stdout, nothing else."""
        sys.stdout.write(text + "\n")

    def success(self, message: str) -> None:
        self.out.print(safe_text(message, style="green"))

    def warn(self, message: str) -> None:
        self.err.print(Text.assemble(("warning: ", "yellow bold"), safe_text(message)))

    def error(self, message: str) -> None:
        self.err.print(Text.assemble(("error: ", "red bold"), safe_text(" ".join(message.split("\n")))))

    def traceback(self, text: str) -> None:
        """A traceback (``--debug``), escaped like every other line."""
        self.err.print(safe_text(text.rstrip("\n")), soft_wrap=True)

    def log_handler(self) -> logging.Handler:
        return _ConsoleHandler(self)

    @contextmanager
    def progress(self, description: str) -> Iterator[Any]:
        """A progress bar on stderr; yields ``update(done, total, stage=None)``, ``stage`` naming
        work that is not the main one (the bar then reads ``description: stage``)."""
        bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                       TimeRemainingColumn(), console=self.err, transient=True)
        task = bar.add_task(terminal_safe(description), total=None)
        with bar:
            yield lambda done, total, stage=None: bar.update(
                task, completed=done, total=total,
                description=terminal_safe(f"{description}: {stage}" if stage else description))


console = Console()
