"""Strings from a bundle never drive the terminal: control sequences print as visible text.

A bundle's model name, prompts, generated text, command line and array names are written by
whoever made the bundle. Shown raw, ``ESC [2J`` clears the screen, OSC 52 writes the clipboard
and OSC 8 disguises a link. Every human-facing output path escapes them (SPEC.md section 8).
"""

from __future__ import annotations

import io
import json
import logging
import shutil

import numpy as np
import pytest

from ptrace.bundle_spec import BundleWriter
from ptrace.bundle_spec.schema import (
    EnvironmentInfo,
    ModelInfo,
    RequestRecord,
    RequestsInfo,
    RunInfo,
    SamplingParams,
)
from ptrace.bundle_spec.stats import row_stats
from ptrace.cli.console import Console, _TerminalSafeConsole, terminal_safe
from tests.bundle_spec.test_hostile import edit_manifest
from tests.conftest import run_cli

CLEAR_SCREEN = "\x1b[2J\x1b[H"
CLIPBOARD = "\x1b]52;c;cm0gLXJmIH4=\x07"
FAKE_LINK = "\x1b]8;;https://evil.example\x1b\\click\x1b]8;;\x1b\\"
C1_CSI = "\x9b31m"
HOSTILE = f"tiny{CLEAR_SCREEN}{CLIPBOARD}{FAKE_LINK}{C1_CSI}\x7f\r\u202e[bold]markup[/bold]"
#: What no output may contain: ESC, BEL, C1 CSI and ST, DEL, CR, the right-to-left override.
RAW = ("\x1b", "\x07", "\x9b", "\x9c", "\x7f", "\r", "\u202e")


def assert_inert(text: str) -> None:
    leaked = [repr(char) for char in RAW if char in text]
    assert not leaked, f"raw control characters {leaked} reached the terminal: {text!r}"


@pytest.fixture
def hostile_bundle(tmp_path):
    """A bundle whose every free-text field carries terminal control sequences."""
    path = tmp_path / "b.zarr"
    tensor = np.ones((4, 3), np.float32)
    with BundleWriter(path) as writer:
        writer.append("stats/logits", 0, row_stats(tensor))
        writer.append("tensors/logits", 0, tensor)
        writer.append("requests/prompt_ids", 0, np.arange(3, dtype=np.int64))
        writer.append("requests/output_ids", 0, np.array([5, 6], dtype=np.int64))
        writer.append("requests/topk_ids", 0, np.zeros((2, 1), np.int64))
        writer.append("requests/topk_logprobs", 0, np.zeros((2, 1), np.float32))
        writer.append("requests/positions", 0, np.arange(4, dtype=np.int64))
        writer.write_document(ModelInfo(model_path=HOSTILE, name=HOSTILE, architecture=HOSTILE,
                                        config={"num_hidden_layers": 1}, weights={HOSTILE: "0"},
                                        tokenizer={}, fingerprint=HOSTILE, tokenizer_fingerprint="t"))
        writer.write_document(RunInfo(backend=HOSTILE, backend_version=HOSTILE, dtype="float32", device=HOSTILE,
                                      seeds={HOSTILE: 1}, sampling=SamplingParams(), capture={},
                                      engine={HOSTILE: HOSTILE}))
        writer.write_document(EnvironmentInfo(python={"version": HOSTILE}, os={"platform": HOSTILE},
                                              hardware={"cpu": HOSTILE, "accelerators": [{"name": HOSTILE}]},
                                              packages={HOSTILE: HOSTILE}, env={HOSTILE: HOSTILE}))
        writer.write_document(RequestsInfo((RequestRecord(index=0, prompt=HOSTILE, prompt_len=3, output_len=2,
                                                          output_text=HOSTILE, output_tokens=(HOSTILE,)),)))
        writer.commit(ptrace_version=HOSTILE, command=["ptrace", HOSTILE], mode="full", tensor_names=["logits"])
    return path


def test_inspect_shows_hostile_strings_as_visible_escapes(hostile_bundle):
    result = run_cli("inspect", hostile_bundle)
    assert result.returncode == 0, result.stderr
    assert_inert(result.stdout + result.stderr)
    assert "tiny\\x1b[2J\\x1b[H\\x1b]52;c;" in result.stdout  # visible, not executed
    assert "\\x9b31m" in result.stdout and "\\u202e" in result.stdout
    assert "[bold]markup[/bold]" in result.stdout  # never parsed as Rich markup


def test_json_output_escapes_control_characters(hostile_bundle):
    result = run_cli("inspect", hostile_bundle, "--json")
    assert_inert(result.stdout)
    assert json.loads(result.stdout)["model"]["name"] == HOSTILE


def test_error_lines_escape_names_from_the_bundle(hostile_bundle):
    edit_manifest(hostile_bundle, tensor_names=["logits", HOSTILE])
    result = run_cli("validate", hostile_bundle)
    assert result.returncode == 1 and "neither canonical" in result.stderr
    assert_inert(result.stderr)
    edit_manifest(hostile_bundle, complete=HOSTILE)
    result = run_cli("inspect", hostile_bundle)
    assert result.returncode == 1 and "meta/manifest.complete is str" in result.stderr
    assert_inert(result.stderr)


def test_every_console_path_escapes():
    """The facade itself, on a colour terminal: prints, tables, success, warnings, errors,
    tracebacks, logs and progress all escape what they show (Rich's own styling still works)."""
    console = Console()
    console.out, console.err = (_TerminalSafeConsole(file=io.StringIO(), force_terminal=True, color_system="truecolor",
                                                     markup=False, highlight=False) for _ in range(2))
    console.print(HOSTILE)
    table = console.table("name", title=HOSTILE)
    table.add_row(HOSTILE)
    console.print(table)
    console.success(HOSTILE)
    console.warn(HOSTILE)
    console.error(HOSTILE)
    console.traceback(HOSTILE)
    console.log_handler().handle(logging.makeLogRecord({"msg": HOSTILE}))
    with console.progress(HOSTILE) as update:
        update(1, 2)
    for rich in (console.out, console.err):
        text = rich.file.getvalue()
        assert "tiny\\x1b[2J" in text and "\x1b[" in text  # escaped content, real styling
        for raw in ("\x1b[2J", "\x1b]52", "\x1b]8;;https://evil", "\x9b", "\x7f", "\u202e", "\x07"):
            assert raw not in text, raw


def test_terminal_safe_escapes_c0_c1_del_and_bidi_but_keeps_layout():
    dangerous = "".join(map(chr, [*range(0x20), 0x7F, *range(0x80, 0xA0), 0x202E, 0x2066]))
    escaped = terminal_safe(dangerous)
    assert all(char not in escaped for char in dangerous if char not in "\n\t")
    assert "\n" in escaped and "\t" in escaped
    assert terminal_safe("plain text, ünïcödé, 中文 ✓") == "plain text, ünïcödé, 中文 ✓"


def test_commands_are_quoted_for_the_shell(tmp_path):
    """A recorded ``--tensors *`` is shown as ``--tensors '*'``: pasted into a shell, it still means '*'."""
    from tests.bundle_spec.test_roundtrip import write_minimal

    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    write_minimal(a, {"logits": np.ones((4, 3), np.float32)})
    edit_manifest(a, command=["ptrace", "capture", "--tensors", "*", "--prompt", "it's"])
    shutil.copytree(a, b)
    result = run_cli("inspect", a)
    assert result.returncode == 0, result.stderr
    assert "ptrace capture --tensors '*' --prompt 'it'\"'\"'s'" in result.stdout
    result = run_cli("compare", a, b, "--report", tmp_path / "r.html")
    assert result.returncode == 0, result.stderr
    assert "--tensors &#39;*&#39;" in (tmp_path / "r.html").read_text()
