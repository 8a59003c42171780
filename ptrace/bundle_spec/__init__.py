"""The bundle format: SPEC.md (beside this file) first, this code second.

``open_bundle`` reads, ``validate_bundle`` checks, ``BundleWriter`` writes, ``pack``/``unpack``
convert between the directory and zip forms. The writer is imported when first used: it
imports Zarr, which reading never needs.
"""

from typing import TYPE_CHECKING, Any

from ptrace.bundle_spec.reader import Bundle, open_bundle
from ptrace.bundle_spec.schema import (
    SPEC_VERSION,
    DatasetInfo,
    EnvironmentInfo,
    Manifest,
    ModelInfo,
    PromptSource,
    RequestRecord,
    RequestsInfo,
    RunInfo,
    SamplingParams,
)
from ptrace.bundle_spec.store import pack, unpack
from ptrace.bundle_spec.validation import validate_bundle

if TYPE_CHECKING:
    from ptrace.bundle_spec.writer import BundleWriter

__all__ = [
    "SPEC_VERSION", "Bundle", "BundleWriter", "DatasetInfo", "EnvironmentInfo", "Manifest", "ModelInfo",
    "PromptSource", "RequestRecord", "RequestsInfo", "RunInfo", "SamplingParams", "open_bundle", "pack",
    "unpack", "validate_bundle",
]


def __getattr__(name: str) -> Any:
    if name == "BundleWriter":
        from ptrace.bundle_spec.writer import BundleWriter

        return BundleWriter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
