"""The CLI's conventions (docs/cli.md): ``--json -`` puts JSON alone on stdout, progress goes to
stderr (a line per phase without a terminal), help reads at 80 columns, dtypes take their short
names, bundle names are checked, a corrupt source is refused before any engine starts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ptrace.bundle_spec import open_bundle, validate_bundle
from tests.conftest import GOLDEN, ROOT, run_cli
from tests.monitor.servers import misbehaving_server

COMMANDS = ("capture", "replay", "whatif", "compare", "monitor", "settings", "inspect", "validate", "pack", "unpack",
            "backends", "envs", "envs list", "envs create")


def strict_json(text: str):
    """``text`` parsed as one JSON document, NaN and Infinity refused as strict parsers do."""
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def _cli_in(cwd: Path, *args) -> subprocess.CompletedProcess:
    """The real command run from another directory (``run_cli`` runs from the repository)."""
    return subprocess.run([sys.executable, "-m", "ptrace", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("command", COMMANDS)
def test_help_reads_at_80_columns(command):
    result = run_cli(*command.split(), "--help", env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    assert "…" not in result.stdout and "<bool>" not in result.stdout


def test_capture_help_shows_what_was_cut():
    text = run_cli("capture", "--help", env={"COLUMNS": "80"}).stdout
    assert "--num-requests, --num-prompts <int>" in text
    assert "[default: no-prompt-logprobs]" in text and "[default: float32]" in text
    assert "--stop-at-eos  " in text or "--stop-at-eos\n" in text  # a flag: no value placeholder
    for heading in ("Engine:", "Inputs:", "Sampling:", "What to capture:"):
        assert heading in text.splitlines()
    whatif = run_cli("whatif", "--help", env={"COLUMNS": "80"}).stdout
    assert "noise:layers.*.k:std=1e-3:positions=0-99" in whatif  # the --inject example, whole
    assert "-i 'noise:layers.*.k,layers.*.v:std=1:positions=0-99' \\" in whatif  # an example as written


def test_json_stdout_stays_json_when_something_prints_on_file_descriptor_1():
    """An engine's own prints (C code writing to fd 1) land on stderr while JSON is on stdout."""
    script = textwrap.dedent("""
        import os
        from ptrace.cli.console import console
        with console.data_on_stdout():
            os.write(1, b"engine noise on fd 1\\n")
            print("a print")
            console.print("a human line")
            console.json({"ok": True})
        print("after")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == '{\n  "ok": true\n}\nafter\n'
    assert "engine noise on fd 1" in result.stderr and "a print" in result.stderr and "a human line" in result.stderr


@pytest.mark.parametrize("args", [("inspect", "{full}", "--json"), ("validate", "{full}", "--json"),
                                  ("compare", "{full}", "{full}", "--json", "-"),
                                  ("compare", "{full}", "{full}", "--json", "-", "--report", "{tmp}/r.html"),
                                  ("settings", "{full}", "--json"), ("settings", "{full}", "{full}", "--json"),
                                  ("backends", "--json"), ("envs", "list", "--json")],
                         ids=lambda args: " ".join(a for a in args if not a.startswith("{")))
def test_json_alone_on_stdout(args, full_bundle, tmp_path):
    result = run_cli(*(a.format(full=full_bundle, tmp=tmp_path) for a in args))
    assert result.returncode == 0, result.stderr
    strict_json(result.stdout)
    if args[0] == "compare":
        assert "PASS" in result.stderr  # the verdict line still shows, on stderr


def test_monitor_json_alone_on_stdout(full_bundle):
    with misbehaving_server("error") as server:
        result = run_cli("monitor", full_bundle, "--endpoint", server.url, "--once", "--json", "--timeout", "2")
    assert result.returncode == 3, result.stderr
    assert strict_json(result.stdout)["token_match_rate"] is None


@pytest.fixture(scope="module")
def relative_capture(tmp_path_factory, example_model):
    """A capture made with a relative --model, into a zip, with a short dtype name; from its own
    directory (``here/``), next to a copy of the model."""
    root = tmp_path_factory.mktemp("relative")
    here = root / "here"
    here.mkdir()
    shutil.copytree(example_model, here / "model")
    result = _cli_in(here, "capture", "-b", "torch", "-m", "model", "--dtype", "fp32", "--random-input-ids", "12",
                     "--max-new-tokens", "3", "-o", "run.zarr.zip")
    assert result.returncode == 0, result.stderr
    return here / "run.zarr.zip", result


def test_capture_records_the_model_path_absolute_and_as_given(relative_capture):
    bundle, result = relative_capture
    assert bundle.is_file() and validate_bundle(bundle) == []
    with open_bundle(bundle) as opened:
        assert opened.model.model_path == str(bundle.parent / "model")
        assert opened.model.model_path_given == "model"
        assert opened.run.dtype == "float32"  # fp32, recorded by its name
    assert not list(bundle.parent.glob(".run.zarr.zip*")), "the staging directory is left behind"


def test_progress_without_a_terminal_is_a_line_per_phase(relative_capture):
    _, result = relative_capture
    lines = result.stderr.splitlines()
    assert any("capture on torch: loading model (float32, cpu)" in line for line in lines), result.stderr
    assert any("capture on torch: writing run.zarr.zip" in line for line in lines), result.stderr
    assert len(lines) == 2, result.stderr  # not one per step


def test_replay_from_another_directory_with_json_on_stdout(relative_capture):
    """The relative --model is found from anywhere; bf16 is bfloat16; stdout is the JSON alone,
    the bundles written and the verdict are said on stderr."""
    bundle, _ = relative_capture
    elsewhere = bundle.parent.parent / "elsewhere"
    elsewhere.mkdir()
    result = _cli_in(elsewhere, "replay", bundle, "-b", "torch", "--dtype", "bf16", "--mode", "teacher-forced",
                     "--no-calibrate", "-o", elsewhere / "r", "--json", "-")
    assert result.returncode == 0, result.stderr
    data = strict_json(result.stdout)
    assert data["b"]["dtype"] == "bfloat16"
    assert "teacher-forced replay:" in result.stderr and "report:" in result.stderr
    assert "writing r.teacher.zarr" in result.stderr
    assert (elsewhere / "r.teacher.zarr").is_dir()


def test_whatif_json_alone_on_stdout(full_bundle, tmp_path):
    result = run_cli("whatif", full_bundle, "-b", "torch", "-i", "cast:layers.1.out:dtype=bf16",
                     "-o", tmp_path / "w", "--json", "-")
    assert result.returncode == 0, result.stderr
    data = strict_json(result.stdout)
    assert len(data["whatifs"]) == 1 and "cast" in data["whatifs"][0]["label"]
    assert "cast" in result.stderr  # the what-if's sentence, on stderr


@pytest.mark.parametrize("name", ["out.txt", "out", ".zarr", "run.zip"])
def test_a_bundle_name_that_is_not_one_is_refused(tmp_path, example_model, name):
    result = run_cli("capture", "-b", "torch", "-m", example_model, "--random-input-ids", "4", "-o", tmp_path / name)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert ".zarr or .zarr.zip" in line and name in line
    assert list(tmp_path.iterdir()) == []


def test_pack_and_unpack_check_the_names_they_write(full_bundle, tmp_path):
    for command, source, name in (("pack", full_bundle, "b.zip"), ("unpack", GOLDEN / "torch.zarr.zip", "b.txt")):
        result = run_cli(command, source, "-o", tmp_path / name)
        assert result.returncode == 2 and "a bundle's name ends in" in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []
    assert run_cli("pack", full_bundle, "-o", tmp_path / "b.zarr.zip").returncode == 0


def _corrupt(bundle: Path, into: Path) -> Path:
    """A copy of ``bundle`` with one byte of one tensor chunk flipped (every document intact)."""
    shutil.copytree(bundle, into)
    chunk = next(p for p in sorted((into / "tensors").rglob("*")) if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    return into


@pytest.mark.parametrize("command", [("replay",), ("replay", "--localize"),
                                     ("whatif", "-i", "noise:layers.0.out:std=0.1")])
def test_a_corrupt_source_is_refused_before_any_engine_starts(full_bundle, tmp_path, command):
    corrupt = _corrupt(full_bundle, tmp_path / "source" / "corrupt.zarr")
    out = tmp_path / "out"
    out.mkdir()
    started = time.monotonic()
    result = run_cli(command[0], corrupt, "-b", "torch", *command[1:], "-o", out / "r")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert str(corrupt) in line and "nothing was run" in line and "ptrace validate" in line
    assert "checksum" in line or "CRC" in line or "crc" in line, line
    assert list(out.iterdir()) == [] and sorted(p.name for p in corrupt.parent.iterdir()) == ["corrupt.zarr"]
    assert time.monotonic() - started < 60  # no engine load, no replay


def test_short_dtype_names_in_what_ifs():
    from ptrace.capture import whatif

    for name in ("bf16", "fp16", "fp32", "BFloat16"):
        (spec,) = whatif.split_joined(f"cast:layers.0.out:dtype={name}")
        whatif.check((whatif.parse(spec),), num_layers=2, source=None)
    with pytest.raises(ValueError, match="unknown dtype"):
        whatif.check((whatif.parse("cast:layers.0.out:dtype=bf17"),), num_layers=2, source=None)
