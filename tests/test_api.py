"""The top-level Python API: every documented name resolves to what it says, lazily."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_public_names_resolve_even_after_the_subpackages_are_imported():
    import ptrace.capture.session  # noqa: F401  (makes ``ptrace.capture`` the subpackage)
    import ptrace.compare
    import ptrace.replay.session  # noqa: F401

    assert callable(ptrace.capture_bundle) and callable(ptrace.replay_bundle)
    assert ptrace.compare_bundles is ptrace.compare.compare and callable(ptrace.write_report)
    assert ptrace.Comparison is ptrace.compare.Comparison
    assert ptrace.open_bundle.__name__ == "open_bundle"
    assert set(ptrace.__all__) >= {"capture_bundle", "replay_bundle", "compare_bundles", "open_bundle"}


def test_import_is_light():
    probe = subprocess.run([sys.executable, "-c", "import sys, ptrace; "
                            "print(sorted(m for m in ('torch', 'zarr', 'numpy') if m in sys.modules))"],
                           capture_output=True, text=True, cwd=ROOT)
    assert probe.stdout.strip() == "[]"
