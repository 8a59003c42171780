"""Make the golden bundles of the current spec version, ``tests/data/golden/v{N}``, and what
reading them must give.

Run from the repository root (``python tests/data/make_golden.py``) with the torch backend
installed. The bundles are committed: ``tests/bundle_spec/test_golden.py`` reads every version's
with the current reader and compares every metadata value and every array's bytes (SHA-256)
with ``expected.json``, so a change that stops reading existing bundles exactly fails a test.
Older versions' directories are never regenerated (their writer is gone): run this only for a
new spec version, after bumping it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from ptrace.bundle_spec import SPEC_VERSION  # noqa: E402

GOLDEN = Path(f"tests/data/golden/v{SPEC_VERSION}")
MODEL = "examples/tiny-qwen2"
#: One short request and a few tensors (q is 3-D; the logits): small enough to commit (under
#: 1 MB in all). The replay runs in bfloat16, so a logical dtype stored bit for bit is covered.
CAPTURE = ["--backend", "torch", "--model", MODEL, "--prompt", "The capital of France",
           "--max-new-tokens", "3", "--logprobs", "4", "--tensors", "layers.0.q,layers.0.attn,layers.0.out,logits"]


def ptrace(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ptrace", *args], cwd=ROOT, check=True)


def expected(path: Path) -> dict:
    """What the reader gives for a bundle: every metadata document, and each array's SHA-256."""
    from ptrace.bundle_spec import open_bundle

    with open_bundle(ROOT / path) as bundle:
        arrays = {}
        for name in bundle.manifest.arrays:
            data = bundle._read(name)
            arrays[name] = {"shape": list(data.shape), "dtype": str(data.dtype),
                            "sha256": hashlib.sha256(data.tobytes()).hexdigest()}
        return {"manifest": bundle.manifest.to_dict(), "model": bundle.model.to_dict(),
                "run": bundle.run.to_dict(), "environment": bundle.environment.to_dict(),
                "requests": bundle.requests.to_dict(), "replay": bundle.replay_info(), "arrays": arrays}


def main() -> None:
    shutil.rmtree(ROOT / GOLDEN, ignore_errors=True)
    (ROOT / GOLDEN).mkdir(parents=True)
    ptrace("capture", *CAPTURE, "--output", str(GOLDEN / "torch.zarr"))
    ptrace("capture", *CAPTURE, "--mode", "stats", "--output", str(GOLDEN / "stats.zarr"))
    ptrace("pack", str(GOLDEN / "torch.zarr"), "--output", str(GOLDEN / "torch.zarr.zip"))
    ptrace("replay", str(GOLDEN / "torch.zarr"), "--backend", "torch", "--dtype", "bfloat16",
           "--mode", "teacher-forced",
           "--output", str(GOLDEN / "replay"), "--report", str(GOLDEN / "replay.html"))
    (ROOT / GOLDEN / "replay.html").unlink()
    bundles = ("torch.zarr", "stats.zarr", "torch.zarr.zip", "replay.teacher.zarr")
    result = {name: expected(GOLDEN / name) for name in bundles}
    (ROOT / GOLDEN / "expected.json").write_text(json.dumps(result, indent=1, sort_keys=True, default=repr) + "\n")


if __name__ == "__main__":
    main()
