"""The ``ptrace`` command: one file per command, each a thin layer over the library.

``main`` is the only place errors become exit codes: a :class:`~ptrace.errors.PtraceError`
prints one line on stderr; anything else too, unless ``--debug`` asks for the traceback.
Libraries' warnings and logs stay off stderr unless ``--debug``; everything that is printed
goes through the console, which escapes control characters (``console.py``).
"""

from __future__ import annotations

import logging
import sys
import traceback
import warnings
from typing import Annotated

import typer

from ptrace.cli import options as opt
from ptrace.cli import replay as replay_command
from ptrace.cli.backends import backends
from ptrace.cli.capture import capture
from ptrace.cli.compare import compare
from ptrace.cli.console import console
from ptrace.cli.envs import envs
from ptrace.cli.help import PanelCommand, PanelGroup
from ptrace.cli.inspect import inspect
from ptrace.cli.monitor import monitor
from ptrace.cli.pack import pack, unpack
from ptrace.cli.replay import replay
from ptrace.cli.settings import settings
from ptrace.cli.validate import validate
from ptrace.errors import PtraceError

app = typer.Typer(
    name="ptrace",
    help="Find where and why two LLM inference engines disagree.\n\n"
         "capture a run into a bundle, replay it on another engine, dtype or device, compare and "
         "read the HTML report; watch a serving endpoint for drift (monitor); inspect, validate and "
         "pack bundles for bug reports.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    cls=PanelGroup,
    rich_markup_mode=None,  # plain help, readable at 80 columns (help.py)
)


@app.callback()
def _global(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
) -> None:
    console.debug = debug
    handler = console.log_handler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.ERROR, handlers=[handler], force=True)
    logging.getLogger("ptrace").setLevel(logging.DEBUG if debug else logging.WARNING)
    logging.captureWarnings(debug)
    if not debug:
        warnings.simplefilter("ignore")


app.command(cls=PanelCommand, rich_help_panel="Run")(capture)
app.command(cls=PanelCommand, rich_help_panel="Run")(replay)
app.command("whatif", cls=PanelCommand, rich_help_panel="Run", help=replay_command.WHATIF_HELP)(replay)
app.command(cls=PanelCommand, rich_help_panel="Compare")(compare)
app.command(cls=PanelCommand, rich_help_panel="Compare")(monitor)
app.command(cls=PanelCommand, rich_help_panel="Compare")(settings)
app.command(cls=PanelCommand, rich_help_panel="Bundles")(inspect)
app.command(cls=PanelCommand, rich_help_panel="Bundles")(validate)
app.command(cls=PanelCommand, rich_help_panel="Bundles")(pack)
app.command(cls=PanelCommand, rich_help_panel="Bundles")(unpack)
app.command(cls=PanelCommand, rich_help_panel="Engines")(backends)
app.add_typer(envs, name="envs", rich_help_panel="Engines")


def _document_engine_options(command: typer.main.TyperCommand) -> None:
    """Fill in ``-E``'s help from the backends' option schemas (only when a command's help is
    shown: reading the schemas imports every backend module)."""
    for parameter in command.params:
        if parameter.name == opt.ENGINE_OPTION_PARAMETER:
            parameter.help = opt.engine_option_help()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        command = typer.main.get_command(app)
        if args and args[0] in command.commands and {"--help", "-h"} & set(args):
            _document_engine_options(command.commands[args[0]])
        code = command.main(args=args, prog_name="ptrace", standalone_mode=False)
    except typer.Exit as exc:
        code = exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        console.error("interrupted")
        code = 130
    except typer.TyperException as exc:  # a missing or malformed option: usage, then the error
        exc.show()
        code = exc.exit_code
    except PtraceError as exc:
        if console.debug:
            console.traceback(traceback.format_exc())
        console.error(str(exc))
        code = exc.exit_code
    except Exception as exc:  # an engine's own failure: still one line, with the way to more
        if console.debug:
            console.traceback(traceback.format_exc())
        more = "" if console.debug else " (run with --debug for the traceback)"
        console.error(f"{type(exc).__name__}: {exc}{more}")
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
