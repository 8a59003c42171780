"""ptrace: capture, replay and compare LLM inference runs across engines.

The data flows one way: a backend runs the model, ``capture`` records it into a bundle
(``bundle_spec``), ``replay`` re-runs a bundle and compares, ``reports`` renders the result.

Python API::

    import ptrace
    path = ptrace.capture(ptrace.CaptureConfig(backend="torch", model="examples/tiny-qwen2",
                                               random_input_ids=128, seed=42, output="b.zarr"))
    bundle = ptrace.open_bundle(path)
    bundle.tensor(0, "layers.0.out")

The names below are imported on first use, so that ``import ptrace`` (and ``ptrace --help``)
stays fast: zarr and the engines load only when something needs them.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ptrace")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

_LAZY = {
    "Bundle": "ptrace.bundle_spec",
    "open_bundle": "ptrace.bundle_spec",
    "validate_bundle": "ptrace.bundle_spec",
    "CaptureConfig": "ptrace.capture",
    "capture": "ptrace.capture",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ptrace' has no attribute {name!r}")
