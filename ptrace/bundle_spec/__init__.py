"""The bundle format: SPEC.md (beside this file) first, this code second.

``open_bundle`` reads (refusing what breaks the spec's structural rules), ``validate_bundle``
checks everything, ``BundleWriter`` writes, ``pack``/``unpack`` convert between the directory and
zip forms. The writer is imported when first used: reading never needs it.

The modules, in tiers (each imports only those above it): the format, without I/O (``layout``,
``names``, ``dtypes``, ``schema``, ``stats``, ``arrays``: ``zarr.json``, ``chunks``: chunk bytes,
``crc``); the storage (``store``: directory and zip); ``zarr_fallback`` (Zarr, optional); the
reader (``reader``); the rules every reader enforces (``structure``: ``open_bundle``); then
``validation``, ``packing`` and ``writer``.
"""

from typing import TYPE_CHECKING, Any

from ptrace.bundle_spec.packing import pack, unpack
from ptrace.bundle_spec.reader import Bundle
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
from ptrace.bundle_spec.structure import open_bundle
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
