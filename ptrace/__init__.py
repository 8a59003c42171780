"""ptrace: capture, replay and compare LLM inference runs across engines.

The data flows one way: a backend runs the model, ``capture`` records it into a bundle
(``bundle_spec``), ``replay`` re-runs a bundle, ``compare`` compares two, ``reports`` renders the
result.

Python API (the subpackages are named ``capture``, ``replay`` and ``compare``, so the functions
carry the object they act on)::

    import ptrace
    path = ptrace.capture_bundle(ptrace.CaptureConfig(
        backend="torch", model="examples/tiny-qwen2", random_input_ids=128, output="b.zarr",
        sampling=ptrace.SamplingParams(seed=42), settings=ptrace.CaptureSettings(tensors=("*",))))
    with ptrace.open_bundle(path) as bundle:
        bundle.tensor(0, "layers.0.out")
    result = ptrace.replay_bundle(ptrace.ReplayConfig(bundle=path, backend="torch", dtype="bfloat16"))
    ptrace.write_report(result.primary, Path("report.html"))

The names below are imported on first use, so that ``import ptrace`` (and ``ptrace --help``)
stays fast: zarr and the engines load only when something needs them. ``__version__`` too: it
is read from the installed package's metadata, and ``importlib.metadata`` alone costs ``--help``
about 20 ms.
"""

from __future__ import annotations

import importlib

#: The distribution name on the package index (``pip install ptrace-llm``): ``ptrace`` there is an
#: unrelated project, so the import name and the command differ from it.
DISTRIBUTION = "ptrace-llm"

_LAZY = {  # public name -> (module, attribute)
    "Bundle": ("ptrace.bundle_spec", "Bundle"),
    "open_bundle": ("ptrace.bundle_spec", "open_bundle"),
    "validate_bundle": ("ptrace.bundle_spec", "validate_bundle"),
    "CaptureConfig": ("ptrace.capture.plan", "CaptureConfig"),
    "CaptureSettings": ("ptrace.bundle_spec.schema", "CaptureSettings"),
    "SamplingParams": ("ptrace.bundle_spec.schema", "SamplingParams"),
    "capture_bundle": ("ptrace.capture.session", "capture"),
    "ReplayConfig": ("ptrace.replay.plan", "ReplayConfig"),
    "replay_bundle": ("ptrace.replay.session", "replay"),
    "compare_bundles": ("ptrace.compare", "compare"),
    "Comparison": ("ptrace.compare", "Comparison"),
    "write_report": ("ptrace.reports.html", "write_report"),
}

__all__ = ["__version__", *_LAZY]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0+unknown"


def __getattr__(name: str):
    if name == "__version__":
        return _version()
    if name in _LAZY:
        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'ptrace' has no attribute {name!r}")
