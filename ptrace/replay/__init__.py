"""Replay: re-run a bundle on another engine, dtype or device (``session``); ``ptrace.compare`` compares."""
