"""Capture: run a model on one engine and freeze everything needed to reproduce it."""

from ptrace.capture.session import CaptureConfig, capture

__all__ = ["CaptureConfig", "capture"]
