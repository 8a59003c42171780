"""Capture: run a model on one engine and freeze everything needed to reproduce it.

``CaptureConfig`` takes the two documents a bundle records about how it was captured
(``SamplingParams``, ``CaptureSettings``), re-exported here for callers of the Python API.
"""

from ptrace.bundle_spec.schema import CaptureSettings, SamplingParams
from ptrace.capture.plan import CaptureConfig
from ptrace.capture.session import capture

__all__ = ["CaptureConfig", "CaptureSettings", "SamplingParams", "capture"]
