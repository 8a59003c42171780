"""Bundles written by earlier ptrace versions keep reading exactly (``tests/data/golden``).

The committed spec-v1 bundles (a torch capture, a stats-only capture, the capture zipped, a
bfloat16 replay) were made by ``tests/data/make_golden.py``, which also recorded what reading
them gave: every metadata document, and every array's shape, dtype and SHA-256. A change to the
reader (or the format) that reads any value differently fails here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ptrace.bundle_spec import open_bundle, validate_bundle
from tests.conftest import ROOT

GOLDEN = ROOT / "tests" / "data" / "golden"
EXPECTED = json.loads((GOLDEN / "expected.json").read_text())


def _json(value) -> str:
    """One comparable text for metadata (NaN included, which ``==`` would not match)."""
    return json.dumps(value, sort_keys=True, default=repr)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_golden_bundle_reads_exactly(name):
    expected = EXPECTED[name]
    with open_bundle(GOLDEN / name) as bundle:
        documents = {"manifest": bundle.manifest.to_dict(), "model": bundle.model.to_dict(),
                     "run": bundle.run.to_dict(), "environment": bundle.environment.to_dict(),
                     "requests": bundle.requests.to_dict(), "replay": bundle.replay_info()}
        for document, value in documents.items():
            assert _json(value) == _json(expected[document]), document
        assert sorted(bundle.manifest.arrays) == sorted(expected["arrays"])
        for path, record in expected["arrays"].items():
            data = bundle._read(path)
            assert [list(data.shape), str(data.dtype), hashlib.sha256(data.tobytes()).hexdigest()] == \
                   [record["shape"], record["dtype"], record["sha256"]], path


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_golden_bundle_validates(name):
    assert validate_bundle(GOLDEN / name) == []


def test_golden_bundles_cover_the_forms_and_dtypes():
    """The set stays what its docstring promises: directory and zip, full and stats, a replay in bfloat16."""
    forms = {name: (EXPECTED[name]["manifest"]["mode"], EXPECTED[name]["replay"] is not None) for name in EXPECTED}
    assert any(name.endswith(".zip") for name in forms) and ("stats", False) in forms.values()
    assert any(replay for _, replay in forms.values())
    assert "bfloat16" in {a["dtype"] for v in EXPECTED.values() for a in v["arrays"].values()}
    assert sum(f.stat().st_size for f in Path(GOLDEN).rglob("*") if f.is_file()) < 1 << 20
