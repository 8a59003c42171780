"""Replay: re-run a bundle on another engine, dtype or device and compare (issue #3)."""
