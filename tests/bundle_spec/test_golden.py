"""Bundles written by earlier ptrace versions keep reading exactly (``tests/data/golden/v{N}``).

The committed bundles of each spec version (a torch capture, a stats-only capture, the capture
zipped, a bfloat16 replay) were made by ``tests/data/make_golden.py`` with that version's
writer, which also recorded what reading them gave: every metadata document, and every array's
shape, dtype and SHA-256. A change to the reader (or the format) that reads any value
differently fails here.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from ptrace.bundle_spec import SPEC_VERSION, open_bundle, validate_bundle
from tests.conftest import GOLDEN_ROOT as GOLDEN

#: "v1/torch.zarr" -> what reading it must give
EXPECTED = {f"{version.name}/{name}": value for version in sorted(GOLDEN.glob("v*"))
            for name, value in json.loads((version / "expected.json").read_text()).items()}


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


@pytest.mark.parametrize("version", [1, SPEC_VERSION])
def test_golden_bundles_cover_the_forms_and_dtypes(version):
    """Each version's set stays what the docstring promises: directory and zip, full and stats,
    a replay in bfloat16."""
    mine = {name: value for name, value in EXPECTED.items() if name.startswith(f"v{version}/")}
    forms = {name: (value["manifest"]["mode"], value["replay"] is not None) for name, value in mine.items()}
    assert any(name.endswith(".zip") for name in forms) and ("stats", False) in forms.values()
    assert any(replay for _, replay in forms.values())
    assert "bfloat16" in {a["dtype"] for v in mine.values() for a in v["arrays"].values()}
    assert {value["manifest"]["spec_version"] for value in mine.values()} == {version}
    assert sum(f.stat().st_size for f in (GOLDEN / f"v{version}").rglob("*") if f.is_file()) < 1 << 20


def test_both_versions_read_the_same_run_alike():
    """The same capture command, written as version 1 and as version 2, reads back alike through
    the public API: the reader hides the layout."""
    with open_bundle(GOLDEN / "v1/torch.zarr") as old, open_bundle(GOLDEN / f"v{SPEC_VERSION}/torch.zarr") as new:
        assert old.tensor_names == new.tensor_names and old.num_requests == new.num_requests
        for r in range(old.num_requests):
            for read in ("prompt_ids", "output_ids", "positions"):
                assert np.array_equal(getattr(old, read)(r), getattr(new, read)(r)), read
            for name in old.tensor_names:
                # The version 1 set predates logits from the last prompt position only (SPEC.md 6).
                shared, rows_old, rows_new = np.intersect1d(old.tensor_positions(r, name),
                                                            new.tensor_positions(r, name), return_indices=True)
                assert shared.size == new.tensor_positions(r, name).size
                assert old.tensor(r, name).dtype == new.tensor(r, name).dtype
                np.testing.assert_allclose(old.tensor(r, name)[rows_old], new.tensor(r, name)[rows_new],
                                           rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(old.stats(r, name)[rows_old], new.stats(r, name)[rows_new],
                                           rtol=1e-5, atol=1e-5)
